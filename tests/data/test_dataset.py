"""The streaming datasets: a DataLoader with 2 workers on each of 2 Gloo ranks reads every object
exactly once
per epoch; the map-style dataset indexes the listing; file:// prefixes work too."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port
from tests.data.helpers import upload

torch = pytest.importorskip("torch")

RANK_SCRIPT = r"""
import hashlib, json, sys
import torch.distributed as dist
from torch.utils.data import DataLoader
from agent.data import S3IterableDataset

rank, world = int(sys.argv[1]), 2
port, uri, endpoint, out = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
def digest(key, data):
    return key, hashlib.sha256(data).hexdigest(), len(data)
dataset = S3IterableDataset(uri, endpoint_url=endpoint, prefetch=4, transform=digest)
loader = DataLoader(dataset, batch_size=None, num_workers=2)
epochs = [[list(item) for item in loader] for _ in range(2)]
dist.barrier()
dist.destroy_process_group()
json.dump(epochs, open(out, "w"))
"""


def test_iterable_dataset_two_ranks_two_workers_every_object_once(s3_server, bucket, s3, tmp_path):
    objects = {f"ds/{i % 4}/{i:03d}": os.urandom(1000 + i) for i in range(37)}
    upload(s3, bucket, objects)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    env = dict(
        s3_server.env(), PATH=os.environ.get("PATH", ""), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                str(port),
                f"s3://{bucket}/ds/",
                s3_server.endpoint,
                str(tmp_path / f"out{rank}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank in range(2)
    ]
    try:
        for proc in procs:
            output = proc.communicate(timeout=240)[0].decode()
            assert proc.returncode == 0, output
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    per_rank = [json.loads((tmp_path / f"out{rank}.json").read_text()) for rank in range(2)]
    expected = sorted(
        (key[3:], hashlib.sha256(data).hexdigest(), len(data)) for key, data in objects.items()
    )
    for epoch in range(2):
        items = [tuple(item) for rank in range(2) for item in per_rank[rank][epoch]]
        assert sorted(items) == expected  # every object, none twice, bytes intact
        assert per_rank[0][epoch] and per_rank[1][epoch]


def test_map_dataset_and_file_prefix(tmp_path):
    from agent.data import S3IterableDataset, S3MapDataset

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(5):
        (src / "a" / f"{i}.bin").write_bytes(bytes([i]) * (i + 1))
    mapped = S3MapDataset(f"file://{src}/")
    assert len(mapped) == 5
    assert mapped[3] == ("a/3.bin", b"\x03" * 4)
    items = list(S3IterableDataset(f"file://{src}/", rank=1, world_size=2))
    assert items == [("a/1.bin", b"\x01" * 2), ("a/3.bin", b"\x03" * 4)]
    shuffled = S3IterableDataset(f"file://{src}/", shuffle_seed=3)
    assert sorted(k for k, _ in shuffled) == [f"a/{i}.bin" for i in range(5)]


def test_empty_prefix_is_a_clear_error(tmp_path):
    from agent.data import S3IterableDataset
    from agent.errors import ChannelError

    with pytest.raises(ChannelError, match="matched no objects"):
        list(S3IterableDataset(f"file://{tmp_path}/none/"))


def test_agent_start_up_never_imports_torch():
    code = (
        "import sys, agent.data, agent.data.pipes; assert 'torch' not in sys.modules; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=60, check=False
    )
    assert done.stdout.strip() == b"ok", done.stderr.decode()

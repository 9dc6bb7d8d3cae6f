"""Pipe mode: FIFOs per epoch read by a real script process, gzip on the fly, shuffling, and
stopping."""

from __future__ import annotations

import gzip
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from agent.data import prepare_channels
from agent.job import Channel
from tests.data.helpers import make_job, upload

LOG = logging.getLogger("test.data.pipes")

READER = r"""
import os, sys, time
folder, channel, epochs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for epoch in range(epochs):
    path = os.path.join(folder, f"{channel}_{epoch}")
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"{path} never appeared")
        time.sleep(0.02)
    with open(path, "rb") as fifo, open(f"{out}.{epoch}", "wb") as dump:
        while True:
            chunk = fifo.read(65536)
            if not chunk:
                break
            dump.write(chunk)
"""


def _run_reader(tmp_path: Path, folder: Path, channel: str, epochs: int) -> list[bytes]:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    out = tmp_path / "got"
    done = subprocess.run(
        [sys.executable, str(script), str(folder), channel, str(epochs), str(out)],
        capture_output=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return [Path(f"{out}.{epoch}").read_bytes() for epoch in range(epochs)]


def test_two_epochs_of_gzip_objects_read_by_a_script(s3_server, bucket, s3, tmp_path):
    plain = {f"p/{i:02d}.rec": os.urandom(100_000 + i) for i in range(7)}
    upload(s3, bucket, {key: gzip.compress(data) for key, data in plain.items()})
    job = make_job(
        tmp_path,
        [Channel("train", f"s3://{bucket}/p/", input_mode="Pipe", compression="Gzip")],
        endpoint=s3_server.endpoint,
        pipe_epochs=2,
        pipe_prefetch=3,
    )
    handle = prepare_channels(job, log=LOG)
    try:
        folder = tmp_path / "input/data"
        assert stat.S_ISFIFO(os.stat(folder / "train_0").st_mode)
        epochs = _run_reader(tmp_path, folder, "train", 2)
        expected = b"".join(plain[key] for key in sorted(plain))
        assert epochs == [expected, expected]
        assert handle.failures() == {}
    finally:
        handle.stop(10)


def test_shuffled_epochs_differ_but_hold_the_same_objects(s3_server, bucket, s3, tmp_path):
    records = {f"s/{i:02d}": bytes([65 + i]) * 10 for i in range(12)}
    upload(s3, bucket, records)
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/s/", input_mode="Pipe", shuffle_seed=7)],
        endpoint=s3_server.endpoint,
        pipe_epochs=2,
    )
    handle = prepare_channels(job, log=LOG)
    try:
        first, second = _run_reader(tmp_path, tmp_path / "input/data", "t", 2)
    finally:
        handle.stop(10)
    split = lambda data: sorted(data[i : i + 10] for i in range(0, len(data), 10))  # noqa: E731
    assert split(first) == split(second) == sorted(records.values())
    assert first != second


def test_a_script_that_never_opens_the_fifo_does_not_block_the_job(s3_server, bucket, s3, tmp_path):
    upload(s3, bucket, {"n/a": b"x" * 10})
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/n/", input_mode="Pipe")],
        endpoint=s3_server.endpoint,
    )
    handle = prepare_channels(job, log=LOG)
    time.sleep(0.3)
    started = time.monotonic()
    handle.stop(10)
    handle.stop(10)  # idempotent
    assert time.monotonic() - started < 5
    assert not any(
        t.name.startswith("pipe-") and t.is_alive() for t in __import__("threading").enumerate()
    )


def test_a_script_that_stops_reading_half_way_gets_the_next_epoch(s3_server, bucket, s3, tmp_path):
    upload(s3, bucket, {f"h/{i}": os.urandom(400_000) for i in range(4)})
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/h/", input_mode="Pipe")],
        endpoint=s3_server.endpoint,
        pipe_epochs=2,
    )
    handle = prepare_channels(job, log=LOG)
    try:
        folder = tmp_path / "input/data"
        with open(folder / "t_0", "rb") as fifo:
            assert len(fifo.read(1000)) == 1000
        deadline = time.monotonic() + 60
        while not (folder / "t_1").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(folder / "t_1", "rb") as fifo:
            assert len(fifo.read()) == 1_600_000
    finally:
        handle.stop(10)

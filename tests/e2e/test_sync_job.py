"""Live sync through the real ``entrypoints/train``: checkpoints survive a SIGTERM and come back on
restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tar_gz

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "entrypoints" / "train"
pytestmark = pytest.mark.slow

TRAIN_PY = """
import os, signal, sys, time
root = os.path.dirname(os.environ["SM_MODEL_DIR"])
ckpt = os.path.join(root, "checkpoints")
os.makedirs(ckpt, exist_ok=True)
found = sorted(os.listdir(ckpt))
print("restored:", ",".join(found), flush=True)
with open(os.path.join(os.environ["SM_MODEL_DIR"], "restored.txt"), "w") as f:
    f.write(",".join(found))
if found:
    sys.exit(0)
inter = os.environ.get("SM_OUTPUT_INTERMEDIATE_DIR") or os.path.join(root, "output", "intermediate")
os.makedirs(inter, exist_ok=True)
with open(os.path.join(inter, "progress.txt"), "w") as f:
    f.write("epoch 1")
for n in range(1, 4):
    with open(os.path.join(ckpt, f"ckpt-{n}.pt.tmp"), "wb") as f:
        f.write(bytes([n]) * 300_000)
    os.replace(os.path.join(ckpt, f"ckpt-{n}.pt.tmp"), os.path.join(ckpt, f"ckpt-{n}.pt"))
    time.sleep(0.5)
open(os.path.join(root, "ready"), "w").close()
for _ in range(1200):
    time.sleep(0.5)
"""


def _env(root: Path, spec_file: Path, s3_env: dict) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **s3_env,
        "TORCHBAY_ROOT": str(root),
        "TORCHBAY_PYTHON": sys.executable,
        "TORCHBAY_JOB": str(spec_file),
        "TORCHBAY_GRACE_PERIOD": "20",
        "TORCHBAY_SAMPLE_INTERVAL": "0",
    }


def _keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    return {
        item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", ())
    }


def test_checkpoints_survive_sigterm_and_are_restored_on_restart(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    source = tar_gz({"train.py": textwrap.dedent(TRAIN_PY).encode()})
    s3.put_object(Bucket=bucket, Key="src/sourcedir.tar.gz", Body=source)
    spec = {
        "TrainingJobName": "sync-job",
        "HyperParameters": {
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": json.dumps(f"s3://{bucket}/src/sourcedir.tar.gz"),
        },
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "CheckpointConfig": {"S3Uri": f"s3://{bucket}/ckpt"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))

    # First run: checkpoints and an intermediate output, then a spot-style SIGTERM.
    first = tmp_path / "first"
    proc = subprocess.Popen(
        [str(TRAIN)],
        env=_env(first, spec_file, s3_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
    )
    try:
        deadline = time.monotonic() + 180
        while not (
            first / "ready"
        ).exists() or "out/sync-job/output/intermediate/progress.txt" not in _keys(
            s3, bucket, "out/"
        ):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, (
                "no ready file or intermediate output while the job ran"
            )
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert _keys(s3, bucket, "ckpt/") == {"ckpt/ckpt-1.pt", "ckpt/ckpt-2.pt", "ckpt/ckpt-3.pt"}, (
        stderr.decode()[-3000:]
    )
    assert s3.get_object(Bucket=bucket, Key="ckpt/ckpt-3.pt")["Body"].read() == bytes([3]) * 300_000

    # Second run on a fresh machine: the checkpoints are there before the script starts.
    second = tmp_path / "second"
    done = subprocess.run(
        [str(TRAIN)],
        env=_env(second, spec_file, s3_env),
        capture_output=True,
        timeout=240,
        cwd=str(REPO),
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "restored: ckpt-1.pt,ckpt-2.pt,ckpt-3.pt" in done.stdout.decode()
    assert (second / "checkpoints" / "ckpt-2.pt").read_bytes() == bytes([2]) * 300_000

"""Whole training jobs under faults (issue 14): S3 outages during the final upload, secrets, a
killed agent,
broken archives, oversized hyperparameters and a full disk. Each checks the exit code and the
failure text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tar_gz

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "entrypoints" / "train"
MiB = 1024 * 1024
pytestmark = pytest.mark.slow

BIG_MODEL_PY = """
import hashlib, os
data = os.urandom(43 * 1024 * 1024)
with open(os.path.join(os.environ["SM_MODEL_DIR"], "weights.bin"), "wb") as f:
    f.write(data)
print("md5", hashlib.md5(data).hexdigest(), flush=True)
"""


def _spec(bucket: str, *, hps: dict | None = None, **overrides: Any) -> dict:
    spec = {
        "TrainingJobName": "fault-job",
        "HyperParameters": {
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": json.dumps(f"s3://{bucket}/src/sourcedir.tar.gz"),
            **(hps or {}),
        },
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }
    spec.update(overrides)
    return spec


def _source(s3: Any, bucket: str, script: str, body: bytes | None = None) -> None:
    s3.put_object(
        Bucket=bucket,
        Key="src/sourcedir.tar.gz",
        Body=body if body is not None else tar_gz({"train.py": textwrap.dedent(script).encode()}),
    )


def _env(tmp_path: Path, endpoint_env: dict, spec: Any, **extra: str) -> dict[str, str]:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **endpoint_env,
        "TORCHBAY_ROOT": str(tmp_path / "ml"),
        "TORCHBAY_PYTHON": sys.executable,
        "TORCHBAY_JOB": str(spec_file),
        "TORCHBAY_GRACE_PERIOD": "5",
        "TORCHBAY_SAMPLE_INTERVAL": "0",
        **extra,
    }


def _run(env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TRAIN)], env=env, capture_output=True, timeout=timeout, cwd=str(REPO), check=False
    )


def _failure(tmp_path: Path) -> str:
    return (tmp_path / "ml" / "output" / "failure").read_text()


def _model_md5(s3: Any, bucket: str) -> str:
    body = s3.get_object(Bucket=bucket, Key="out/fault-job/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        return hashlib.md5(archive.extractfile("weights.bin").read()).hexdigest()


# --- 1. the final upload through an S3 outage
# -----------------------------------------------------------


def test_model_upload_survives_a_3s_outage(tmp_path, s3_proxy, s3, bucket) -> None:
    _source(s3, bucket, BIG_MODEL_PY)
    s3_proxy.outage_after(
        28 * MiB, 3.0
    )  # the first large upstream traffic is model.tar.gz: down mid-upload
    done = _run(
        _env(
            tmp_path,
            s3_proxy.env(),
            _spec(bucket),
            TORCHBAY_UPLOAD_TIMEOUT="10",
            TORCHBAY_UPLOAD_PART_SIZE=str(5 * MiB),
        )
    )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    assert s3_proxy.outages, "the outage did not happen"
    md5 = done.stdout.decode().split("md5 ", 1)[1].split()[0]
    assert _model_md5(s3, bucket) == md5  # arrived whole
    assert "model.tar.gz reached" in stderr and "parts are already there" in stderr


def test_model_upload_fails_at_the_deadline_of_a_20s_outage(tmp_path, s3_proxy, s3, bucket) -> None:
    _source(s3, bucket, BIG_MODEL_PY)
    s3_proxy.outage_after(28 * MiB, 20.0)
    done = _run(
        _env(
            tmp_path,
            s3_proxy.env(),
            _spec(bucket),
            TORCHBAY_UPLOAD_TIMEOUT="10",
            TORCHBAY_UPLOAD_PART_SIZE=str(5 * MiB),
        )
    )
    ended = time.monotonic()
    stderr = done.stderr.decode()
    assert done.returncode == 69, stderr[-3000:]
    assert s3_proxy.outages
    assert (
        ended - s3_proxy.outages[0] < 16
    )  # the deadline (10 s from the end of the script), not 20 s
    failure = _failure(tmp_path)
    assert (
        "not uploaded" in failure
        and "model.tar.gz" in failure
        and "TORCHBAY_UPLOAD_TIMEOUT" in failure
    )
    assert "uploaded " + str(tmp_path / "ml" / "model") not in stderr  # never reported as uploaded
    assert "testing-secret" not in stderr + failure


# --- 2. secrets
# ---------------------------------------------------------------------------------------------

SECRETS_PY = """
import argparse, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--password")
parser.add_argument("--api_token")
parser.add_argument("--epochs", type=int)
args = parser.parse_args()
if (args.password, args.api_token, os.environ.get("WANDB_API_KEY")) != \\
        ("hunter2-pass-XYZ", "tok-abcdef123456", "wandb-secret-999"):
    print("arguments were changed:", sys.argv, file=sys.stderr)
    sys.exit(9)
print("the script got", vars(args), os.environ["SM_HPS"], flush=True)
raise ValueError(f"cannot log in with {args.password} and token {args.api_token}")
"""
SECRETS = ("hunter2-pass-XYZ", "tok-abcdef123456", "wandb-secret-999")


def test_secrets_never_written(tmp_path, s3, s3_env, bucket) -> None:
    _source(s3, bucket, SECRETS_PY)
    spec = _spec(
        bucket,
        hps={"password": "hunter2-pass-XYZ", "api_token": "tok-abcdef123456", "epochs": "2"},
        Environment={"WANDB_API_KEY": "wandb-secret-999"},
    )
    done = _run(_env(tmp_path, s3_env, spec))
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 1, stderr[-3000:]  # 9 would mean the script got changed arguments
    failure = _failure(tmp_path)
    assert "ValueError: cannot log in with **** and token ****" in failure
    assert "--api_token **** --epochs 2 --password ****" in stderr  # the "starting ..." line
    job_log = (
        s3.get_object(Bucket=bucket, Key="out/fault-job/output/job-algo-1.log")["Body"]
        .read()
        .decode()
    )
    assert "the script got" in job_log and "the script got" in stdout
    for secret in (*SECRETS, "testing-secret-never-logged"):
        for name, text in (
            ("stdout", stdout),
            ("stderr", stderr),
            ("failure", failure),
            ("job log", job_log),
        ):
            assert secret not in text, f"{secret} in {name}"


def test_wrongly_typed_secret_is_not_echoed(tmp_path, s3_env, bucket) -> None:
    spec = _spec(bucket, Environment={"AWS_SECRET_ACCESS_KEY": ["wrong-typed-secret-123"]})
    done = _run(_env(tmp_path, s3_env, spec))
    stderr = done.stderr.decode()
    assert done.returncode == 65, stderr[-3000:]
    failure = _failure(tmp_path)
    assert "Environment.AWS_SECRET_ACCESS_KEY must be a string, got list" in failure
    assert "wrong-typed-secret-123" not in stderr + failure + done.stdout.decode()


# --- 3. no orphans
# ------------------------------------------------------------------------------------------

TREE_PY = """
import os, subprocess, sys, time
root = os.path.dirname(os.environ["SM_MODEL_DIR"])
child = subprocess.Popen(["sleep", "300"])
grandchild = subprocess.Popen([sys.executable, "-c", "import os, subprocess, time; "
                               "p = subprocess.Popen(['sleep', '301'], start_new_session=True); "
                               "open(os.environ['PIDS_DIR'] + '/grandchild', 'w')"
                               ".write(str(p.pid))"],
                              env=dict(os.environ, PIDS_DIR=root))
grandchild.wait()
with open(os.path.join(root, "pids.tmp"), "w") as f:
    f.write(f"{os.getpid()} {child.pid} {open(os.path.join(root, 'grandchild')).read()}")
os.rename(os.path.join(root, "pids.tmp"), os.path.join(root, "pids"))
if sys.argv[-1] == "exit":
    sys.exit(0)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not). A process that ends between the open and the
    read makes the read raise ProcessLookupError: that is gone too."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_pids(root: Path, proc: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 60
    while not (root / "pids").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return [int(p) for p in (root / "pids").read_text().split()]


def test_sigkill_of_the_agent_ends_the_whole_tree(tmp_path, s3, s3_env, bucket) -> None:
    _source(s3, bucket, TREE_PY)
    env = _env(tmp_path, s3_env, _spec(bucket))
    with open(tmp_path / "agent.err", "wb") as err:
        agent = subprocess.Popen(
            [str(TRAIN)], env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=str(REPO)
        )
        try:
            pids = _wait_pids(tmp_path / "ml", agent)
            assert all(_alive(pid) for pid in pids)
            agent.kill()
            agent.wait(10)
            killed = time.monotonic()
            while any(_alive(pid) for pid in pids) and time.monotonic() - killed < 2:
                time.sleep(0.02)
            left = [pid for pid in pids if _alive(pid)]
        finally:
            for pid in pids if "pids" in locals() else []:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    assert left == [], (
        f"still running 2 s after the agent was killed: {left} (script, child, setsid grandchild)"
    )
    failure = tmp_path / "ml" / "output" / "failure"
    deadline = time.monotonic() + 5
    while (
        not failure.exists() and time.monotonic() < deadline
    ):  # the guard writes it after the kills
        time.sleep(0.05)
    assert "agent (PID" in failure.read_text() and "died" in failure.read_text()


def test_setsid_grandchild_is_stopped_and_named_at_a_normal_end(
    tmp_path, s3, s3_env, bucket
) -> None:
    _source(s3, bucket, TREE_PY)
    done = _run(_env(tmp_path, s3_env, _spec(bucket, hps={"mode": "exit"})))
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    _script, child, grandchild = [int(p) for p in (tmp_path / "ml" / "pids").read_text().split()]
    assert not _alive(child) and not _alive(grandchild)
    assert f"PID {grandchild} (sleep 301)" in stderr and "left its process group" in stderr


def _sigterm_once_under_way(tmp_path: Path, env: dict[str, str], folder: Path, suffix: str) -> str:
    """Start the agent, SIGTERM it once a ``suffix`` file appeared in ``folder`` (the step is under
    way), and check it ended as stopped (143) within 5 s with its outputs' upload done; returns
    its failure file."""
    with open(tmp_path / "agent.err", "wb") as err:
        agent = subprocess.Popen(
            [str(TRAIN)], env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=str(REPO)
        )
        try:
            deadline = time.monotonic() + 60
            while not any(p.suffix == suffix for p in folder.glob("*")):
                assert agent.poll() is None, (tmp_path / "agent.err").read_text()[-3000:]
                assert time.monotonic() < deadline, f"no {suffix} file came in {folder}"
                time.sleep(0.05)
            agent.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = agent.wait(60)
            took = time.monotonic() - signalled
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    log = (tmp_path / "agent.err").read_text()
    assert code == 143, log[-3000:]
    assert took < 5, f"the agent took {took:.1f} s to end after SIGTERM:\n{log[-3000:]}"
    return _failure(tmp_path)


def test_sigterm_while_a_slow_channel_stages(tmp_path, s3_proxy, s3, bucket) -> None:
    """docker stop / StopTrainingJob / a spot reclaim while a big channel stages: the agent stops
    the staging within a second or two instead of after the last object (docker's SIGKILL comes
    10 s after its SIGTERM, and would leave neither outputs nor a failure file), then uploads the
    outputs and writes a failure file naming the stop; exit 128+15."""
    _source(s3, bucket, "print('never runs')\n")
    for i in range(64):  # 16 MiB at 1 MiB/s: ~16 s of staging
        s3.put_object(Bucket=bucket, Key=f"slow/{i:03d}.bin", Body=os.urandom(256 * 1024))
    s3_proxy.rate = MiB
    channel = {
        "ChannelName": "train",
        "DataSource": {"S3DataSource": {"S3Uri": f"s3://{bucket}/slow/"}},
    }
    spec = _spec(bucket, InputDataConfig=[channel])
    env = _env(tmp_path, s3_proxy.env(), spec, TORCHBAY_DATA_THREADS="4")
    folder = tmp_path / "ml" / "input" / "data" / "train"
    failure = _sigterm_once_under_way(tmp_path, env, folder, ".bin")
    assert "stopped by SIGTERM during data staging" in failure
    assert len(list(folder.glob("*.bin"))) < 64
    s3.head_object(Bucket=bucket, Key="out/fault-job/output/model.tar.gz")  # outputs uploaded


def test_sigterm_while_checkpoints_are_restored(tmp_path, s3_proxy, s3, bucket) -> None:
    """A spot reclaim while the checkpoints are restored: no new checkpoint file starts after the
    SIGTERM, and the job ends as stopped during the restore (exit 143), its outputs uploaded."""
    _source(s3, bucket, "print('never runs')\n")
    for i in range(48):  # 12 MiB at 1 MiB/s: ~12 s of restore
        s3.put_object(Bucket=bucket, Key=f"ckpt/shard-{i:02d}.pt", Body=os.urandom(256 * 1024))
    s3_proxy.rate = MiB
    spec = _spec(bucket, CheckpointConfig={"S3Uri": f"s3://{bucket}/ckpt"})
    env = _env(tmp_path, s3_proxy.env(), spec, TORCHBAY_SYNC_WORKERS="2")
    failure = _sigterm_once_under_way(tmp_path, env, tmp_path / "ml" / "checkpoints", ".pt")
    assert "stopped by SIGTERM during checkpoint restore" in failure
    s3.head_object(Bucket=bucket, Key="out/fault-job/output/model.tar.gz")  # outputs uploaded


def test_sigterm_while_a_big_source_archive_downloads(tmp_path, s3_proxy, s3, bucket) -> None:
    """docker stop while a 12 MiB source archive downloads at 1 MiB/s: the download ends at its
    next read instead of its last byte (the agent took 12 s to stop before, past docker's 10 s),
    and the job ends as stopped during the code download, its outputs uploaded."""
    body = tar_gz({"train.py": b"print('never runs')\n", "weights.bin": os.urandom(12 * MiB)})
    _source(s3, bucket, "", body=body)
    s3_proxy.rate = MiB
    env = _env(tmp_path, s3_proxy.env(), _spec(bucket))
    agent_dir = tmp_path / "ml" / "output" / "torchbay"
    failure = _sigterm_once_under_way(tmp_path, env, agent_dir, ".part")
    assert "stopped by SIGTERM during the code download" in failure
    assert not list(agent_dir.glob("sourcedir.tar.gz*"))  # no partial archive left
    assert not (tmp_path / "ml" / "code" / "train.py").exists()
    s3.head_object(Bucket=bucket, Key="out/fault-job/output/model.tar.gz")  # outputs uploaded


# --- 4. named errors
# ---------------------------------------------------------------------------------------


def test_truncated_source_archive(tmp_path, s3, s3_env, bucket) -> None:
    whole = tar_gz({"train.py": b"print('hi')\n", "data.bin": os.urandom(200_000)})
    _source(s3, bucket, "", body=whole[: len(whole) // 2])
    done = _run(_env(tmp_path, s3_env, _spec(bucket)))
    assert done.returncode == 65, done.stderr.decode()[-3000:]
    failure = _failure(tmp_path)
    assert (
        failure.startswith("ArchiveError: source archive s3://")
        and "truncated or corrupt" in failure
    )
    assert "at byte" in failure and "'data.bin'" in failure
    assert "internal error" not in done.stderr.decode()


def test_gzip_bomb_source_archive_is_refused(tmp_path, s3, s3_env, bucket) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        info = tarfile.TarInfo("train.py")
        info.size = 64 * MiB

        class _Zeros(io.RawIOBase):
            def __init__(self) -> None:
                self.left = info.size

            def readable(self) -> bool:
                return True

            def readinto(self, view) -> int:  # type: ignore[override]
                n = min(len(view), self.left)
                view[:n] = bytes(n)
                self.left -= n
                return n

        archive.addfile(info, io.BufferedReader(_Zeros()))
    assert len(buf.getvalue()) < 1 * MiB
    _source(s3, bucket, "", body=buf.getvalue())
    done = _run(_env(tmp_path, s3_env, _spec(bucket), TORCHBAY_SOURCE_MAX_BYTES=str(16 * MiB)))
    assert done.returncode == 65, done.stderr.decode()[-3000:]
    failure = _failure(tmp_path)
    assert (
        "unpacks to more than 16777216 bytes" in failure and "TORCHBAY_SOURCE_MAX_BYTES" in failure
    )
    assert not (tmp_path / "ml" / "code" / "train.py").exists()


def test_10mb_hyperparameter_is_refused_by_name(tmp_path, s3, s3_env, bucket) -> None:
    _source(s3, bucket, "print('never runs')\n")
    done = _run(_env(tmp_path, s3_env, _spec(bucket, hps={"blob": "x" * 10_000_000})))
    stderr = done.stderr.decode()
    assert done.returncode == 65, stderr[-3000:]
    failure = _failure(tmp_path)
    assert "hyperparameter 'blob' is 10000000 bytes" in failure and "131071" in failure
    assert max(len(line) for line in stderr.splitlines()) < 20_000  # log lines are capped
    assert "never runs" not in done.stdout.decode()


FILL_PY = """
import errno, os
path = os.path.join(os.environ["SM_MODEL_DIR"], "huge.bin")
block = os.urandom(1024 * 1024)
try:
    with open(path, "wb") as f:
        while True:
            f.write(block)
            f.flush()
except OSError as err:
    assert err.errno == errno.ENOSPC, err
"""


def test_full_disk_still_leaves_a_failure_file(tmp_path, s3, s3_env, bucket) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    root = tmp_path / "ml"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        _source(s3, bucket, FILL_PY)
        done = _run(_env(tmp_path, s3_env, _spec(bucket)))
        stderr = done.stderr.decode()
        assert done.returncode == 74, stderr[-3000:]
        failure = _failure(tmp_path)
        assert failure.startswith("DiskFullError: disk full"), failure
        assert "internal error" not in stderr
        usage = shutil.disk_usage(root)
        assert usage.free < 64 * 1024  # still full: the failure file used the reserved room
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)

"""Whole training jobs through the real ``entrypoints/train`` executable, against a real S3 server
(moto).

Each test checks what landed in S3, the failure or success file and the exit code.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers import tar_gz

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "entrypoints" / "train"
pytestmark = pytest.mark.slow

TRAIN_PY = """
import argparse, os, signal, sys, time
print("first line from the script", flush=True)
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int)
parser.add_argument("--mode", default="ok")
args = parser.parse_args()
root = os.path.dirname(os.environ["SM_MODEL_DIR"])
data = sorted(os.listdir(os.environ["SM_CHANNEL_TRAIN"]))
print(f"epochs={args.epochs} data={data}", flush=True)
with open(os.path.join(os.environ["SM_MODEL_DIR"], "model.txt"), "w") as f:
    f.write(f"trained {args.epochs}")
with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "eval.txt"), "w") as f:
    f.write("eval")
os.makedirs("/".join([root, "checkpoints"]), exist_ok=True)
with open(os.path.join(root, "checkpoints", "ckpt-1.txt"), "w") as f:
    f.write("ckpt")
if args.mode == "raise":
    print("about to fail", file=sys.stderr)
    raise ValueError(f"learning rate too high for {args.epochs} epochs")
if args.mode == "exit7":
    print("giving up", file=sys.stderr)
    sys.exit(7)
if args.mode == "sleep":
    def on_term(signum, frame):
        with open(os.path.join(os.environ["SM_MODEL_DIR"], "saved-on-sigterm.txt"), "w") as f:
            f.write("saved")
        print("got SIGTERM, saved the model", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(root, "ready"), "w").close()
    for _ in range(600):
        time.sleep(0.5)
print("last line, no newline", end="")
"""


def _members(s3: Any, bucket: str, key: str) -> dict[str, bytes]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def _spec(bucket: str, *, hps: dict | None = None, **overrides: Any) -> dict:
    spec = {
        "TrainingJobName": "e2e-job",
        "HyperParameters": {
            "epochs": "3",
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": json.dumps(f"s3://{bucket}/src/sourcedir.tar.gz"),
            **(hps or {}),
        },
        "InputDataConfig": [
            {
                "ChannelName": "train",
                "DataSource": {"S3DataSource": {"S3Uri": f"s3://{bucket}/data/train/"}},
            }
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "CheckpointConfig": {"S3Uri": f"s3://{bucket}/ckpt"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }
    spec.update(overrides)
    return spec


def _arrange(s3: Any, bucket: str, files: dict[str, bytes] | None = None) -> None:
    s3.put_object(
        Bucket=bucket,
        Key="src/sourcedir.tar.gz",
        Body=tar_gz(files or {"train.py": textwrap.dedent(TRAIN_PY).encode()}),
    )
    s3.put_object(Bucket=bucket, Key="data/train/a.csv", Body=b"1,2\n")
    s3.put_object(Bucket=bucket, Key="data/train/b.csv", Body=b"3,4\n")


def _env(tmp_path: Path, s3_env: dict, spec: Any, **extra: str) -> dict[str, str]:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **s3_env,
        "TORCHBAY_ROOT": str(tmp_path / "ml"),
        "TORCHBAY_PYTHON": sys.executable,
        "TORCHBAY_JOB": str(spec_file),
        "TORCHBAY_GRACE_PERIOD": "20",
        "TORCHBAY_SAMPLE_INTERVAL": "0",
        **extra,
    }


def _run(env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TRAIN)], env=env, capture_output=True, timeout=timeout, cwd=str(REPO), check=False
    )


def _failure(tmp_path: Path) -> str:
    return (tmp_path / "ml" / "output" / "failure").read_text()


def test_success_outputs_land_in_s3(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    done = _run(_env(tmp_path, s3_env, _spec(bucket)))
    stdout = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "first line from the script" in stdout
    assert "epochs=3 data=['a.csv', 'b.csv']" in stdout
    assert "last line, no newline" in stdout  # nothing lost at exit
    assert _members(s3, bucket, "out/e2e-job/output/model.tar.gz") == {"model.txt": b"trained 3"}
    assert _members(s3, bucket, "out/e2e-job/output/output.tar.gz") == {"eval.txt": b"eval"}
    assert s3.get_object(Bucket=bucket, Key="ckpt/ckpt-1.txt")["Body"].read() == b"ckpt"
    assert (tmp_path / "ml" / "output" / "success").exists()
    assert not (tmp_path / "ml" / "output" / "failure").exists()
    assert "testing-secret-never-logged" not in stdout + done.stderr.decode()


def test_user_exception(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    done = _run(_env(tmp_path, s3_env, _spec(bucket, hps={"mode": '"raise"'})))
    assert done.returncode == 1
    failure = _failure(tmp_path)
    assert failure.startswith("ValueError: learning rate too high for 3 epochs")
    assert "exit code 1" in failure and "about to fail" in failure and "Traceback" in failure
    assert len(failure) <= 1024
    # Outputs are uploaded in every case.
    assert _members(s3, bucket, "out/e2e-job/output/model.tar.gz") == {"model.txt": b"trained 3"}


def test_user_exit_code_passes_through(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    done = _run(_env(tmp_path, s3_env, _spec(bucket, hps={"mode": '"exit7"'})))
    assert done.returncode == 7
    assert "exit code 7" in _failure(tmp_path) and "giving up" in _failure(tmp_path)


def test_sigterm_during_training(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    env = _env(tmp_path, s3_env, _spec(bucket, hps={"mode": '"sleep"'}))
    proc = subprocess.Popen(
        [str(TRAIN)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO)
    )
    try:
        ready = tmp_path / "ml" / "ready"
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the script never became ready"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # what docker stop / StopTrainingJob send to the agent
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr.decode()[-3000:]
    assert "got SIGTERM, saved the model" in stdout.decode()
    members = _members(s3, bucket, "out/e2e-job/output/model.tar.gz")
    assert members["saved-on-sigterm.txt"] == b"saved"
    assert "SIGTERM" in _failure(tmp_path)


def test_missing_channel_data(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    spec = _spec(bucket)
    spec["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = (
        f"s3://{bucket}/data/absent/"
    )
    done = _run(_env(tmp_path, s3_env, spec))
    assert done.returncode == 66, done.stderr.decode()[-3000:]
    failure = _failure(tmp_path)
    assert "ChannelError" in failure and "train" in failure and "data/absent" in failure


def test_missing_bucket(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    spec = _spec(bucket)
    spec["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = (
        "s3://torchbay-no-such-bucket/data/"
    )
    done = _run(_env(tmp_path, s3_env, spec))
    assert done.returncode == 68, done.stderr.decode()[-3000:]
    failure = _failure(tmp_path)
    assert (
        "BucketMissing" in failure
        and "torchbay-no-such-bucket" in failure
        and "create it" in failure
    )
    assert "testing-secret" not in failure + done.stderr.decode()
    # Nothing ran, but what exists is still uploaded to the (real) output bucket.
    assert s3.head_object(Bucket=bucket, Key="out/e2e-job/output/model.tar.gz")["ContentLength"] > 0


def test_failing_requirements(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(
        s3,
        bucket,
        {
            "train.py": b"print('never')\n",
            "requirements.txt": b"torchbay-no-such-package-xyz==1.0\n",
        },
    )
    done = _run(_env(tmp_path, s3_env, _spec(bucket), PIP_NO_INDEX="1"))
    assert done.returncode == 75, done.stderr.decode()[-3000:]
    failure = _failure(tmp_path)
    assert "InstallError" in failure and "torchbay-no-such-package-xyz" in failure
    assert "never" not in done.stdout.decode()


def test_the_first_failing_step_is_the_jobs_failure_though_channels_are_listed_meanwhile(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    """Channels are listed on a thread while the code is fetched and its requirements installed:
    a failed install is still the job's failure when the channel's prefix is empty too, and the
    script never runs."""
    _arrange(
        s3,
        bucket,
        {
            "train.py": b"print('never')\n",
            "requirements.txt": b"torchbay-no-such-package-xyz==1.0\n",
        },
    )
    spec = _spec(bucket)
    spec["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = (
        f"s3://{bucket}/data/absent/"
    )
    done = _run(_env(tmp_path, s3_env, spec, PIP_NO_INDEX="1"))
    assert done.returncode == 75, done.stderr.decode()[-3000:]
    failure = _failure(tmp_path)
    assert "InstallError" in failure and "ChannelError" not in failure
    assert "never" not in done.stdout.decode()


def _logged_at(stderr: str, text: str) -> float:
    """When the agent logged the first line holding ``text`` (its log's timestamp, in s)."""
    for line in stderr.splitlines():
        if text in line and " torchbay " in line:
            stamp = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
            return time.mktime(stamp) + int(line[20:23]) / 1000
    raise AssertionError(f"no log line with {text!r}:\n{stderr[-3000:]}")


def test_channels_are_staged_while_the_requirements_install(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    """Staging runs beside pip instead of after it: the channel is in place before pip is done
    (pip's own start takes a second or more; two small objects take milliseconds)."""
    _arrange(
        s3,
        bucket,
        {"train.py": textwrap.dedent(TRAIN_PY).encode(), "requirements.txt": b"psutil\n"},
    )
    done = _run(_env(tmp_path, s3_env, _spec(bucket), PIP_NO_INDEX="1"))  # psutil is here
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr[-3000:]
    staged = _logged_at(stderr, "channel 'train': staged 2 files")
    assert staged <= _logged_at(stderr, "installed requirements.txt")  # not after pip
    assert "data=['a.csv', 'b.csv']" in done.stdout.decode()


def test_a_failed_install_cancels_a_slow_staging(tmp_path: Path, bucket: str, s3, s3_proxy) -> None:
    """The install fails while a slow channel stages beside it: the job ends on the install's
    failure at once, the staging cancelled, instead of downloading the rest first."""
    _arrange(
        s3,
        bucket,
        {"train.py": b"print('never')\n", "requirements.txt": b"torchbay-no-such-package-xyz\n"},
    )
    for i in range(64):  # 16 MiB at 1 MiB/s: ~16 s of staging
        s3.put_object(Bucket=bucket, Key=f"data/train/slow-{i:03d}.bin", Body=os.urandom(256 << 10))
    s3_proxy.rate = 1 << 20
    start = time.monotonic()
    done = _run(
        _env(tmp_path, s3_proxy.env(), _spec(bucket), PIP_NO_INDEX="1", TORCHBAY_DATA_THREADS="4")
    )
    took = time.monotonic() - start
    assert done.returncode == 75, done.stderr.decode()[-3000:]
    assert "InstallError" in _failure(tmp_path)
    assert took < 8, f"the job took {took:.1f} s"  # a cancel that failed: 10 s more
    assert len(list((tmp_path / "ml" / "input" / "data" / "train").glob("slow-*"))) < 64


def test_hostile_tarball(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket, {"train.py": b"print(1)\n", "../../escaped.txt": b"pwned"})
    done = _run(_env(tmp_path, s3_env, _spec(bucket)))
    assert done.returncode == 65
    assert "UnsafePathError" in _failure(tmp_path) and "escaped.txt" in _failure(tmp_path)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_bad_job_spec_field(tmp_path: Path, bucket: str, s3_env: dict) -> None:
    spec = _spec(bucket)
    spec["ResourceConfig"] = {"InstanceCount": "two"}
    done = _run(_env(tmp_path, s3_env, spec))
    assert done.returncode == 65
    failure = _failure(tmp_path)
    assert "ResourceConfig.InstanceCount" in failure and str(tmp_path / "job.json") in failure
    assert "ResourceConfig.InstanceCount" in done.stderr.decode()


def test_missing_entry_point(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket)
    done = _run(_env(tmp_path, s3_env, _spec(bucket, hps={"sagemaker_program": '"nope.py"'})))
    assert done.returncode == 72
    assert "'nope.py' not found" in _failure(tmp_path)


def test_unreachable_endpoint(tmp_path: Path, bucket: str, s3_env: dict) -> None:
    env = _env(tmp_path, s3_env, _spec(bucket), AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    done = _run(env)
    assert done.returncode == 69, done.stderr.decode()[-3000:]
    assert "EndpointUnreachable" in _failure(tmp_path) and "AWS_ENDPOINT_URL" in _failure(tmp_path)

"""Whole jobs: the real train entrypoint on each of two hosts, each in its own network namespace."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import DUMMY_CREDS

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, bucket: str, count: int, **hyperparameters) -> Path:
    code = tmp_path / "src"
    code.mkdir(exist_ok=True)
    (code / "ddp.py").write_text(SCRIPT.read_text())
    spec = {
        "TrainingJobName": f"mh-{uuid.uuid4().hex[:8]}",
        "HyperParameters": {
            "sagemaker_program": "ddp.py",
            "sagemaker_submit_directory": code.as_uri(),
            "sagemaker_torch_distributed_enabled": "true",
            **hyperparameters,
        },
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "ResourceConfig": {"InstanceCount": count, "InstanceType": "local"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _agent_env(tmp_path: Path, s3, hosts: list[str], current: str, **extra: str) -> dict[str, str]:
    return {
        **DUMMY_CREDS,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "TORCHBAY_ROOT": str(tmp_path / current / "ml"),
        "TORCHBAY_HOSTS": ",".join(hosts),
        "TORCHBAY_CURRENT_HOST": current,
        "TORCHBAY_NPROC_PER_NODE": "2",
        "TORCHBAY_HOST_WAIT_TIMEOUT": "120",
        **extra,
    }


def _start(cluster, tmp_path, s3, spec, hosts, **extra):
    return [
        cluster.popen(
            i,
            [sys.executable, "-m", "agent", "train", "--job", str(spec)],
            env=_agent_env(tmp_path, s3, hosts, f"algo-{i}", **extra),
            log=tmp_path / f"algo-{i}.log",
        )
        for i in range(1, len(cluster.hosts) + 1)
    ]


def _bucket(s3) -> str:
    client = s3.client()
    name = f"mh-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def world(tmp_path, netns_cluster, root_s3):
    cluster = netns_cluster(2)
    s3 = root_s3(cluster)
    return cluster, s3


@pytest.mark.timeout(400)
def test_two_hosts_two_processes_through_the_train_entrypoint(tmp_path, world):
    cluster, s3 = world
    bucket = _bucket(s3)
    spec = _spec(tmp_path, bucket, 2)
    procs = _start(cluster, tmp_path, s3, spec, ["algo-1", "algo-2"])
    codes = [proc.wait(300) for proc in procs]
    logs = {i: (tmp_path / f"algo-{i}.log").read_text() for i in (1, 2)}
    assert codes == [0, 0], logs
    for host, log in ((1, logs[1]), (2, logs[2])):
        tagged = re.findall(r"\[algo-(\d):(\d)\] ALLREDUCE rank=(\d) world=4 sum=10", log)
        assert sorted((h, tag, rank) for h, tag, rank in tagged) == (
            [("1", "0", "0"), ("1", "1", "1")] if host == 1 else [("2", "2", "2"), ("2", "3", "3")]
        ), log
    job_name = json.loads(spec.read_text())["TrainingJobName"]
    body = (
        s3.client()
        .get_object(Bucket=bucket, Key=f"out/{job_name}/output/model.tar.gz")["Body"]
        .read()
    )
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        result = tar.extractfile("result.txt").read().decode()
    assert result == "sum=10 world=4\n"
    assert (tmp_path / "algo-1" / "ml" / "output" / "success").exists()


@pytest.mark.timeout(400)
def test_killed_host_fails_the_other_host(tmp_path, world):
    cluster, s3 = world
    spec = _spec(tmp_path, _bucket(s3), 2)
    procs = _start(cluster, tmp_path, s3, spec, ["algo-1", "algo-2"], DDP_LOOP_SECONDS="250")
    log1 = tmp_path / "algo-1.log"
    deadline = time.monotonic() + 250
    while log1.read_text().count("ALLREDUCE") < 2 and time.monotonic() < deadline:
        assert procs[0].poll() is None, log1.read_text()
        time.sleep(0.3)
    cluster.kill_host(2)
    killed = time.monotonic()
    code = procs[0].wait(150)
    elapsed = time.monotonic() - killed
    assert code not in (0, None), log1.read_text()
    assert elapsed < 120, f"the surviving host took {elapsed:.0f} s to fail"
    failure = (tmp_path / "algo-1" / "ml" / "output" / "failure").read_text()
    # whichever sees it first: the identity exchange (the peer's agent vanished) or the ranks'
    # broken connection
    assert (
        "host algo-2 lost its connection" in failure or "on host algo-1 failed first:" in failure
    ), failure
    assert (
        "lost its connection" in failure
        or "Connection closed by peer" in failure
        or "Error" in failure
    ), failure


@pytest.mark.timeout(200)
def test_host_that_never_resolves_fails_after_the_bound(tmp_path, world):
    cluster, s3 = world
    spec = _spec(tmp_path, _bucket(s3), 2)
    env = _agent_env(tmp_path, s3, ["algo-1", "algo-9"], "algo-1", TORCHBAY_HOST_WAIT_TIMEOUT="3")
    start = time.monotonic()
    proc = cluster.popen(
        1,
        [sys.executable, "-m", "agent", "train", "--job", str(spec)],
        env=env,
        log=tmp_path / "lonely.log",
    )
    code = proc.wait(150)
    elapsed = time.monotonic() - start
    log = (tmp_path / "lonely.log").read_text()
    assert code == 68, log
    assert elapsed >= 3, log
    failure = (tmp_path / "algo-1" / "ml" / "output" / "failure").read_text()
    assert "algo-9 (does not resolve)" in failure, failure


@pytest.mark.timeout(200)
def test_worker_whose_master_never_starts_fails_after_the_host_wait_bound(tmp_path, world):
    cluster, s3 = world
    spec = _spec(tmp_path, _bucket(s3), 2)
    env = _agent_env(tmp_path, s3, ["algo-1", "algo-2"], "algo-2", TORCHBAY_HOST_WAIT_TIMEOUT="5")
    start = time.monotonic()
    proc = cluster.popen(
        2,
        [sys.executable, "-m", "agent", "train", "--job", str(spec)],
        env=env,
        log=tmp_path / "worker.log",
    )
    code = proc.wait(150)
    elapsed = time.monotonic() - start
    log = (tmp_path / "worker.log").read_text()
    assert code not in (0, None), log
    assert 5 <= elapsed < 120, log
    failure = (tmp_path / "algo-2" / "ml" / "output" / "failure").read_text()
    assert "the master algo-1" in failure and "did not answer" in failure, failure

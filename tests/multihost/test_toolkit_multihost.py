"""Two hosts (network namespaces): scripts using the toolkits' Python API see the cluster as
SageMaker shows it, and every host's job log and status file land in S3, also for a host that fails
before its script."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import DUMMY_CREDS

REPO = Path(__file__).resolve().parents[2]

# One process per host, launched by torch.distributed.run; both toolkit APIs, then a Gloo
# all-reduce.
SCRIPT = """
import datetime, json, os
import sagemaker_containers
import torch
import torch.distributed as dist
from sagemaker_training import environment

env = environment.Environment()
legacy = sagemaker_containers.training_env()
assert dict(env) == dict(legacy)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
total = torch.tensor([1.0])
dist.all_reduce(total)
print(f"TOOLKIT host={env.current_host} hosts={','.join(env.hosts)} master={env.master_hostname} "
      f"is_master={env.is_master} world={int(total.item())}", flush=True)
with open(os.path.join(env.output_data_dir, "env.json"), "w") as f:
    json.dump(dict(env), f)
dist.destroy_process_group()
"""


def _spec(tmp_path: Path, bucket: str) -> tuple[Path, str]:
    code = tmp_path / "src"
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text(SCRIPT)
    name = f"tk-{uuid.uuid4().hex[:8]}"
    spec = {
        "TrainingJobName": name,
        "HyperParameters": {
            "sagemaker_program": "train.py",
            "sagemaker_submit_directory": code.as_uri(),
            "sagemaker_torch_distributed_enabled": "true",
            "epochs": "1",
        },
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "ResourceConfig": {"InstanceCount": 2, "InstanceType": "local"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path, name


def _env(tmp_path: Path, s3, hosts: list[str], current: str, **extra: str) -> dict[str, str]:
    return {
        **DUMMY_CREDS,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "TORCHBAY_ROOT": str(tmp_path / current / "ml"),
        "TORCHBAY_HOSTS": ",".join(hosts),
        "TORCHBAY_CURRENT_HOST": current,
        "TORCHBAY_SAMPLE_INTERVAL": "0",
        "TORCHBAY_NPROC_PER_NODE": "1",
        "TORCHBAY_HOST_WAIT_TIMEOUT": "120",
        **extra,
    }


@pytest.fixture
def world(tmp_path, netns_cluster, root_s3):
    cluster = netns_cluster(2)
    s3 = root_s3(cluster)
    bucket = f"tk-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=bucket)
    return cluster, s3, bucket


def _text(s3, bucket: str, key: str) -> str:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()


@pytest.mark.timeout(400)
def test_two_hosts_see_the_cluster_through_the_toolkit_api(tmp_path, world):
    cluster, s3, bucket = world
    spec, name = _spec(tmp_path, bucket)
    hosts = ["algo-1", "algo-2"]
    procs = [
        cluster.popen(
            i,
            [sys.executable, "-m", "agent", "train", "--job", str(spec)],
            env=_env(tmp_path, s3, hosts, f"algo-{i}"),
            log=tmp_path / f"algo-{i}.log",
        )
        for i in (1, 2)
    ]
    codes = [proc.wait(300) for proc in procs]
    logs = {i: (tmp_path / f"algo-{i}.log").read_text() for i in (1, 2)}
    assert codes == [0, 0], logs
    for i in (1, 2):
        assert (
            f"TOOLKIT host=algo-{i} hosts=algo-1,algo-2 master=algo-1 is_master={i == 1} world=2"
            in logs[i]
        ), logs[i]
        seen = json.loads(
            (tmp_path / f"algo-{i}" / "ml" / "output" / "data" / "env.json").read_text()
        )
        assert seen["current_host"] == f"algo-{i}" and seen["distribution_hosts"] == hosts
        assert seen["model_dir"] == str(tmp_path / f"algo-{i}" / "ml" / "model")
        assert _text(s3, bucket, f"out/{name}/output/success-algo-{i}") == ""
        log = _text(s3, bucket, f"out/{name}/output/job-algo-{i}.log")
        assert f"[algo-{i}:agent] " in log and f"TOOLKIT host=algo-{i}" in log


@pytest.mark.timeout(200)
def test_a_host_that_waits_in_vain_leaves_its_log_and_failure(tmp_path, world):
    cluster, s3, bucket = world
    spec, name = _spec(tmp_path, bucket)
    proc = cluster.popen(
        1,
        [sys.executable, "-m", "agent", "train", "--job", str(spec)],
        env=_env(tmp_path, s3, ["algo-1", "algo-9"], "algo-1", TORCHBAY_HOST_WAIT_TIMEOUT="3"),
        log=tmp_path / "lonely.log",
    )
    assert proc.wait(150) == 68, (tmp_path / "lonely.log").read_text()
    failure = _text(s3, bucket, f"out/{name}/output/failure-algo-1")
    assert "algo-9 (does not resolve)" in failure
    log = _text(s3, bucket, f"out/{name}/output/job-algo-1.log")
    assert "[algo-1:agent] " in log and "DistributedError" in log and "algo-9" in log

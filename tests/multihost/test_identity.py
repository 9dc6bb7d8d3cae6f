"""One cluster identity under every dialect: two pod-like hosts, a ShardedByS3Key channel, and a
script in the SageMaker-example shape (hosts.index(current_host), MASTER_ADDR=hosts[0]) that
all-reduces across them.

Each host has its own hostname, a default route and its own /etc/hosts (tests/multihost/netns.py).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import DUMMY_CREDS

SCRIPT = Path(__file__).with_name("sm_example_script.py")
REPO = Path(__file__).resolve().parents[2]
OBJECTS = 12


def _job(tmp_path: Path, s3, count: int = 2) -> tuple[Path, str, str]:
    client = s3.client()
    bucket = f"id-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    for index in range(OBJECTS):
        client.put_object(
            Bucket=bucket, Key=f"data/part-{index:02d}.txt", Body=f"{index}\n".encode()
        )
    code = tmp_path / "src"
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text(SCRIPT.read_text())
    name = f"id-{uuid.uuid4().hex[:8]}"
    spec = {
        "TrainingJobName": name,
        "HyperParameters": {
            "sagemaker_program": "train.py",
            "sagemaker_submit_directory": code.as_uri(),
        },
        "InputDataConfig": [
            {
                "ChannelName": "train",
                "DataSource": {
                    "S3DataSource": {
                        "S3Uri": f"s3://{bucket}/data/",
                        "S3DataType": "S3Prefix",
                        "S3DataDistributionType": "ShardedByS3Key",
                    }
                },
            }
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "ResourceConfig": {"InstanceCount": count, "InstanceType": "local"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path, bucket, name


def agent_env(tmp_path: Path, s3, host: str, **extra: str) -> dict[str, str]:
    return {
        **DUMMY_CREDS,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "TORCHBAY_ROOT": str(tmp_path / host / "ml"),
        "TORCHBAY_HOST_WAIT_TIMEOUT": "60",
        "SCRIPT_PORT": "23456",
        **extra,
    }


JOB = "pt-mnist"  # the PyTorchJob's name in the Kubeflow dialects


def _dialect(name: str, index: int, cluster) -> dict[str, str]:
    """The variables the orchestrator gives host ``index`` (1-based) of a 2-host job."""
    rank = index - 1
    host = cluster.hosts[index - 1]
    if name == "kubeflow":
        return {
            "MASTER_ADDR": f"{JOB}-master-0",
            "MASTER_PORT": "23456",
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "PET_MASTER_ADDR": f"{JOB}-master-0",
            "PET_MASTER_PORT": "23456",
            "PET_NNODES": "2",
            "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": "1",
            "HOSTNAME": host.name,
        }
    if name == "kubeflow-elastic":
        return {
            "PET_RDZV_ENDPOINT": f"{JOB}-worker-0:29400",
            "PET_RDZV_BACKEND": "c10d",
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "HOSTNAME": host.name,
            "TORCHBAY_RDZV_TIMEOUT": "60",
        }
    if name == "torchrun":
        return {
            "MASTER_ADDR": cluster.hosts[0].addr,
            "MASTER_PORT": "29500",
            "NNODES": "2",
            "NODE_RANK": str(rank),
        }
    if name == "sm-hosts":
        return {
            "SM_HOSTS": json.dumps([h.name for h in cluster.hosts]),
            "SM_CURRENT_HOST": host.name,
        }
    if name == "spec":
        return {
            "TORCHBAY_HOSTS": ",".join(h.name for h in cluster.hosts),
            "TORCHBAY_CURRENT_HOST": host.name,
        }
    raise AssertionError(name)


# hostnames and what every hosts file lists (a cluster DNS stands behind "all" for the Kubeflow
# services)
DIALECTS = {
    "kubeflow": ([f"{JOB}-master-0", f"{JOB}-worker-0"], "all"),
    "kubeflow-elastic": ([f"{JOB}-worker-0", f"{JOB}-worker-1"], "all"),
    "torchrun": (["pod-a", "pod-b"], "own"),
    "sm-hosts": (["algo-1", "algo-2"], "all"),
    "spec": (["algo-1", "algo-2"], "all"),
}


def results(logs: list[str]) -> list[dict]:
    found = [
        json.loads(line.split("SMEXAMPLE ", 1)[1])
        for log in logs
        for line in log.splitlines()
        if "SMEXAMPLE {" in line
    ]
    return sorted(found, key=lambda r: r["index"])


def check_identity(found: list[dict], logs: list[str], expected_hosts: list[str]) -> None:
    assert len(found) == 2, logs
    currents = [r["current_host"] for r in found]
    assert len(set(currents)) == 2, f"SM_CURRENT_HOST must differ: {currents}\n{logs}"
    assert found[0]["hosts"] == found[1]["hosts"] == expected_hosts, found
    assert currents == expected_hosts, found  # node-rank order, hosts[0] the master
    assert [r["sum"] for r in found] == [3.0, 3.0], found
    shards = [set(r["files"]) for r in found]
    assert not shards[0] & shards[1], f"shards overlap: {shards}"
    assert shards[0] | shards[1] == {f"part-{i:02d}.txt" for i in range(OBJECTS)}, shards
    for r in found:
        env = r["env"]
        assert env["current_host"] == r["current_host"] and env["hosts"] == expected_hosts, env
        assert env["master_hostname"] == expected_hosts[0] and env["is_master"] == (
            r["index"] == 0
        ), env
        assert env["network_interface_name"] == "eth0", env
        assert r["num_gpus"] == "0", r
        if r["gloo_ifname"] is not None:
            assert r["gloo_ifname"] == "eth0", r


@pytest.mark.timeout(200)
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_two_pod_like_hosts_get_one_identity(tmp_path, netns_cluster, root_s3, dialect):
    hostnames, names = DIALECTS[dialect]
    cluster = netns_cluster(2, hostnames=hostnames, names=names)
    s3 = root_s3(cluster)
    spec, _, _ = _job(tmp_path, s3)
    procs = [
        cluster.popen(
            i,
            [sys.executable, "-m", "agent", "train", "--job", str(spec)],
            env=agent_env(tmp_path, s3, f"h{i}", **_dialect(dialect, i, cluster)),
            log=tmp_path / f"h{i}.log",
        )
        for i in (1, 2)
    ]
    codes = [p.wait(150) for p in procs]
    logs = [(tmp_path / f"h{i}.log").read_text() for i in (1, 2)]
    assert codes == [0, 0], "\n".join(logs)
    expected = {"torchrun": ["algo-1", "algo-2"]}.get(dialect, hostnames)
    check_identity(results(logs), logs, expected)
    for log, host in zip(logs, expected, strict=False):
        assert f"[{host}:" in log, log  # the log tags carry this host's name
        assert log.count("host names:") <= 1, log
    if dialect == "torchrun":  # names that resolve nowhere were added to each host's /etc/hosts
        for log in logs:
            assert "added to /etc/hosts" in log, log


@pytest.mark.timeout(120)
def test_a_master_that_dies_at_import_ends_the_worker_quickly(tmp_path, netns_cluster, root_s3):
    cluster = netns_cluster(2)
    s3 = root_s3(cluster)
    spec, _, _ = _job(tmp_path, s3)
    procs = []
    for i in (1, 2):
        env = agent_env(
            tmp_path,
            s3,
            f"h{i}",
            DIE_AT_IMPORT_ON="algo-1",
            TORCHBAY_HOST_WAIT_TIMEOUT="300",
            **_dialect("spec", i, cluster),
        )
        procs.append(
            cluster.popen(
                i,
                [sys.executable, "-m", "agent", "train", "--job", str(spec)],
                env=env,
                log=tmp_path / f"h{i}.log",
            )
        )
    master_code = procs[0].wait(100)
    ended = time.monotonic()
    worker_code = procs[1].wait(60)
    elapsed = time.monotonic() - ended
    logs = "\n".join((tmp_path / f"h{i}.log").read_text() for i in (1, 2))
    assert master_code == 1 and worker_code not in (0, None), logs
    assert elapsed < 30, f"the worker took {elapsed:.1f} s after the master ended\n{logs}"
    failure = (tmp_path / "h2" / "ml" / "output" / "failure").read_text()
    assert "host algo-1 failed" in failure and "a_module_that_does_not_exist" in failure, failure


@pytest.mark.timeout(200)
def test_sagemaker_resourceconfig_two_hosts(tmp_path, netns_cluster):
    """On SageMaker the platform wrote the config files and staged each host's shard: the identity
    is resourceconfig.json's, the same script runs, and the exchange still joins the hosts."""
    cluster = netns_cluster(2)
    code = tmp_path / "src"
    code.mkdir()
    (code / "train.py").write_text(SCRIPT.read_text())
    procs = []
    for i, host in enumerate(("algo-1", "algo-2"), start=1):
        root = tmp_path / f"h{i}" / "ml"
        config = root / "input" / "config"
        config.mkdir(parents=True)
        (config / "hyperparameters.json").write_text(
            json.dumps(
                {
                    "sagemaker_program": json.dumps("train.py"),
                    "sagemaker_submit_directory": json.dumps(code.as_uri()),
                }
            )
        )
        (config / "inputdataconfig.json").write_text(
            json.dumps(
                {
                    "train": {
                        "TrainingInputMode": "File",
                        "S3DistributionType": "ShardedByS3Key",
                        "RecordWrapperType": "None",
                    }
                }
            )
        )
        (config / "resourceconfig.json").write_text(
            json.dumps(
                {
                    "current_host": host,
                    "hosts": ["algo-1", "algo-2"],
                    "network_interface_name": "eth0",
                    "current_instance_type": "ml.c5.xlarge",
                    "current_group_name": "homogeneousCluster",
                    "instance_groups": [
                        {
                            "instance_group_name": "homogeneousCluster",
                            "instance_type": "ml.c5.xlarge",
                            "hosts": ["algo-1", "algo-2"],
                        }
                    ],
                }
            )
        )
        data = root / "input" / "data" / "train"
        data.mkdir(parents=True)
        for index in range(i - 1, OBJECTS, 2):  # the platform's shard for this host
            (data / f"part-{index:02d}.txt").write_text(f"{index}\n")
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "TORCHBAY_ROOT": str(root),
            "TORCHBAY_HOST_WAIT_TIMEOUT": "60",
            "TRAINING_JOB_NAME": "sm-job",
        }
        procs.append(
            cluster.popen(
                i, [sys.executable, "-m", "agent", "train"], env=env, log=tmp_path / f"h{i}.log"
            )
        )
    codes = [p.wait(150) for p in procs]
    logs = [(tmp_path / f"h{i}.log").read_text() for i in (1, 2)]
    assert codes == [0, 0], "\n".join(logs)
    check_identity(results(logs), logs, ["algo-1", "algo-2"])
    assert all("names from resourceconfig.json" in log for log in logs), logs

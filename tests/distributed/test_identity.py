"""agent/distributed/identity.py: load_job's one cluster identity, and the interface that routes to
the master."""

from __future__ import annotations

import json

import pytest

from agent.distributed.cluster import discover
from agent.distributed.identity import interface_for, route_interface
from agent.distributed.netenv import SysPaths
from agent.environment import EntryPoint, sm_variables
from agent.job import load_job
from tests.distributed.helpers import make_job


def _spec(tmp_path, count=2):
    return json.dumps(
        {
            "TrainingJobName": "j",
            "HyperParameters": {"sagemaker_program": "train.py"},
            "ResourceConfig": {"InstanceCount": count},
        }
    )


@pytest.mark.parametrize(
    "env, current, hosts",
    [
        (
            {"MASTER_ADDR": "198.18.0.11", "NNODES": "2", "NODE_RANK": "1"},
            "algo-2",
            ["algo-1", "algo-2"],
        ),
        (
            {"MASTER_ADDR": "pt-master-0", "PET_NNODES": "2", "PET_NODE_RANK": "1"},
            "pt-worker-0",
            ["pt-master-0", "pt-worker-0"],
        ),
        (
            {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NODEID": "1", "SLURM_NNODES": "2"},
            "node2",
            ["node1", "node2"],
        ),
        ({"SM_HOSTS": '["a","b"]', "SM_CURRENT_HOST": "b"}, "b", ["a", "b"]),
        ({"TORCHBAY_HOSTS": "x,y", "TORCHBAY_CURRENT_HOST": "y"}, "y", ["x", "y"]),
    ],
)
def test_load_job_resolves_the_identity_once_for_everything(tmp_path, env, current, hosts):
    env = {"TORCHBAY_ROOT": str(tmp_path / "ml"), "TORCHBAY_SOCKET_IFNAME": "eth9", **env}
    job = load_job(env, _spec(tmp_path))
    assert job.cluster is not None and job.cluster.current_host == current
    assert (job.resource.current_host, list(job.resource.hosts), job.resource.host_index) == (
        current,
        hosts,
        1,
    )
    assert job.resource.network_interface_name == "eth9" and job.cluster.interface == "eth9"
    entry = EntryPoint(
        kind="script", name="train.py", path=tmp_path / "train.py", code_dir=tmp_path
    )
    variables = sm_variables(job, entry)
    assert variables["SM_CURRENT_HOST"] == current and json.loads(variables["SM_HOSTS"]) == hosts
    training_env = json.loads(variables["SM_TRAINING_ENV"])
    assert (training_env["master_hostname"], training_env["is_master"]) == (hosts[0], False)
    assert training_env["network_interface_name"] == "eth9"
    assert variables["SM_NUM_GPUS"] == str(job.cluster.num_gpus)


def _sys(tmp_path, route: str, *names: str) -> SysPaths:
    net = tmp_path / "net"
    for name in names:
        (net / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "route").write_text("Iface\tDestination\tGateway\n" + route)
    return SysPaths(net=net, infiniband=tmp_path / "ib", route=tmp_path / "route")


def test_a_multi_host_job_never_gets_the_loopback(tmp_path):
    job = make_job(tmp_path, env={"MASTER_ADDR": "127.0.0.1", "NNODES": "2", "NODE_RANK": "1"})
    cluster = discover(job)
    assert route_interface("127.0.0.1") == "lo"
    sys_paths = _sys(tmp_path, "eth1\t00000000\t0101A8C0\n", "eth1", "lo")
    assert interface_for(
        cluster, wanted=None, configured="eth0", sagemaker=False, sys_paths=sys_paths
    ) == ("eth1", "the default route")
    assert (
        interface_for(
            cluster, wanted="ib0", configured="eth0", sagemaker=False, sys_paths=sys_paths
        )[0]
        == "ib0"
    )
    none = _sys(tmp_path / "none", "", "lo")
    assert (
        interface_for(cluster, wanted=None, configured="eth0", sagemaker=False, sys_paths=none)[0]
        is None
    )


def test_the_route_to_the_master_wins_over_the_default_route(tmp_path, monkeypatch):
    job = make_job(tmp_path, env={"MASTER_ADDR": "198.18.0.11", "NNODES": "2", "NODE_RANK": "1"})
    cluster = discover(job)
    monkeypatch.setattr("agent.distributed.identity.route_interface", lambda addr: "eth7")
    sys_paths = _sys(tmp_path, "eth1\t00000000\t0101A8C0\n", "eth1", "eth7")
    assert interface_for(
        cluster, wanted=None, configured="eth0", sagemaker=False, sys_paths=sys_paths
    ) == ("eth7", "route to the master 198.18.0.11 (198.18.0.11)")

"""Host discovery: every dialect, its order, and Slurm host lists."""

from __future__ import annotations

import pytest

from agent.distributed.cluster import count_gpus, discover, expand_nodelist
from agent.errors import ConfigError
from tests.distributed.helpers import make_job


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("a[1-2],b3,c[5]", ["a1", "a2", "b3", "c5"]),
        ("gpu-[1-2]-x", ["gpu-1-x", "gpu-2-x"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("h1, h2", ["h1", "h2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-04", "node01]", "node[a-b]", "node[4-1]", "", "node[]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_spec_resource_is_the_default(tmp_path):
    cluster = discover(make_job(tmp_path, hosts=("algo-1", "algo-2"), current="algo-2"))
    assert (cluster.source, cluster.hosts, cluster.node_rank, cluster.nnodes) == (
        "spec",
        ("algo-1", "algo-2"),
        1,
        2,
    )
    assert (cluster.master_addr, cluster.master_port, cluster.nproc_per_node) == ("algo-1", 7777, 1)


def test_sagemaker_resourceconfig_wins_over_everything(tmp_path):
    env = {
        "MASTER_ADDR": "x",
        "WORLD_SIZE": "4",
        "RANK": "3",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_NODEID": "1",
    }
    cluster = discover(
        make_job(tmp_path, env=env, hosts=("algo-1", "algo-2"), current="algo-1", on_sagemaker=True)
    )
    assert (cluster.source, cluster.master_addr, cluster.node_rank) == ("sagemaker", "algo-1", 0)


def test_sm_hosts_env(tmp_path):
    env = {"SM_HOSTS": '["algo-1","algo-2","algo-3"]', "SM_CURRENT_HOST": "algo-3"}
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.source, cluster.hosts, cluster.node_rank, cluster.master_addr) == (
        "sm-env",
        ("algo-1", "algo-2", "algo-3"),
        2,
        "algo-1",
    )


@pytest.mark.parametrize(
    "env, match",
    [
        ({"SM_HOSTS": "algo-1,algo-2", "SM_CURRENT_HOST": "algo-1"}, "SM_HOSTS"),
        ({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-9"}, "SM_CURRENT_HOST='algo-9'"),
    ],
)
def test_sm_hosts_errors(tmp_path, env, match):
    with pytest.raises(ConfigError, match=match):
        discover(make_job(tmp_path, env=env))


def test_kubeflow_pytorchjob(tmp_path):
    env = {
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "6",
        "RANK": "2",
        "PET_NNODES": "3",
        "PET_NODE_RANK": "2",
        "PET_NPROC_PER_NODE": "2",
        "HOSTNAME": "job-worker-1",
    }
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.source, cluster.nnodes, cluster.node_rank) == ("kubeflow", 3, 2)
    assert (cluster.master_addr, cluster.master_port, cluster.current_host) == (
        "job-master-0",
        23456,
        "job-worker-1",
    )
    assert (cluster.nproc_per_node, cluster.nproc_source) == (2, "PET_NPROC_PER_NODE")
    assert not cluster.elastic and cluster.hosts == ("job-master-0", "job-worker-0", "job-worker-1")


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_kubeflow_every_host_gets_its_own_name_and_the_same_list(tmp_path, rank):
    env = {"MASTER_ADDR": "job-master-0", "PET_NNODES": "3", "PET_NODE_RANK": str(rank)}
    cluster = discover(make_job(tmp_path, env=env))
    assert cluster.hosts == ("job-master-0", "job-worker-0", "job-worker-1")
    assert (
        cluster.current_host == cluster.hosts[rank]
        and cluster.names_from == "Kubeflow service names"
    )


def test_kubeflow_without_a_master_replica_and_a_loopback_master(tmp_path):
    env = {"MASTER_ADDR": "job-worker-0", "PET_NNODES": "2", "PET_NODE_RANK": "1"}
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.hosts, cluster.current_host) == (
        ("job-worker-0", "job-worker-1"),
        "job-worker-1",
    )
    env = {
        "MASTER_ADDR": "localhost",
        "PET_NNODES": "2",
        "PET_NODE_RANK": "0",
        "HOSTNAME": "job-master-0",
    }
    assert discover(make_job(tmp_path, env=env)).hosts == ("job-master-0", "job-worker-0")


def test_kubeflow_names_that_are_not_service_names_become_algo_n(tmp_path):
    env = {"MASTER_ADDR": "198.18.0.5", "PET_NNODES": "2", "PET_NODE_RANK": "1"}
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.hosts, cluster.current_host, cluster.master_addr) == (
        ("algo-1", "algo-2"),
        "algo-2",
        "198.18.0.5",
    )


def test_kubeflow_rank_fallback_and_default_port(tmp_path):
    env = {"MASTER_ADDR": "m", "RANK": "1", "PET_NNODES": "2"}
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.node_rank, cluster.master_port) == (1, 23456)


def test_kubeflow_elastic(tmp_path):
    env = {
        "PET_RDZV_ENDPOINT": "job-worker-0:29400",
        "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "2:4",
        "PET_MAX_RESTARTS": "5",
        "PET_RDZV_CONF": "read_timeout=120",
    }
    cluster = discover(make_job(tmp_path, env=env))
    assert cluster.elastic and cluster.multi_host and cluster.source == "kubeflow-elastic"
    assert (cluster.nnodes_spec, cluster.nnodes, cluster.max_restarts) == ("2:4", 4, 5)
    assert (cluster.rdzv_endpoint, cluster.rdzv_id, cluster.rdzv_conf) == (
        "job-worker-0:29400",
        "job-1",
        "read_timeout=120",
    )
    assert cluster.hosts == ("algo-1",)  # no HOSTNAME of a worker pod: only this host is known


def test_kubeflow_elastic_host_names_come_from_the_pods(tmp_path):
    for index in (0, 1):
        env = {
            "PET_RDZV_ENDPOINT": "job-worker-0:29400",
            "PET_NNODES": "1:2",
            "HOSTNAME": f"job-worker-{index}",
        }
        cluster = discover(make_job(tmp_path, env=env))
        assert (cluster.hosts, cluster.current_host, cluster.node_rank) == (
            ("job-worker-0", "job-worker-1"),
            f"job-worker-{index}",
            index,
        )


def test_kubeflow_without_master_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        discover(make_job(tmp_path, env={"PET_NNODES": "2", "PET_NODE_RANK": "1"}))


def test_kubeflow_rank_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match="PET_NODE_RANK=2 is outside 0..1"):
        discover(
            make_job(tmp_path, env={"PET_NNODES": "2", "PET_NODE_RANK": "2", "MASTER_ADDR": "m"})
        )


def test_slurm(tmp_path):
    env = {
        "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_NODEID": "2",
        "SLURM_NNODES": "3",
        "SLURM_JOB_ID": "4123456",
    }
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.source, cluster.hosts, cluster.node_rank) == (
        "slurm",
        ("gpu07", "gpu08", "gpu09"),
        2,
    )
    assert (cluster.master_addr, cluster.master_port, cluster.current_host) == (
        "gpu07",
        15000 + 3456,
        "gpu09",
    )


def test_slurm_master_port_and_nodelist_alias(tmp_path):
    env = {
        "SLURM_NODELIST": "n1,n2",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "77",
        "MASTER_PORT": "4000",
    }
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.hosts, cluster.master_port) == (("n1", "n2"), 4000)


def test_slurm_nnodes_mismatch(tmp_path):
    env = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NODEID": "0", "SLURM_NNODES": "2"}
    with pytest.raises(ConfigError, match="SLURM_NNODES=2"):
        discover(make_job(tmp_path, env=env))


def test_torchrun_style(tmp_path):
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511", "WORLD_SIZE": "2", "RANK": "1"}
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.source, cluster.nnodes, cluster.node_rank, cluster.master_port) == (
        "torchrun",
        2,
        1,
        29511,
    )
    assert (cluster.hosts, cluster.current_host, cluster.master_addr) == (
        ("algo-1", "algo-2"),
        "algo-2",
        "10.0.0.1",
    )
    env = {"MASTER_ADDR": "m", "NNODES": "4", "NODE_RANK": "3", "WORLD_SIZE": "16", "RANK": "12"}
    cluster = discover(make_job(tmp_path, env=env))
    assert (cluster.nnodes, cluster.node_rank, cluster.master_port) == (4, 3, 29500)


def test_order_kubeflow_before_slurm_before_torchrun_before_sm_env(tmp_path):
    env = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": "1",
        "MASTER_ADDR": "m",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_NODEID": "0",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "SM_HOSTS": '["a","b"]',
        "SM_CURRENT_HOST": "a",
    }
    assert discover(make_job(tmp_path, env=env)).source == "kubeflow"
    del env["PET_NNODES"], env["PET_NODE_RANK"]
    assert discover(make_job(tmp_path, env=env)).source == "slurm"
    del env["SLURM_JOB_NODELIST"]
    assert discover(make_job(tmp_path, env=env)).source == "torchrun"
    del env["MASTER_ADDR"]
    assert discover(make_job(tmp_path, env=env)).source == "sm-env"


def test_master_port_setting_overrides(tmp_path):
    env = {"MASTER_ADDR": "m", "MASTER_PORT": "1234", "WORLD_SIZE": "2", "RANK": "0"}
    job = make_job(tmp_path, env=env, settings_env={"TORCHBAY_MASTER_PORT": "4321"})
    assert discover(job).master_port == 4321


def test_bad_integers_name_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        discover(make_job(tmp_path, env={"MASTER_ADDR": "m", "WORLD_SIZE": "two"}))


def test_processes_per_host(tmp_path):
    assert discover(make_job(tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1,2"})).nproc_per_node == 3
    assert discover(make_job(tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})).nproc_per_node == 1
    job = make_job(
        tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1"}, settings_env={"TORCHBAY_NPROC_PER_NODE": "5"}
    )
    assert discover(job).nproc_per_node == 5
    job = make_job(tmp_path, hyperparameters={"sagemaker_mpi_num_of_processes_per_host": 2})
    assert discover(job).nproc_per_node == 2


def test_count_gpus_from_dev(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert count_gpus({}, tmp_path) == 2
    assert count_gpus({}, tmp_path / "missing") == 0

"""plan_launch / build_plan: argv shapes, environment precedence, distribution flags."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from agent.distributed import build_plan, discover, plan_launch
from agent.distributed.netenv import SysPaths
from agent.environment import EntryPoint
from agent.errors import ConfigError
from tests.distributed.helpers import make_job

LOG = logging.getLogger("test")


@pytest.fixture
def sys_paths(tmp_path: Path) -> SysPaths:
    """A fake /sys with one interface eth0 and no InfiniBand."""
    net = tmp_path / "sys" / "net"
    (net / "eth0").mkdir(parents=True)
    (net / "lo").mkdir()
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway\nlo\t0000007F\t00000000\neth0\t00000000\t010012C6\n"
    )
    return SysPaths(net=net, infiniband=tmp_path / "sys" / "infiniband", route=route)


def _script(tmp_path: Path) -> EntryPoint:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text("print('hi')\n")
    return EntryPoint(kind="script", name="train.py", path=code / "train.py", code_dir=code)


def _module(tmp_path: Path) -> EntryPoint:
    return EntryPoint(kind="module", name="pkg.train", path=None, code_dir=tmp_path)


def _executable(tmp_path: Path) -> EntryPoint:
    return EntryPoint(kind="executable", name="run.sh", path=tmp_path / "run.sh", code_dir=tmp_path)


def test_one_host_script_is_plain_python(tmp_path, sys_paths):
    entry = _script(tmp_path)
    plan = plan_launch(make_job(tmp_path), entry, ["--epochs", "2"], log=LOG, sys_paths=sys_paths)
    assert plan.argv == (sys.executable, str(entry.path), "--epochs", "2")
    assert dict(plan.env) == {}
    assert (plan.rank_base, plan.nproc_per_node, plan.torchrun_log_dir) == (0, 1, None)


def test_one_host_module_and_executable(tmp_path, sys_paths):
    job = make_job(tmp_path)
    assert plan_launch(job, _module(tmp_path), ["--x", "1"], log=LOG, sys_paths=sys_paths).argv == (
        sys.executable,
        "-m",
        "pkg.train",
        "--x",
        "1",
    )
    assert plan_launch(job, _executable(tmp_path), [], log=LOG, sys_paths=sys_paths).argv == (
        str(tmp_path / "run.sh"),
    )


def test_several_hosts_without_flag_run_one_process_per_host(tmp_path, sys_paths):
    job = make_job(tmp_path, hosts=("algo-1", "algo-2", "algo-3"), current="algo-2")
    entry = _script(tmp_path)
    plan = plan_launch(job, entry, ["--a", "b"], log=LOG, sys_paths=sys_paths)
    assert plan.argv == (sys.executable, str(entry.path), "--a", "b")
    assert plan.env["MASTER_ADDR"] == "algo-1"
    assert plan.env["MASTER_PORT"] == "7777"
    assert (plan.env["RANK"], plan.env["WORLD_SIZE"], plan.env["LOCAL_RANK"]) == ("1", "3", "0")
    assert plan.rank_base == 1 and plan.torchrun_log_dir is None
    assert plan.env["NCCL_SOCKET_IFNAME"] == plan.env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert plan.env["NCCL_IB_DISABLE"] == "1"
    assert plan.env["NCCL_DEBUG"] == "WARN"


def _flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("flag_value", [True, "true", "True", '"true"'])
def test_torchrun_flag_static_rendezvous(tmp_path, sys_paths, flag_value):
    job = make_job(
        tmp_path,
        hosts=("algo-1", "algo-2"),
        current="algo-2",
        hyperparameters={"sagemaker_torch_distributed_enabled": flag_value},
        settings_env={"TORCHBAY_NPROC_PER_NODE": "2"},
    )
    entry = _script(tmp_path)
    plan = plan_launch(job, entry, ["--lr", "0.1"], log=LOG, sys_paths=sys_paths)
    argv = list(plan.argv)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "torchrun" not in argv[0]
    assert _flag_value(argv, "--nnodes") == "2"
    assert _flag_value(argv, "--nproc-per-node") == "2"
    assert _flag_value(argv, "--node-rank") == "1"
    assert _flag_value(argv, "--master-addr") == "algo-1"
    assert _flag_value(argv, "--master-port") == "7777"
    assert _flag_value(argv, "--rdzv-backend") == "static"
    assert _flag_value(argv, "--rdzv-conf") == "timeout=300"
    assert _flag_value(argv, "--max-restarts") == "0"
    assert _flag_value(argv, "--redirects") == "3" and _flag_value(argv, "--tee") == "0"
    assert Path(_flag_value(argv, "--log-dir")) == plan.torchrun_log_dir
    assert argv[-3:] == [str(entry.path), "--lr", "0.1"]
    assert plan.rank_base == 2 and plan.nproc_per_node == 2 and plan.world_size == 4
    assert plan.env["TORCHELASTIC_ERROR_FILE"] == str(plan.error_file)


def test_torchrun_module_and_executable_tails(tmp_path, sys_paths):
    job = make_job(tmp_path, settings_env={"TORCHBAY_TORCHRUN": "true"})
    plan = plan_launch(job, _module(tmp_path), ["--x"], log=LOG, sys_paths=sys_paths)
    assert list(plan.argv[-3:]) == ["-m", "pkg.train", "--x"]
    assert "--standalone" in plan.argv  # one host: a free port, no fixed master port
    plan = plan_launch(job, _executable(tmp_path), [], log=LOG, sys_paths=sys_paths)
    assert list(plan.argv[-2:]) == ["--no-python", str(tmp_path / "run.sh")]


def test_nproc_above_one_implies_torchrun(tmp_path, sys_paths):
    job = make_job(tmp_path, settings_env={"TORCHBAY_NPROC_PER_NODE": "3"})
    plan = plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths)
    assert plan.argv[1:3] == ("-m", "torch.distributed.run") and plan.nproc_per_node == 3


@pytest.mark.parametrize(
    "flag",
    [
        "sagemaker_mpi_enabled",
        "sagemaker_pytorch_ddp_enabled",
        "sagemaker_distributed_dataparallel_enabled",
        "sagemaker_pytorch_xla_multi_worker_enabled",
    ],
)
def test_other_distribution_flags_are_refused(tmp_path, sys_paths, flag):
    job = make_job(tmp_path, hyperparameters={flag: "true"})
    with pytest.raises(ConfigError, match=flag) as err:
        plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths)
    assert "sagemaker_torch_distributed_enabled" in str(err.value)


def test_false_distribution_flags_are_ignored(tmp_path, sys_paths):
    job = make_job(
        tmp_path,
        hyperparameters={
            "sagemaker_mpi_enabled": False,
            "sagemaker_torch_distributed_enabled": "false",
        },
    )
    assert (
        plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths).torchrun_log_dir
        is None
    )


def test_elastic_kubeflow_uses_c10d_with_restarts(tmp_path, sys_paths):
    env = {
        "PET_RDZV_ENDPOINT": "job-worker-0:29400",
        "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "1:4",
        "PET_RDZV_ID": "rid",
        "PET_NPROC_PER_NODE": "2",
    }
    plan = plan_launch(
        make_job(tmp_path, env=env), _script(tmp_path), [], log=LOG, sys_paths=sys_paths
    )
    argv = list(plan.argv)
    assert _flag_value(argv, "--nnodes") == "1:4"
    assert _flag_value(argv, "--rdzv-backend") == "c10d"
    assert _flag_value(argv, "--rdzv-endpoint") == "job-worker-0:29400"
    assert _flag_value(argv, "--rdzv-id") == "rid"
    assert _flag_value(argv, "--max-restarts") == "3"
    assert "join_timeout=300" in _flag_value(argv, "--rdzv-conf")
    assert "--node-rank" not in argv and "--master-addr" not in argv
    env["PET_MAX_RESTARTS"] = "7"
    plan = plan_launch(
        make_job(tmp_path, env=env), _script(tmp_path), [], log=LOG, sys_paths=sys_paths
    )
    assert _flag_value(list(plan.argv), "--max-restarts") == "7"


def test_user_values_win(tmp_path, sys_paths):
    job = make_job(
        tmp_path,
        hosts=("algo-1", "algo-2"),
        env={"NCCL_DEBUG": "INFO"},
        environment={"NCCL_SOCKET_IFNAME": "ens5", "NCCL_IB_DISABLE": "0"},
    )
    plan = plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths)
    for key in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE"):
        assert key not in plan.env
    assert plan.env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_efa_device_sets_efa_and_keeps_ib(tmp_path, sys_paths):
    (sys_paths.infiniband / "rdmap0s6" / "device").mkdir(parents=True)
    driver = tmp_path / "drivers" / "efa"
    driver.mkdir(parents=True)
    (sys_paths.infiniband / "rdmap0s6" / "device" / "driver").symlink_to(driver)
    job = make_job(tmp_path, hosts=("algo-1", "algo-2"), environment={"RDMAV_FORK_SAFE": "0"})
    plan = plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths)
    assert plan.env["FI_PROVIDER"] == "efa" and plan.env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert "RDMAV_FORK_SAFE" not in plan.env  # the user's 0 wins
    assert "NCCL_IB_DISABLE" not in plan.env


def test_infiniband_without_efa(tmp_path, sys_paths):
    (sys_paths.infiniband / "mlx5_0").mkdir(parents=True)
    plan = build_plan(
        make_job(tmp_path, hosts=("a", "b")),
        _script(tmp_path),
        [],
        discover(make_job(tmp_path, hosts=("a", "b"), current="a")),
        sys_paths=sys_paths,
    )
    assert "NCCL_IB_DISABLE" not in plan.env and "FI_PROVIDER" not in plan.env


def test_interface_missing_falls_back_to_default_route(tmp_path, sys_paths):
    (sys_paths.net / "veth-x").mkdir()
    route = sys_paths.route
    route.write_text("Iface\tDestination\tGateway\nveth-x\t00000000\t010012C6\n")
    job = make_job(tmp_path, hosts=("a", "b"), current="a", interface="eth9")
    plan = plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths)
    assert plan.env["GLOO_SOCKET_IFNAME"] == "veth-x"
    job = make_job(
        tmp_path, hosts=("a", "b"), current="a", settings_env={"TORCHBAY_SOCKET_IFNAME": "ib0"}
    )
    assert (
        plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths).env[
            "NCCL_SOCKET_IFNAME"
        ]
        == "ib0"
    )


def test_environment_logged_once(tmp_path, sys_paths, caplog):
    job = make_job(tmp_path, hosts=("algo-1", "algo-2"))
    with caplog.at_level(logging.INFO, logger="test"):
        plan_launch(job, _script(tmp_path), [], log=LOG, sys_paths=sys_paths)
    lines = [r.getMessage() for r in caplog.records if "MASTER_ADDR=" in r.getMessage()]
    assert len(lines) == 1 and "NCCL_IB_DISABLE=1" in lines[0]

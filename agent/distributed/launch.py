"""The launch plan: the command line and environment that start the user's ranks on this host.

* One host, one process: ``[python, script, *args]``, ``[python, -m, module, *args]`` or
  ``[executable, *args]``, nothing added to the environment.
* Several hosts and no distribution flag: the same command once per host, with ``MASTER_ADDR``,
  ``MASTER_PORT``, ``WORLD_SIZE`` (hosts) and ``RANK`` (this host's index), as the SageMaker
  PyTorch toolkit does.
* ``sagemaker_torch_distributed_enabled`` (or ``TORCHBAY_TORCHRUN``, or more than one process per
  host, or an elastic ``PET_RDZV_ENDPOINT``): ``python -m torch.distributed.run`` with static
  rendezvous for a fixed cluster and c10d rendezvous with restarts for an elastic one; every rank
  writes its own files under ``--log-dir`` (``--redirects 3 --tee 0``).
* The other SageMaker distribution flags (MPI, SMDDP, XLA) are refused with a clear error.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.distributed.cluster import Cluster, discover
from agent.distributed.netenv import SysPaths, choose_interface, network_env
from agent.errors import ConfigError, EntryPointError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from agent.environment import EntryPoint
    from agent.job import Job  # agent.job's load_job runs host discovery (this package)

__all__ = [
    "TORCHRUN_FLAG",
    "UNSUPPORTED_FLAGS",
    "LaunchPlan",
    "build_plan",
    "plan_launch",
    "uses_torchrun",
]

TORCHRUN_FLAG = "sagemaker_torch_distributed_enabled"
UNSUPPORTED_FLAGS = {
    "sagemaker_mpi_enabled": "the MPI launcher (mpirun over ssh)",
    "sagemaker_pytorch_ddp_enabled": "the SageMaker data parallel launcher (smddprun)",
    "sagemaker_distributed_dataparallel_enabled": (
        "the SageMaker distributed data parallel library (SMDDP)"
    ),
    "sagemaker_pytorch_xla_multi_worker_enabled": "the PyTorch/XLA multi-worker launcher",
}
_RUNNER = ("-m", "torch.distributed.run")


@dataclass(frozen=True)
class LaunchPlan:
    """How to start this host's ranks."""

    argv: tuple[
        str, ...
    ]  # [sys.executable, script, *args] or [sys.executable, -m, torch.distributed.run, ...]
    env: Mapping[str, str]  # additions to the user environment (MASTER_ADDR, NCCL_*, ...)
    rank_base: int  # global rank of this host's local rank 0
    nproc_per_node: int
    torchrun_log_dir: Path | None  # set when torchrun writes the ranks' files
    host: str = ""  # this host's name, for failure messages
    error_file: Path | None = (
        None  # TORCHELASTIC_ERROR_FILE of the launcher (torchrun) or the single rank
    )
    world_size: int = 1


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().strip('"').lower() in ("1", "true", "yes", "on")


def _entry_command(
    entry: EntryPoint, args: Sequence[str], python: str
) -> tuple[list[str], list[str]]:
    """(the plain command, torchrun's tail: its mode flag, target and args)."""
    kind = entry.kind
    if kind == "script":
        target = str(entry.path or entry.name)
        return [python, target, *args], [target, *args]
    if kind == "module":
        return [python, "-m", entry.name, *args], ["-m", entry.name, *args]
    if kind == "executable":
        target = str(entry.path or entry.name)
        return [target, *args], ["--no-python", target, *args]
    raise EntryPointError(
        f"entry point {entry.name!r} has kind {kind!r}; expected script, module or executable"
    )


def _check_flags(hyperparameters: Mapping[str, Any]) -> bool:
    for name, launcher in UNSUPPORTED_FLAGS.items():
        if _flag(hyperparameters.get(name, False)):
            raise ConfigError(
                f"hyperparameter {name}={hyperparameters[name]!r} asks for {launcher}, which "
                f"TorchBay does not provide; set {TORCHRUN_FLAG}=true to launch through "
                "torch.distributed.run instead"
            )
    return _flag(hyperparameters.get(TORCHRUN_FLAG, False))


def _torchrun_args(cluster: Cluster, job: Job, log_dir: Path) -> list[str]:
    settings = job.settings
    args = [
        "--nproc-per-node",
        str(cluster.nproc_per_node),
        "--monitor-interval",
        f"{settings.distributed.monitor_interval:g}",
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        "--tee",
        "0",
    ]
    if cluster.elastic:
        conf = ",".join(
            c for c in (cluster.rdzv_conf, f"join_timeout={settings.distributed.rdzv_timeout}") if c
        )
        restarts = (
            cluster.max_restarts
            if cluster.max_restarts is not None
            else settings.distributed.max_restarts
        )
        return [
            "--nnodes",
            cluster.nnodes_spec,
            "--rdzv-backend",
            cluster.rdzv_backend,
            "--rdzv-endpoint",
            cluster.rdzv_endpoint or "",
            "--rdzv-id",
            cluster.rdzv_id or job.name,
            "--rdzv-conf",
            conf,
            "--max-restarts",
            str(restarts),
            *args,
        ]
    if cluster.nnodes == 1:
        return ["--standalone", "--nnodes", "1", "--max-restarts", "0", *args]
    return [
        "--nnodes",
        str(cluster.nnodes),
        "--node-rank",
        str(cluster.node_rank),
        "--master-addr",
        cluster.master_addr,
        "--master-port",
        str(cluster.master_port),
        "--rdzv-backend",
        "static",
        "--rdzv-conf",
        f"timeout={settings.distributed.rdzv_timeout}",
        "--max-restarts",
        "0",
        *args,
    ]


def uses_torchrun(job: Job, cluster: Cluster) -> bool:
    """True when this job launches through torch.distributed.run (raises ConfigError for other
    launchers)."""
    return (
        _check_flags(job.hyperparameters)
        or job.settings.distributed.torchrun
        or cluster.elastic
        or (job.settings.distributed.nproc_per_node or 1) > 1
    )


def build_plan(
    job: Job,
    entry: EntryPoint,
    args: Sequence[str],
    cluster: Cluster,
    *,
    python: str = sys.executable,
    sys_paths: SysPaths = SysPaths(),
) -> LaunchPlan:
    """The plan for ``cluster`` (``plan_launch`` without discovery or logging)."""
    settings = job.settings
    wants_torchrun = uses_torchrun(job, cluster)
    plain, tail = _entry_command(entry, args, python)
    if not wants_torchrun and not cluster.multi_host:
        return LaunchPlan(
            argv=tuple(plain),
            env={},
            rank_base=0,
            nproc_per_node=1,
            torchrun_log_dir=None,
            host=cluster.current_host,
        )
    user_env = {**job.base_env, **job.environment}
    if (
        cluster.interface_source
    ):  # chosen once with the cluster identity (agent.distributed.identity)
        interface = cluster.interface
    else:
        interface = choose_interface(
            settings.distributed.socket_ifname, job.resource.network_interface_name, sys_paths
        )
    extra = (
        {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(settings.distributed.nccl_timeout)}
        if settings.distributed.nccl_timeout
        else {}
    )
    env = network_env(
        master_addr=cluster.master_addr,
        master_port=cluster.master_port,
        interface=interface,
        nccl_debug=settings.distributed.nccl_debug,
        user_env=user_env,
        sys_paths=sys_paths,
        extra=extra,
    )
    agent_dir = job.layout.agent_dir
    if not wants_torchrun:
        error_file = agent_dir / f"rank-{cluster.node_rank}-error.json"
        env.update(
            RANK=str(cluster.node_rank),
            WORLD_SIZE=str(cluster.nnodes),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            TORCHELASTIC_ERROR_FILE=str(error_file),
        )
        return LaunchPlan(
            argv=tuple(plain),
            env=env,
            rank_base=cluster.node_rank,
            nproc_per_node=1,
            torchrun_log_dir=None,
            host=cluster.current_host,
            error_file=error_file,
            world_size=cluster.nnodes,
        )
    log_dir = agent_dir / "torchrun"
    error_file = agent_dir / "torchrun-error.json"
    env["TORCHELASTIC_ERROR_FILE"] = str(error_file)
    argv = [python, *_RUNNER, *_torchrun_args(cluster, job, log_dir), *tail]
    rank_base = 0 if cluster.elastic else cluster.node_rank * cluster.nproc_per_node
    return LaunchPlan(
        argv=tuple(argv),
        env=env,
        rank_base=rank_base,
        nproc_per_node=cluster.nproc_per_node,
        torchrun_log_dir=log_dir,
        host=cluster.current_host,
        error_file=error_file,
        world_size=cluster.nnodes * cluster.nproc_per_node,
    )


def plan_launch(
    job: Job,
    entry: EntryPoint,
    args: Sequence[str],
    *,
    log: logging.Logger,
    cluster: Cluster | None = None,
    sys_paths: SysPaths = SysPaths(),
) -> LaunchPlan:
    """Discover the cluster (unless given) and plan this host's launch; logs the outcome once."""
    cluster = cluster or job.cluster or discover(job)
    plan = build_plan(job, entry, args, cluster, sys_paths=sys_paths)
    if plan.torchrun_log_dir is None and not plan.env:
        log.debug("single process on %s", cluster.current_host)
        return plan
    mode = "torch.distributed.run" if plan.torchrun_log_dir else "one process per host"
    log.info(
        "distributed (%s, from %s): host %s is node %d of %s, %d process(es) per host (%s), master "
        "%s:%d; "
        "environment: %s",
        mode,
        cluster.source,
        cluster.current_host,
        cluster.node_rank,
        cluster.nnodes_spec,
        plan.nproc_per_node,
        cluster.nproc_source,
        cluster.master_addr,
        cluster.master_port,
        " ".join(f"{k}={v}" for k, v in sorted(plan.env.items())) or "(nothing added)",
    )
    return plan

"""Host discovery: which hosts take part in the job, which one this is, and where the master
listens.

Sources, in this order (the first that applies wins). Every source yields the whole host list in
node-rank order (``hosts[0]`` is the master) and this host's place in it, so every host of a job
gets a distinct ``current_host`` and the same ``hosts``:

1. SageMaker (``job.on_sagemaker``): ``resourceconfig.json`` as parsed into ``job.resource``.
2. Kubeflow PyTorchJob / torchrun ``PET_*`` variables: elastic when ``PET_RDZV_ENDPOINT`` is set
   (``PET_NNODES`` may be ``min:max``), else ``PET_NNODES`` with ``PET_NODE_RANK`` (or ``RANK``) and
   ``MASTER_ADDR``/``MASTER_PORT``. Names: the training operator's service names
   ``<job>-master-0``, ``<job>-worker-<i>`` (derived from ``MASTER_ADDR``, or from the elastic
   endpoint ``<job>-worker-0`` and this pod's ``HOSTNAME``); ``algo-1..N`` when they cannot
   be derived.
3. Slurm: ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``, ranges like ``node[01-04,07]``) with
   ``SLURM_NODEID``; the port is ``15000 + last 4 digits of SLURM_JOB_ID`` unless
   ``MASTER_PORT`` is set. Names: Slurm's node names.
4. torchrun-style variables for plain ``docker run``: ``MASTER_ADDR`` with ``NNODES``/``NODE_RANK``
   or ``WORLD_SIZE``/``RANK`` (one agent per host). Names: ``algo-1..N`` by node rank (made
   resolvable by the identity exchange, agent/distributed/exchange.py).
5. ``SM_HOSTS`` (a JSON list) with ``SM_CURRENT_HOST``: those names.
6. The job spec's ``ResourceConfig`` (``job.resource``), which is one local host by default:
   ``TORCHBAY_HOSTS``/``TORCHBAY_CURRENT_HOST``, else ``algo-1..N``.

The environment comes from ``job.base_env`` (read once by ``load_job``); nothing here reads
``os.environ``. The master port setting (``TORCHBAY_MASTER_PORT``) overrides every source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError
from agent.settings import check_port

if TYPE_CHECKING:  # an annotation only: agent.job's load_job runs host discovery (this package)
    from agent.job import Job

__all__ = [
    "SAGEMAKER_MASTER_PORT",
    "TORCHRUN_MASTER_PORT",
    "Cluster",
    "count_gpus",
    "discover",
    "expand_nodelist",
]

SAGEMAKER_MASTER_PORT = 7777  # what the SageMaker PyTorch toolkit uses
TORCHRUN_MASTER_PORT = 29500  # torchrun's default
KUBEFLOW_MASTER_PORT = 23456  # the training operator's default "pytorchjob-port"
_SLURM_PORT_BASE = 15000


@dataclass(frozen=True)
class Cluster:
    """The hosts of one job as discovered, and this host's place among them.

    ``hosts`` lists the hosts known by name (all of them, or only the master where the
    orchestrator tells no more); ``nnodes`` is how many hosts take part (``min:max`` text for an
    elastic job in ``nnodes_spec``).
    """

    source: str  # sagemaker | kubeflow | kubeflow-elastic | slurm | torchrun | sm-env | spec
    hosts: tuple[str, ...]
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    current_host: str
    nproc_per_node: int = 1
    elastic: bool = False
    nnodes_spec: str = ""  # "2" or "1:4" (elastic)
    rdzv_backend: str = "static"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_conf: str = ""
    max_restarts: int | None = None
    nproc_source: str = "default"
    extra: Mapping[str, str] = field(default_factory=dict)
    num_gpus: int = (
        0  # GPUs visible on this host (the one counter: SM_NUM_GPUS, processes per host)
    )
    names_from: str = ""  # where the host names come from, for the log and the README
    interface: str | None = None  # NCCL/Gloo sockets' interface (agent.distributed.identity)
    interface_source: str = ""

    @property
    def is_master(self) -> bool:
        return self.node_rank == 0

    @property
    def multi_host(self) -> bool:
        return self.elastic or self.nnodes > 1


_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError("unbalanced '['")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if not match:
        if "[" in item or "]" in item:
            raise ValueError(f"bad brackets in {item!r}")
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    names: list[str] = []
    for part in match.group(1).split(","):
        part = part.strip()
        rng = _RANGE_RE.match(part)
        if not rng:
            raise ValueError(f"bad range {part!r} in {item!r}")
        low, high = rng.group(1), rng.group(2) or rng.group(1)
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in {item!r}")
        if int(high) - int(low) > 100_000:
            raise ValueError(f"range {part!r} is too large")
        for number in range(int(low), int(high) + 1):
            names.append(f"{prefix}{number:0{width}d}")
    # further bracket groups in the suffix (e.g. rack[1-2]-node[01-02])
    return [name + rest for name in names for rest in _expand_one(suffix)] if suffix else names


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (``node[01-04,07],gpu-a[1-2]``) into host names, in order.

    Raises ConfigError naming the list when it is malformed.
    """
    try:
        hosts = [host for item in _split_top(nodelist) for host in _expand_one(item)]
    except ValueError as err:
        raise ConfigError(
            f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm host list: {err}; "
            "expected names such as node[01-04,07]"
        ) from err
    if not hosts:
        raise ConfigError(
            f"SLURM_JOB_NODELIST={nodelist!r} names no hosts; run inside a Slurm allocation"
        )
    return hosts


def count_gpus(env: Mapping[str, str], dev_root: Path = Path("/dev")) -> int:
    """GPUs this host's job may use (the one GPU counter: SM_NUM_GPUS and processes per host).

    ``CUDA_VISIBLE_DEVICES`` when set (capped by the ``/dev/nvidia<N>`` devices when any are seen),
    else the ``/dev/nvidia<N>`` devices.
    """
    try:
        physical = len([p for p in dev_root.iterdir() if re.fullmatch(r"nvidia\d+", p.name)])
    except OSError:
        physical = 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    items = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return min(items, physical) if physical else items


def _int(env: Mapping[str, str], name: str, value: str | None = None) -> int:
    raw = env.get(name) if value is None else value
    try:
        return int(str(raw).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not an integer; set it to a whole number") from None


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    if not env.get(name):
        return default
    port = _int(env, name)
    try:
        check_port(port)
    except ValueError as err:
        raise ConfigError(f"{name}={port} is not a TCP port: {err}") from None
    return port


def _check_rank(source: str, rank: int, nnodes: int, rank_var: str) -> None:
    if nnodes < 1:
        raise ConfigError(f"{source}: the number of hosts is {nnodes}; it must be 1 or more")
    if not 0 <= rank < nnodes:
        raise ConfigError(
            f"{source}: {rank_var}={rank} is outside 0..{nnodes - 1} for {nnodes} hosts; "
            "check the orchestrator's variables"
        )


def _from_resource(job: Job, source: str, port: int) -> Cluster:
    resource = job.resource
    if resource.current_host not in resource.hosts:
        raise ConfigError(
            f"current host {resource.current_host!r} is not among the hosts "
            f"{list(resource.hosts)}; fix resourceconfig.json or the job spec's ResourceConfig"
        )
    names_from = (
        "resourceconfig.json"
        if source == "sagemaker"
        else "TORCHBAY_HOSTS"
        if job.settings.train.hosts
        else "algo-N (the spec's InstanceCount)"
    )
    return Cluster(
        source=source,
        hosts=tuple(resource.hosts),
        node_rank=resource.host_index,
        nnodes=resource.host_count,
        master_addr=resource.hosts[0],
        master_port=port,
        current_host=resource.current_host,
        names_from=names_from,
    )


def _kubeflow(env: Mapping[str, str], job: Job, port_override: int | None) -> Cluster | None:
    nnodes_text = env.get("PET_NNODES", "").strip()
    if env.get("PET_RDZV_ENDPOINT"):
        endpoint = env["PET_RDZV_ENDPOINT"].strip()
        host = endpoint.rsplit(":", 1)[0] if ":" in endpoint else endpoint
        low_high = nnodes_text or "1"
        parts = low_high.split(":")
        max_nodes = _int(env, "PET_NNODES", parts[-1])
        _int(env, "PET_NNODES", parts[0])
        restarts = env.get("PET_MAX_RESTARTS")
        hosts, current, rank, names_from = _elastic_names(
            host, env.get("HOSTNAME", ""), max_nodes, job
        )
        return Cluster(
            source="kubeflow-elastic",
            hosts=hosts,
            node_rank=rank,
            nnodes=max_nodes,
            master_addr=host,
            master_port=port_override or _port(env, "MASTER_PORT", KUBEFLOW_MASTER_PORT),
            current_host=current,
            elastic=True,
            nnodes_spec=low_high,
            rdzv_backend=env.get("PET_RDZV_BACKEND", "c10d") or "c10d",
            rdzv_endpoint=endpoint,
            rdzv_id=env.get("PET_RDZV_ID") or job.name,
            rdzv_conf=env.get("PET_RDZV_CONF", ""),
            max_restarts=_int(env, "PET_MAX_RESTARTS") if restarts else None,
            names_from=names_from,
        )
    if not nnodes_text:
        return None
    nnodes = _int(env, "PET_NNODES")
    rank_var = "PET_NODE_RANK" if env.get("PET_NODE_RANK") else "RANK"
    rank = _int(env, rank_var) if env.get(rank_var) else 0
    _check_rank("Kubeflow PyTorchJob", rank, nnodes, rank_var)
    master = env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR")
    if nnodes > 1 and not master:
        raise ConfigError(
            f"Kubeflow PyTorchJob: PET_NNODES={nnodes} but MASTER_ADDR is not set; "
            "give the job a Master replica or set MASTER_ADDR"
        )
    port = port_override or _port(
        env, "MASTER_PORT" if env.get("MASTER_PORT") else "PET_MASTER_PORT", KUBEFLOW_MASTER_PORT
    )
    master = master or "127.0.0.1"
    hosts, names_from = _kubeflow_names(master, env.get("HOSTNAME", ""), rank, nnodes)
    return Cluster(
        source="kubeflow",
        hosts=hosts,
        node_rank=rank,
        nnodes=nnodes,
        master_addr=master,
        master_port=port,
        current_host=hosts[rank],
        nnodes_spec=str(nnodes),
        names_from=names_from,
    )


def _elastic_names(
    endpoint_host: str, hostname: str, max_nodes: int, job: Job
) -> tuple[tuple[str, ...], str, int, str]:
    """(hosts, current host, index, where the names come from) of an elastic PyTorchJob.

    The operator points ``PET_RDZV_ENDPOINT`` at ``<job>-worker-0``; pod ``<job>-worker-<i>`` is
    host ``i`` of ``max_nodes``. Ranks are assigned by torchrun's rendezvous; the host index is
    the pod's.
    """
    match = re.fullmatch(r"(.+)-worker-(\d+)", hostname)
    if (
        endpoint_host.endswith("-worker-0")
        and match
        and endpoint_host[: -len("-worker-0")] == match.group(1)
    ):
        index = int(match.group(2))
        count = max(max_nodes, index + 1)
        hosts = tuple(f"{match.group(1)}-worker-{i}" for i in range(count))
        return hosts, hostname, index, "Kubeflow pod names (elastic: worker-<i> from HOSTNAME)"
    current = hostname or job.resource.current_host
    return (current,), current, 0, "this pod's HOSTNAME only (elastic, not a <job>-worker-<i> pod)"


def _kubeflow_names(
    master: str, hostname: str, rank: int, nnodes: int
) -> tuple[tuple[str, ...], str]:
    """The PyTorchJob's service names in node-rank order: ``<job>-master-0``, ``<job>-worker-0``,
    ...

    The operator gives ``MASTER_ADDR=<job>-master-0`` (or ``<job>-worker-0`` for a job without a
    Master replica); a master that sees a loopback MASTER_ADDR takes its own pod name.
    """
    if rank == 0 and master in ("localhost", "127.0.0.1") and hostname:
        master = hostname
    if master.endswith("-master-0") and len(master) > len("-master-0"):
        prefix = master[: -len("-master-0")]
        return (
            master,
            *(f"{prefix}-worker-{i}" for i in range(nnodes - 1)),
        ), "Kubeflow service names"
    if master.endswith("-worker-0") and len(master) > len("-worker-0"):
        prefix = master[: -len("-worker-0")]
        return tuple(f"{prefix}-worker-{i}" for i in range(nnodes)), "Kubeflow service names"
    return tuple(
        f"algo-{i}" for i in range(1, nnodes + 1)
    ), "algo-N by node rank (MASTER_ADDR is not a service name)"


def _slurm(env: Mapping[str, str], job: Job, port_override: int | None) -> Cluster | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or not env.get("SLURM_NODEID"):
        return None
    hosts = expand_nodelist(nodelist)
    rank = _int(env, "SLURM_NODEID")
    nnodes = _int(env, "SLURM_NNODES") if env.get("SLURM_NNODES") else len(hosts)
    if nnodes != len(hosts):
        raise ConfigError(
            f"Slurm: SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names "
            f"{len(hosts)} hosts; run the agent once per node (srun --ntasks-per-node=1)"
        )
    _check_rank("Slurm", rank, nnodes, "SLURM_NODEID")
    if port_override:
        port = port_override
    elif env.get("MASTER_PORT"):
        port = _port(env, "MASTER_PORT", TORCHRUN_MASTER_PORT)
    else:
        job_id = re.sub(r"\D", "", env.get("SLURM_JOB_ID", ""))
        port = _SLURM_PORT_BASE + int(job_id[-4:]) if job_id else TORCHRUN_MASTER_PORT
    return Cluster(
        source="slurm",
        hosts=tuple(hosts),
        node_rank=rank,
        nnodes=nnodes,
        master_addr=env.get("MASTER_ADDR") or hosts[0],
        master_port=port,
        current_host=hosts[rank],
        nnodes_spec=str(nnodes),
        names_from="Slurm node names (SLURM_JOB_NODELIST)",
    )


def _torchrun_style(env: Mapping[str, str], job: Job, port_override: int | None) -> Cluster | None:
    master = env.get("MASTER_ADDR")
    if not master:
        return None
    if env.get("NNODES"):
        nnodes, rank_var = _int(env, "NNODES"), "NODE_RANK"
    elif env.get("WORLD_SIZE"):
        nnodes, rank_var = _int(env, "WORLD_SIZE"), "RANK"
    else:
        return None
    rank = _int(env, rank_var) if env.get(rank_var) else 0
    _check_rank("torchrun-style variables", rank, nnodes, rank_var)
    hosts = tuple(f"algo-{i}" for i in range(1, nnodes + 1))
    return Cluster(
        source="torchrun",
        hosts=hosts,
        node_rank=rank,
        nnodes=nnodes,
        master_addr=master,
        master_port=port_override or _port(env, "MASTER_PORT", TORCHRUN_MASTER_PORT),
        current_host=hosts[rank],
        nnodes_spec=str(nnodes),
        names_from=f"algo-N by {rank_var}",
    )


def _sm_env(env: Mapping[str, str], job: Job, port_override: int | None) -> Cluster | None:
    raw_hosts, current = env.get("SM_HOSTS"), env.get("SM_CURRENT_HOST")
    if not raw_hosts or not current:
        return None
    try:
        hosts = json.loads(raw_hosts)
    except json.JSONDecodeError:
        hosts = None
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(
            f"SM_HOSTS={raw_hosts!r} is not a JSON list of host names; "
            'set it like ["algo-1","algo-2"]'
        )
    if current not in hosts:
        raise ConfigError(
            f"SM_CURRENT_HOST={current!r} is not in SM_HOSTS={hosts}; set it to one of them"
        )
    return Cluster(
        source="sm-env",
        hosts=tuple(hosts),
        node_rank=hosts.index(current),
        nnodes=len(hosts),
        master_addr=hosts[0],
        master_port=port_override or SAGEMAKER_MASTER_PORT,
        current_host=current,
        nnodes_spec=str(len(hosts)),
        names_from="SM_HOSTS",
    )


def _nproc(job: Job, env: Mapping[str, str], gpus: int) -> tuple[int, str]:
    setting = job.settings.distributed.nproc_per_node
    if setting:
        return int(setting), "TORCHBAY_NPROC_PER_NODE"
    if env.get("PET_NPROC_PER_NODE", "").strip().isdigit():
        return _int(env, "PET_NPROC_PER_NODE"), "PET_NPROC_PER_NODE"
    hp = job.hyperparameters.get("sagemaker_mpi_num_of_processes_per_host")
    if hp not in (None, ""):
        return _int(
            {}, "sagemaker_mpi_num_of_processes_per_host", str(hp)
        ), "hyperparameter sagemaker_mpi_num_of_processes_per_host"
    if gpus:
        return gpus, "GPUs"
    return 1, "default (no GPU)"


def discover(job: Job, *, dev_root: Path = Path("/dev")) -> Cluster:
    """The cluster this job runs on, from the first source that applies (see the module
    docstring)."""
    env = job.base_env
    port_override = job.settings.distributed.master_port
    cluster: Cluster | None = None
    if job.on_sagemaker:
        cluster = _from_resource(job, "sagemaker", port_override or SAGEMAKER_MASTER_PORT)
    for finder in (_kubeflow, _slurm, _torchrun_style, _sm_env):
        if cluster is None:
            cluster = finder(env, job, port_override)
    if cluster is None:
        cluster = _from_resource(job, "spec", port_override or SAGEMAKER_MASTER_PORT)
    gpus = count_gpus(env, dev_root)
    nproc, nproc_source = _nproc(job, env, gpus)
    return replace(
        cluster,
        nproc_per_node=nproc,
        nproc_source=nproc_source,
        num_gpus=gpus,
        nnodes_spec=cluster.nnodes_spec or str(cluster.nnodes),
    )

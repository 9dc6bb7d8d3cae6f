"""The distributed bootstrap: find the hosts, wait for them, set the NCCL/Gloo environment and plan
the launch through ``torch.distributed.run`` (never a home-made launcher).

Host discovery runs once, in ``load_job`` (agent.distributed.identity): ``job.cluster``. The train
lifecycle calls :func:`start_exchange` at its start, :func:`wait_for_hosts` before the launch, then
:func:`plan_launch`, after a failed run :func:`first_failure`, and at the end ``exchange.close``.
Nothing here imports torch or reads ``os.environ``.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.distributed.cluster import Cluster, discover, expand_nodelist
from agent.distributed.exchange import Exchange
from agent.distributed.failure import first_failure
from agent.distributed.hostsfile import ensure_resolvable
from agent.distributed.launch import LaunchPlan, build_plan, plan_launch, uses_torchrun
from agent.distributed.readiness import wait_until_ready

if TYPE_CHECKING:  # an annotation only: agent.job's load_job runs host discovery (this package)
    from agent.job import Job

__all__ = [
    "Cluster",
    "Exchange",
    "LaunchPlan",
    "build_plan",
    "discover",
    "expand_nodelist",
    "first_failure",
    "peer_reason",
    "plan_launch",
    "start_exchange",
    "wait_for_hosts",
]


def start_exchange(job: Job, *, log: logging.Logger, stop: Any) -> Exchange | None:
    """Start this host's side of the identity exchange (a multi-host, non-elastic job with the
    exchange on); a peer's failure requests ``stop``. None when there is nothing to exchange."""
    cluster = job.cluster or discover(job)
    if not cluster.multi_host or cluster.elastic or not job.settings.distributed.exchange_port:
        return None
    return Exchange(
        cluster,
        job_name=job.name,
        port=job.settings.distributed.exchange_port,
        timeout=job.settings.distributed.host_wait_timeout,
        log=log,
        on_peer_failure=lambda text: stop.request(signal.SIGTERM),
    ).start()


def peer_reason(
    exchange: Exchange | None, host: str, exit_code: int | None, reason: str | None
) -> str | None:
    """The failure reason of a host that a peer's failure stopped: the peer's first, then this
    host's own (left out when it only says that this host was stopped)."""
    if exchange is None or not exchange.peer_failure:
        return reason
    own = ((reason or "").strip().splitlines() or [""])[0]
    text = f"{exchange.peer_failure}\n{host} stopped because of it (exit code {exit_code})"
    if own and "SIGTERM" not in own:
        text += f"; its own report: {own}"
    return text


def wait_for_hosts(
    job: Job,
    *,
    log: logging.Logger,
    cluster: Cluster | None = None,
    exchange: Exchange | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Wait until every host has reported to the master (``exchange``) and make every host name
    resolve; without an exchange, until every host resolves and, on workers of a
    one-process-per-host job, the master accepts connections.

    Under torch.distributed.run a worker does not wait for the master's port here: torchrun's own
    rendezvous waits for it (bounded by ``TORCHBAY_RDZV_TIMEOUT``). Bounded by
    ``TORCHBAY_HOST_WAIT_TIMEOUT``; raises DistributedError naming the hosts still missing, or the
    host that failed. Does nothing for a one-host job.
    """
    cluster = cluster or job.cluster or discover(job)
    if not cluster.multi_host:
        return
    if exchange is not None:
        started = time.monotonic()
        table = exchange.wait_table(should_stop)
        if not table:
            return  # stopped: the caller's stop check says why
        log.info(
            "hosts ready after %.2f s: %s (node %d of %d, master %s:%d, names from %s, "
            "interface %s from %s)",
            time.monotonic() - started,
            ", ".join(f"{h}={table.get(h, '?')}" for h in cluster.hosts),
            cluster.node_rank,
            cluster.nnodes,
            cluster.master_addr,
            cluster.master_port,
            cluster.names_from,
            cluster.interface or "-",
            cluster.interface_source or "-",
        )
        ensure_resolvable(
            cluster.hosts,
            table,
            job=job.name,
            hosts_file=Path(job.settings.distributed.hosts_file),
            log=log,
        )
        return
    master = None
    if not cluster.is_master and not uses_torchrun(job, cluster):
        master = (cluster.master_addr, cluster.master_port)
    hosts = (
        (cluster.master_addr,) if cluster.elastic else cluster.hosts
    )  # elastic: pods come and go
    waited = wait_until_ready(
        hosts, master=master, timeout=job.settings.distributed.host_wait_timeout, log=log
    )
    log.info(
        "hosts ready after %.2f s: %s (master %s:%d)",
        waited,
        ", ".join(cluster.hosts),
        cluster.master_addr,
        cluster.master_port,
    )

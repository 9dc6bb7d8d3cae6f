"""The distributed bootstrap: find the hosts, wait for them, set the NCCL/Gloo environment and plan
the launch through ``torch.distributed.run`` (never a home-made launcher).

The train lifecycle calls :func:`wait_for_hosts`, then :func:`plan_launch`, and after a failed
run :func:`first_failure`. Nothing here imports torch or reads ``os.environ``.
"""

from __future__ import annotations

import logging

from agent.distributed.cluster import Cluster, discover, expand_nodelist
from agent.distributed.failure import first_failure
from agent.distributed.launch import LaunchPlan, build_plan, plan_launch, uses_torchrun
from agent.distributed.readiness import wait_until_ready
from agent.job import Job

__all__ = ["Cluster", "LaunchPlan", "discover", "expand_nodelist", "plan_launch", "build_plan",
           "wait_for_hosts", "first_failure"]


def wait_for_hosts(job: Job, *, log: logging.Logger, cluster: Cluster | None = None) -> None:
    """Wait until every host resolves and, on workers of a one-process-per-host job, the master
    accepts connections.

    Under torch.distributed.run a worker does not wait for the master's port here: torchrun's own
    rendezvous waits for it (bounded by ``TORCHBAY_RDZV_TIMEOUT``) while the worker starts its ranks,
    so the hosts start in parallel instead of one after the other. Bounded by
    ``TORCHBAY_HOST_WAIT_TIMEOUT``; raises DistributedError naming the hosts still missing. Does
    nothing for a one-host job.
    """
    cluster = cluster or discover(job)
    if not cluster.multi_host:
        return
    master = None
    if not cluster.is_master and not uses_torchrun(job, cluster):
        master = (cluster.master_addr, cluster.master_port)
    waited = wait_until_ready(cluster.hosts, master=master, timeout=job.settings.host_wait_timeout, log=log)
    log.info("hosts ready after %.2f s: %s (master %s:%d)", waited, ", ".join(cluster.hosts),
             cluster.master_addr, cluster.master_port)

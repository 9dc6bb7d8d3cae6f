"""The cluster identity: host discovery, run once by ``load_job``, and what it fixes for the whole
job.

``identify(job)`` discovers the cluster (agent.distributed.cluster), picks the network interface
that
routes to the master, and returns the job with ``job.cluster`` set and ``job.resource`` rebuilt from
it (current host, hosts in node-rank order, interface). Staging shards, ``SM_CURRENT_HOST``,
``SM_HOSTS``, ``SM_TRAINING_ENV``, ``SM_NUM_GPUS``, the ``[host:rank]`` tags, the launch and the
choice of the uploading host all read that one object; nothing parses the orchestrator's variables
again.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import threading
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from agent.distributed.cluster import Cluster, discover
from agent.distributed.netenv import SysPaths, choose_interface, default_route_interface

if TYPE_CHECKING:  # an annotation only: agent.job's load_job calls identify
    from agent.job import Job

__all__ = ["identify", "interface_for", "route_interface"]

_RESOLVE_TIMEOUT = 1.0  # seconds: load_job must not hang on a slow resolver
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address
_SYS_PATHS = SysPaths()


def _address(host: str, timeout: float = _RESOLVE_TIMEOUT) -> str | None:
    """The IPv4 address ``host`` resolves to, or None (bounded by ``timeout``)."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    found: list[str] = []

    def _lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
            found.append(str(infos[0][4][0]))
        except (OSError, UnicodeError, IndexError):
            pass

    thread = threading.Thread(target=_lookup, name=f"resolve-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    return found[0] if found else None


def _interface_of(local_addr: str) -> str | None:
    """The interface that holds ``local_addr``: each interface's primary address from the kernel
    (one ioctl each), else every address psutil lists (secondary addresses, other systems)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _index, name in socket.if_nameindex():
                try:
                    reply = fcntl.ioctl(
                        probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
                    )
                except OSError:  # no IPv4 address on it
                    continue
                if socket.inet_ntoa(reply[20:24]) == local_addr:
                    return name
    except OSError:
        pass
    import psutil  # only when the kernel's primary addresses did not have it (~15 ms to import)

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local_addr for a in addrs):
            return name
    return None


def route_interface(address: str) -> str | None:
    """The interface the kernel routes ``address`` through (``ip route get``), None when unroutable.

    A UDP connect() only looks the route up: nothing is sent.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            local = probe.getsockname()[0]
    except OSError:
        return None
    return _interface_of(local)


def interface_for(
    cluster: Cluster,
    *,
    wanted: str | None,
    configured: str | None,
    sagemaker: bool,
    sys_paths: SysPaths = _SYS_PATHS,
    resolve: Callable[[str], str | None] = _address,
) -> tuple[str | None, str]:
    """(interface, why) for NCCL/Gloo sockets: the setting; on SageMaker the resourceconfig's; else
    the
    interface that routes to the master; else the default route's. Never the loopback of a
    multi-host job."""
    if wanted:
        return wanted, "TORCHBAY_SOCKET_IFNAME"
    if (
        not cluster.multi_host
    ):  # one host: the configured interface if it exists, else the default route's
        return choose_interface(None, configured, sys_paths), "one host"
    if sagemaker and configured and (sys_paths.net / configured).exists():
        return configured, "resourceconfig.json"
    address = resolve(cluster.master_addr)
    if address is not None:
        routed = route_interface(address)
        if routed and routed != "lo" and not routed.startswith("lo:"):
            return routed, f"route to the master {cluster.master_addr} ({address})"
    fallback = default_route_interface(sys_paths)
    if fallback and fallback != "lo" and (sys_paths.net / fallback).exists():
        return fallback, "the default route"
    return None, "none found (the libraries choose)"


def identify(job: Job, *, dev_root: Path = Path("/dev"), sys_paths: SysPaths = _SYS_PATHS) -> Job:
    """``job`` with its one cluster identity (``job.cluster``) and a ``resource`` that agrees with
    it."""
    cluster = discover(job, dev_root=dev_root)
    interface, why = interface_for(
        cluster,
        wanted=job.settings.distributed.socket_ifname,
        configured=job.resource.network_interface_name,
        sagemaker=job.on_sagemaker,
        sys_paths=sys_paths,
    )
    cluster = replace(cluster, interface=interface, interface_source=why)
    if job.on_sagemaker:  # resourceconfig.json is the platform's: kept as written
        return replace(job, cluster=cluster)
    resource = job.resource
    groups = (
        tuple(
            types.MappingProxyType({**g, "hosts": list(cluster.hosts)})
            for g in resource.instance_groups
        )
        if len(resource.instance_groups) <= 1
        else resource.instance_groups
    )
    chosen = interface if cluster.multi_host and interface else resource.network_interface_name
    resource = replace(
        resource,
        current_host=cluster.current_host,
        hosts=cluster.hosts,
        network_interface_name=chosen,
        instance_groups=groups,
    )
    return replace(job, resource=resource, cluster=cluster)

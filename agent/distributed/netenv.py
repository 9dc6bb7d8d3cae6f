"""The NCCL/Gloo/EFA environment of a distributed run.

``MASTER_ADDR``/``MASTER_PORT``; ``NCCL_SOCKET_IFNAME``/``GLOO_SOCKET_IFNAME`` from the network
interface; ``NCCL_DEBUG``; ``NCCL_IB_DISABLE=1`` without InfiniBand; the EFA settings
(``FI_PROVIDER=efa``, ``FI_EFA_USE_DEVICE_RDMA=1``, ``RDMAV_FORK_SAFE=1``) with an EFA device.
A variable the user set (in the agent's environment or the job spec's Environment) always wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SysPaths",
    "choose_interface",
    "default_route_interface",
    "has_efa",
    "infiniband_devices",
    "network_env",
]

EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "RDMAV_FORK_SAFE": "1"}


@dataclass(frozen=True)
class SysPaths:
    """Where the kernel's views live (moved under a temporary folder by tests)."""

    net: Path = Path("/sys/class/net")
    infiniband: Path = Path("/sys/class/infiniband")
    route: Path = Path("/proc/net/route")


def _exists(sys_paths: SysPaths, name: str) -> bool:
    return bool(name) and (sys_paths.net / name).exists()


def default_route_interface(sys_paths: SysPaths = SysPaths()) -> str | None:
    """The interface of the default route (``/proc/net/route``), None without one."""
    try:
        lines = sys_paths.route.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000" and fields[0] != "lo":
            return fields[0]
    return None


def choose_interface(
    wanted: str | None, configured: str | None, sys_paths: SysPaths = SysPaths()
) -> str | None:
    """The interface for NCCL/Gloo sockets: the setting, else the resourceconfig's if it exists
    here, else the default route's; None when none exists (the libraries then pick one
    themselves)."""
    if wanted:
        return wanted
    if configured and _exists(sys_paths, configured):
        return configured
    fallback = default_route_interface(sys_paths)
    return fallback if fallback and _exists(sys_paths, fallback) else None


def infiniband_devices(sys_paths: SysPaths = SysPaths()) -> list[str]:
    """Names under /sys/class/infiniband (empty when there is none)."""
    try:
        return sorted(p.name for p in sys_paths.infiniband.iterdir())
    except OSError:
        return []


def has_efa(sys_paths: SysPaths = SysPaths()) -> bool:
    """True when an InfiniBand device is an AWS EFA device (its name or its driver says efa)."""
    for name in infiniband_devices(sys_paths):
        if name.startswith("efa"):
            return True
        driver = sys_paths.infiniband / name / "device" / "driver"
        try:
            if driver.resolve().name == "efa":
                return True
        except OSError:
            continue
    return False


def network_env(
    *,
    master_addr: str,
    master_port: int,
    interface: str | None,
    nccl_debug: str | None,
    user_env: Mapping[str, str],
    sys_paths: SysPaths = SysPaths(),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables to add for a distributed run, minus every one the user already set."""
    wanted: dict[str, str] = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    if interface:
        wanted["NCCL_SOCKET_IFNAME"] = interface
        wanted["GLOO_SOCKET_IFNAME"] = interface
    if nccl_debug:
        wanted["NCCL_DEBUG"] = nccl_debug
    if has_efa(sys_paths):
        wanted.update(EFA_ENV)
    elif not infiniband_devices(sys_paths):
        wanted["NCCL_IB_DISABLE"] = "1"
    wanted.update(extra or {})
    return {key: value for key, value in wanted.items() if key not in user_env}

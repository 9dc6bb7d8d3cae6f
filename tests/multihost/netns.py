"""A few "hosts" on one Linux machine: one network namespace per host, joined by a bridge.

Topology (every name carries a random tag so parallel runs never collide)::

    root ns: tb<tag>r 198.18.X.1/24 ──┐                 (a second moto server binds here)
                                    [br0 198.18.X.254 in ns tb<tag>sw]
    ns tb<tag>h1: eth0 198.18.X.11 ──┤
    ns tb<tag>h2: eth0 198.18.X.12 ──┘

The bridge lives in its own namespace, so the root namespace's firewall (Docker's FORWARD
DROP with br_netfilter) never sees host-to-host traffic.

Hosts look like pods or nodes: each command runs in its own UTS namespace with the host's own
hostname (``unshare --uts``), each host has a default route (via 198.18.X.254 on the bridge, in a
namespace that forwards nothing, so no packet can leave the machine), and name resolution is
``/etc/netns/<ns>/hosts`` (bind-mounted over /etc/hosts by ``ip netns exec``, writable like a pod's)
with a ``resolv.conf`` pointing at 127.0.0.1, so a name that is not listed fails to resolve at once
and no query leaves the machine. ``names="all"`` lists every host's name in every hosts file (a
Slurm cluster's hosts file, or what a cluster DNS resolves); ``names="own"`` lists only the host's
own name, as Kubernetes writes a pod's /etc/hosts.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def netns_permitted() -> str | None:
    """None when this process may create network namespaces, else the reason it may not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"tbprobe{uuid.uuid4().hex[:6]}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` is not permitted here: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _free_subnet() -> int:
    used = _ip("-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    for _ in range(200):
        octet = random.randint(1, 254)
        if f"198.18.{octet}." not in used:
            return octet
    raise RuntimeError("no free 198.18.X.0/24 subnet found")


@dataclass
class Host:
    name: str  # its hostname (algo-N unless given)
    ns: str
    addr: str


@dataclass
class NetnsCluster:
    """Namespaces, veths, a bridge and /etc/netns entries; ``close()`` removes every one of them."""

    count: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: list[Host] = field(default_factory=list)
    root_addr: str = ""
    extra_names: Mapping[str, str] = field(default_factory=dict)
    hostnames: Sequence[str] = ()  # one per host; default algo-1..N
    names: str = (
        "all"  # "all": every hosts file lists every host; "own": each lists only its own name
    )
    gateway: str = ""
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _made_ns: list[str] = field(default_factory=list)

    @property
    def switch_ns(self) -> str:
        return f"tb{self.tag}sw"

    @property
    def root_link(self) -> str:
        return f"tb{self.tag}r"

    def open(self) -> NetnsCluster:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made_ns.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        octet = _free_subnet()
        prefix = f"198.18.{octet}"
        self.root_addr = f"{prefix}.1"
        self._add_ns(self.switch_ns)
        _ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch_ns, "link", "set", "br0", "up")
        self.gateway = (
            f"{prefix}.254"  # the hosts' default gateway: a dead end (the switch forwards nothing)
        )
        _ip("-n", self.switch_ns, "addr", "add", f"{self.gateway}/24", "dev", "br0")
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", f"tb{self.tag}q")
        _ip("link", "set", f"tb{self.tag}q", "netns", self.switch_ns)
        _ip("-n", self.switch_ns, "link", "set", f"tb{self.tag}q", "master", "br0", "up")
        _ip("addr", "add", f"{self.root_addr}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        for index in range(1, self.count + 1):
            name = self.hostnames[index - 1] if self.hostnames else f"algo-{index}"
            host = Host(name=name, ns=f"tb{self.tag}h{index}", addr=f"{prefix}.{10 + index}")
            self._add_ns(host.ns)
            inner, outer = f"tb{self.tag}a{index}", f"tb{self.tag}b{index}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", host.ns)
            _ip("-n", host.ns, "link", "set", inner, "name", "eth0")
            _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            _ip("-n", host.ns, "route", "add", "default", "via", self.gateway)
            _ip("link", "set", outer, "netns", self.switch_ns)
            _ip("-n", self.switch_ns, "link", "set", outer, "master", "br0", "up")
            self.hosts.append(host)
        for host in self.hosts:
            lines = ["127.0.0.1 localhost", f"{self.root_addr} s3-endpoint"]
            lines += [f"{h.addr} {h.name}" for h in self.hosts if self.names == "all" or h is host]
            lines += [f"{addr} {name}" for name, addr in self.extra_names.items()]
            etc = NETNS_ETC / host.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(lines) + "\n")
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self._wait_links()

    def _wait_links(self) -> None:
        """Until host 1 can ping the root address (bridge ports take a moment to forward)."""
        if shutil.which("ping") is None:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = all(
                subprocess.run(
                    ["ip", "netns", "exec", h.ns, "ping", "-c", "1", "-W", "1", self.root_addr],
                    capture_output=True,
                    timeout=10,
                    check=False,
                ).returncode
                == 0
                for h in self.hosts
            )
            if ok:
                return
            time.sleep(0.2)
        raise RuntimeError(f"namespaces of {self.tag} cannot reach {self.root_addr}")

    def popen(
        self,
        index: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        """Start ``argv`` in host ``index``'s namespace (1-based), in its own session, output to
        ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.command(index, argv),
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )
        self._procs.append(proc)
        return proc

    def command(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` as run on host ``index`` (1-based): its network namespace and own hostname."""
        host = self.hosts[index - 1]
        return [
            "ip",
            "netns",
            "exec",
            host.ns,
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            host.name,
            *argv,
        ]

    def kill_host(self, index: int) -> None:
        """SIGKILL every process in host ``index``'s namespace (a host that dies)."""
        self._kill_ns(self.hosts[index - 1].ns)

    def _kill_ns(self, ns: str) -> None:
        for _ in range(5):
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._made_ns):
            self._kill_ns(ns)
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made_ns.clear()
        _ip("link", "del", self.root_link, check=False)

"""A real, tiny Slurm cluster over the network-namespace hosts of tests/multihost/netns.py.

Debian's slurm-wlm and munge: munged and slurmctld in the root namespace (slurmctld bound to the
root side of the test link), one slurmd per namespace host, started inside that host's network and
UTS namespace with ``-N <node>``. Everything (config, keys, sockets, spools, logs, pid files) lives
under one temporary folder; ``close()`` stops every daemon it started, by pid, and leaves nothing.
No cgroups: ``proctrack/linuxproc``, ``task/none``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.multihost.netns import NetnsCluster

BINARIES = ("munged", "slurmctld", "slurmd", "srun", "sinfo")


def slurm_missing() -> str | None:
    """None when Slurm and munge are installed (installing them first when CI=true), else why
    not."""
    missing = [
        b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()
    ]
    if missing and os.environ.get("CI") == "true":
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(
            ["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False
        )
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"],
            env=env,
            capture_output=True,
            timeout=900,
            check=False,
        )
        missing = [
            b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()
        ]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm "
            "munge, "
            "or run with CI=true to let the test install them"
        )
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    """munged + slurmctld + one slurmd per host of ``net``; ``srun_command`` builds a job step's
    argv."""

    net: NetnsCluster
    work: Path
    partition: str = "tb"
    _daemons: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.work / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

    def open(self, timeout: float = 60.0) -> SlurmCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.work / log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        self._daemons.append(proc)
        return proc

    def _start(self, timeout: float) -> None:
        work = self.work
        for sub in ("munge", "state", "spool"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(work / "munge", 0o700)
        key = work / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        munge_socket = work / "munge" / "munge.socket"
        self._spawn(
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--pid-file={work / 'munge' / 'munged.pid'}",
                f"--seed-file={work / 'munge' / 'seed'}",
                f"--log-file={work / 'munge' / 'munged.log'}",
            ],
            "munged.out",
        )
        ctl_port, node_port = _free_port(), _free_port()
        me = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={h.name} NodeAddr={h.addr} CPUs={os.cpu_count() or 1} RealMemory=100 "
            "State=UNKNOWN"
            for h in self.net.hosts
        )
        self.conf.write_text(f"""ClusterName=tb{self.net.tag}
SlurmctldHost={me}({self.net.root_addr})
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={work / "state"}
SlurmdSpoolDir={work / "spool"}/%n
SlurmctldPidFile={work / "slurmctld.pid"}
SlurmdPidFile={work / "slurmd-%n.pid"}
SlurmctldLogFile={work / "slurmctld.log"}
SlurmdLogFile={work / "slurmd-%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/linear
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=5
{nodes}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (work / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n"
        )  # loaded, never used
        deadline = time.monotonic() + timeout
        while not munge_socket.exists():
            self._check_alive(deadline, "munged")
            time.sleep(0.05)
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for index, host in enumerate(self.net.hosts, start=1):
            (work / "spool" / host.name).mkdir(exist_ok=True)
            # `ip netns exec` mounts a fresh /sys without /sys/fs/cgroup, which slurmd probes at
            # start even
            # without cgroup plugins: mount one in the host's private mount namespace.
            mount = 'mountpoint -q /sys/fs/cgroup || mount -t tmpfs none /sys/fs/cgroup; exec "$@"'
            self._spawn(
                self.net.command(
                    index,
                    [
                        "sh",
                        "-c",
                        mount,
                        "sh",
                        _sbin("slurmd"),
                        "-D",
                        "-N",
                        host.name,
                        "-f",
                        str(self.conf),
                    ],
                ),
                f"slurmd-{host.name}.out",
            )
        self._wait_idle(deadline)

    def _check_alive(self, deadline: float, what: str) -> None:
        for proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"a Slurm daemon exited with {proc.returncode} ({proc.args[0]}); "
                    f"see {self.work}: {self.logs()}"
                )
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"Slurm did not become ready ({what}); see {self.work}: {self.logs()}"
            )

    def _wait_idle(self, deadline: float) -> None:
        names = {h.name for h in self.net.hosts}
        while True:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            idle = {
                line.split()[0]
                for line in out.splitlines()
                if len(line.split()) == 2 and line.split()[1] == "idle"
            }
            if names <= idle:
                return
            self._check_alive(
                deadline, f"nodes idle: {sorted(idle)} of {sorted(names)}; sinfo: {out.strip()!r}"
            )
            time.sleep(0.1)

    def srun_command(self, *argv: str, nodes: int = 2) -> list[str]:
        """srun of ``argv`` with one task per node, as started on the first host (a login/compute
        node)."""
        return self.net.command(
            1,
            [
                "srun",
                f"--nodes={nodes}",
                "--ntasks-per-node=1",
                f"--partition={self.partition}",
                "--export=ALL",
                "--kill-on-bad-exit=0",
                *argv,
            ],
        )

    def logs(self) -> str:
        texts = []
        for path in sorted(self.work.glob("*.log")) + sorted(self.work.glob("*.out")):
            texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(texts)

    def close(self) -> None:
        for proc in reversed(self._daemons):  # slurmd first, munged last
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self._daemons.clear()

"""The user's command's guard: the leader of its process group, so nothing it starts outlives the
agent.

:func:`spawn` forks the guard from the agent itself (no interpreter of its own to start: the fork
is a copy of the agent, and it only makes system calls). The guard

- starts a new session (so its own process group), marks itself a child subreaper, so descendants
  whose parent exits (``setsid`` daemons included) become its children instead of PID 1's, and asks
  the kernel for SIGTERM when the agent (its parent) dies, SIGKILL included;
- forks and execs the command (in the guard's process group), reaps every child, and exits as the
  command did (same code, same signal); if the guard itself is SIGKILLed (the agent's group SIGKILL
  reaches the command too), the agent, a subreaper as well, finds what is left at its stop;
- when the agent dies: SIGKILLs every descendant it can find, writes the failure file if it does
  not exist, and exits.

Signals sent to the group by the agent (SIGTERM, SIGINT) reach the command directly; the guard
ignores them. Every way out of the forked guard is ``os._exit``: it never runs the agent's exit
handlers or flushes the agent's buffers.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn, Protocol

__all__ = ["Libc", "load_libc", "prctl", "spawn"]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_CANNOT_START = 127


class Libc(Protocol):
    """The part of the C library the guard calls (``ctypes.CDLL``)."""

    def prctl(self, option: int, arg2: int, arg3: int, arg4: int, arg5: int) -> int: ...


def load_libc() -> Libc | None:
    """The C library for prctl, or None where there is none (not Linux)."""
    try:
        import ctypes  # a few ms: only once a guarded command starts

        libc: Libc = ctypes.CDLL(None, use_errno=True)
        return libc
    except (ImportError, OSError):
        return None


def prctl(libc: Libc | None, option: int, value: int) -> None:
    if libc is not None:
        try:
            libc.prctl(option, value, 0, 0, 0)
        except AttributeError:  # a C library without prctl: the other safeguards still hold
            pass


class _AgentGone(Exception):
    pass


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None,
    stdout: int | None,
    stderr: int | None,
    failure_file: Path | None,
    libc: Libc | None,
) -> int:
    """Fork the guard, which runs ``argv`` (``env``, ``cwd``; stdin /dev/null; ``stdout`` and
    ``stderr`` file descriptors, None to inherit); returns the guard's PID, the group's ID.

    Call from the main thread: the kernel's parent-death signal follows the thread that forked.
    """
    agent = os.getpid()
    args = [os.fsencode(a) for a in argv]
    environ = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    pid = os.fork()
    if pid:
        return pid
    try:
        _guard(agent, args, environ, cwd, stdout, stderr, failure_file, libc)
    except BaseException:  # the forked agent copy never returns into the agent's code
        pass
    os._exit(_CANNOT_START)


def _guard(
    agent: int,
    argv: list[bytes],
    env: dict[bytes, bytes],
    cwd: Path | None,
    stdout: int | None,
    stderr: int | None,
    failure_file: Path | None,
    libc: Libc | None,
) -> NoReturn:
    me = os.getpid()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if os.getppid() != agent:
            raise _AgentGone()

    for signum in _WATCHED:
        signal.signal(signum, on_signal)
    signal.set_wakeup_fd(-1)  # a wakeup descriptor of the agent's is about to be closed
    os.setsid()
    _plumb(stdout, stderr)
    if cwd is not None:
        os.chdir(cwd)
    try:
        prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
        prctl(libc, PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != agent:  # it died before the parent-death signal was armed
            raise _AgentGone()
        child = os.fork()
        if child == 0:
            _exec(argv, env)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                _exit_like(status)
    except _AgentGone:
        if os.getpid() != me:  # the command, before its exec
            os._exit(128 + signal.SIGKILL)
        _kill_all(me)
        _write_failure(failure_file, agent)
        os._exit(128 + signal.SIGKILL)


def _plumb(stdout: int | None, stderr: int | None) -> None:
    """stdin from /dev/null, the given stdout and stderr, every other descriptor closed."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, target in ((stdout, 1), (stderr, 2)):
        if fd is not None and fd != target:
            os.dup2(fd, target)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        os.closerange(3, 65536)
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, already closed
                pass


def _exec(argv: list[bytes], env: dict[bytes, bytes]) -> NoReturn:
    try:
        for signum in _WATCHED:
            signal.signal(signum, signal.SIG_DFL)
        os.execvpe(argv[0], argv, env)
    except OSError as err:
        name = os.fsdecode(argv[0])
        os.write(2, f"torchbay: cannot start {name!r}: {err.strerror}\n".encode())
    os._exit(_CANNOT_START)


def _descendants(root: int) -> list[int]:
    """PIDs under ``root`` in the process tree (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def _kill_all(me: int) -> None:
    """SIGKILL every descendant (a subreaper gets the orphans, so the tree holds them all) until
    none is left."""
    for _ in range(200):
        pids = _descendants(me)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:  # reap what died
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        if not pids:
            return
        time.sleep(0.01)


def _write_failure(path: Path | None, agent: int) -> None:
    if path is None or path.exists():
        return
    text = (
        f"The TorchBay agent (PID {agent}) died while the training script ran (killed, or out of "
        "memory); the script and every process it started were stopped. Nothing was uploaded at "
        "the end.\n"
    )
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _exit_like(status: int) -> NoReturn:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, ValueError, OSError):
            pass
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))

"""Running the user's command: its own session and process group, signals forwarded, a deadline,
exit codes.

``ProcessGroup.start`` starts the command; ``supervise`` waits for it while watching a stop request
(SIGTERM/SIGINT to the agent, set by ``StopRequest``) and a deadline (MaxRuntimeInSeconds). Either
sends SIGTERM to the whole group, then SIGKILL after the grace period. The result carries the
child's exit code, 128+N when a signal N ended it.

With ``guard=True`` (the training script) the command runs under the guard (agent/_guard.py), a
fork of the agent that leads the group: it is a child subreaper with PR_SET_PDEATHSIG, so when the
agent dies however it dies (SIGKILL included) every process the command started, ``setsid`` ones
too, is killed. The agent is a child subreaper too: processes that left the group are found at a
normal stop by the tag the command's environment carries (``TORCHBAY_PROCESS_TAG``), logged by PID
and command, and stopped. :func:`check_command_size` refuses a command line Linux would refuse
(E2BIG), naming the hyperparameter that made it too big.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from agent import _guard
from agent.errors import EntryPointError, JobSpecError

if TYPE_CHECKING:
    import psutil

__all__ = [
    "MAX_ARG_STRLEN",
    "ProcessGroup",
    "RunResult",
    "StopRequest",
    "check_command_size",
    "exit_code_of",
    "supervise",
]

# Linux: the longest single argument or NAME=value string exec accepts (with its NUL)
MAX_ARG_STRLEN = 32 * 4096
TAG_VARIABLE = "TORCHBAY_PROCESS_TAG"

_POLL = 0.1
_SIGTERM = signal.SIGTERM  # the method ProcessGroup.signal hides the module inside the class body


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


class StopRequest:
    """A stop asked for by a signal. The handler only records it; the supervising loop acts on
    it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> StopRequest:
        """Install handlers (main thread only); ``restore`` puts the previous ones back."""
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if ``signum`` had arrived (the first one wins)."""
        if self.signum is None:
            self.signum = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def event(self) -> threading.Event:
        """Set once a stop is asked: for a wait or a download that takes an event to end on."""
        return self._event

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


@dataclass(frozen=True)
class RunResult:
    """How the user's command ended.

    ``exit_code`` is the child's (128+N for signal N); ``stopped_by`` is None, ``"signal"`` (the
    agent got
    SIGTERM/SIGINT; ``signum`` says which) or ``"max_runtime"``; ``killed`` is True when the grace
    period ran
    out and SIGKILL was sent.
    """

    exit_code: int
    stopped_by: str | None = None
    signum: int | None = None
    killed: bool = False
    duration: float = 0.0


Output = int | IO[bytes] | None


class _Child(Protocol):
    """What ProcessGroup needs of the started leader: a ``subprocess.Popen`` or a forked guard."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class _Forked:
    """The guard forked by agent/_guard.py, waited for like a ``subprocess.Popen``: ``poll`` and
    ``wait`` return the return code, -N for signal N; ``wait`` raises TimeoutExpired.

    ``wait`` with a timeout sleeps on a pidfd (readable once the guard exited) so the agent wakes
    the moment the script ends instead of at its next poll; where pidfd_open is missing (Linux
    before 5.3) it polls, backing off to 50 ms."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._pidfd: int | None = None  # -1: none to be had here
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self._pid, flags)
            except ChildProcessError:  # reaped elsewhere: its status is lost (as Popen says, 0)
                pid, status = self._pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                if self._pidfd is not None and self._pidfd >= 0:
                    os.close(self._pidfd)
                self._pidfd = -1
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            code = self._reap(0)
            assert code is not None
            return code
        code = self._reap(os.WNOHANG)
        if code is not None:
            return code
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self._pid)
            except (AttributeError, OSError):  # no pidfd_open in this Python or this kernel
                self._pidfd = -1
        if self._pidfd >= 0:
            waiter = select.poll()
            waiter.register(self._pidfd, select.POLLIN)
            waiter.poll(max(0.0, timeout) * 1000)
            code = self._reap(os.WNOHANG)
            if code is None:
                raise subprocess.TimeoutExpired(["guard", str(self._pid)], timeout)
            return code
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            code = self._reap(os.WNOHANG)
            if code is not None:
                return code
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(["guard", str(self._pid)], timeout)
            delay = min(delay * 2, left, 0.05)
            time.sleep(delay)


class ProcessGroup:
    """One command in a new session (so its own process group), with an explicit environment."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None = None,
        stdout: Output = None,
        stderr: Output = None,
        guard: bool = False,
        failure_file: Path | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self._stdout = stdout
        self._stderr = stderr
        self._guard = guard
        self._failure_file = failure_file
        self._log = log or logging.getLogger("torchbay")
        self._tag = os.urandom(16).hex()
        self._proc: _Child | None = None
        self.started_at: float | None = None

    def start(self) -> ProcessGroup:
        """Start the command; raises EntryPointError when it cannot be executed at all.

        Must be called from the main thread when ``guard`` is set: the kernel's parent-death signal
        follows the thread that forked.
        """
        env = dict(self._env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self._guard:
            self._check_executable(env)
            env[TAG_VARIABLE] = self._tag
            libc = _guard.load_libc()
            self._proc = _Forked(
                _guard.spawn(
                    self.argv,
                    env=env,
                    cwd=self._cwd,
                    stdout=_fd_of(self._stdout),
                    stderr=_fd_of(self._stderr),
                    failure_file=self._failure_file,
                    libc=libc,
                )
            )
            self.started_at = time.monotonic()
            # Orphans that leave the guard's tree reach the agent, not PID 1: found at the stop.
            _guard.prctl(libc, _guard.PR_SET_CHILD_SUBREAPER, 1)
            return self
        try:
            self._proc = subprocess.Popen(
                self.argv,
                env=env,
                cwd=str(self._cwd) if self._cwd else None,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=self._stderr,
                start_new_session=True,
                close_fds=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as err:
            raise EntryPointError(
                f"cannot start {self.argv[0]!r}: {err.strerror or err}; check the entry point and "
                "its permissions"
            ) from err
        self.started_at = time.monotonic()
        return self

    def _check_executable(self, env: Mapping[str, str]) -> None:
        """What Popen would have said about ``argv[0]`` and the folder, said before the guard runs
        it."""
        program = self.argv[0]
        if self._cwd is not None and not os.path.isdir(self._cwd):
            raise EntryPointError(
                f"cannot start {program!r} in {str(self._cwd)!r}: No such directory; check the "
                "code folder"
            )
        if os.sep in program:
            full = (
                program if os.path.isabs(program) else os.path.join(str(self._cwd or "."), program)
            )
            if not os.path.exists(full):
                raise EntryPointError(
                    f"cannot start {program!r}: No such file or directory; check the entry point "
                    "and its permissions"
                )
            if os.path.isdir(full) or not os.access(full, os.X_OK):
                raise EntryPointError(
                    f"cannot start {program!r}: Permission denied; check the entry point and its "
                    "permissions"
                )
        elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
            raise EntryPointError(
                f"cannot start {program!r}: No such file or directory; check the entry point and "
                "its permissions"
            )

    def stop_strays(self, grace: float) -> list[str]:
        """Stop the processes this command started that left its group (``setsid``, double forks)
        and are still
        running; each is logged by PID and command. Returns their descriptions."""
        if not self._guard:
            return []
        strays = _tagged_processes(self._tag)
        if not strays:
            return []
        described = []
        for proc in strays:
            try:
                what = f"PID {proc.pid} ({' '.join(proc.cmdline())[:200] or proc.name()})"
            except Exception:  # psutil.Error: it ended meanwhile
                what = f"PID {proc.pid}"
            described.append(what)
            self._log.warning(
                "%s was started by the training script, left its process group and was still "
                "running after it ended; stopping it",
                what,
            )
            try:
                proc.terminate()
            except Exception:  # psutil.NoSuchProcess: already gone
                pass
        import psutil  # ~8 ms: only once strays outlive the group

        _gone, alive = psutil.wait_procs(strays, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        return described

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """The exit code (128+N for signal N) once the leader has exited, else None."""
        assert self._proc is not None, "start() first"
        code = self._proc.poll()
        return None if code is None else exit_code_of(code)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds for the leader; its exit code, or None if still
        running."""
        assert self._proc is not None, "start() first"
        try:
            return exit_code_of(self._proc.wait(timeout))
        except subprocess.TimeoutExpired:
            return None

    def signal(self, signum: int) -> bool:
        """Send ``signum`` to the whole group; False when no member is left."""
        if self._proc is None:
            return False
        try:
            os.killpg(self._proc.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def group_alive(self) -> bool:
        """Whether any process of the group (the leader or what it started) still exists."""
        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        _reap_zombies(self._proc.pid)
        try:
            os.killpg(self._proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def terminate(self, grace: float, signum: int = _SIGTERM) -> bool:
        """``signum`` (SIGTERM) to the group, up to ``grace`` seconds for it to exit, then SIGKILL;
        True if killed."""
        if not self.group_alive():
            return False
        self.signal(signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is None:
                self.wait(min(_POLL, max(0.0, deadline - time.monotonic())))
            elif not self.group_alive():
                return False
            else:
                time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
        if not self.group_alive():
            return False
        self.signal(signal.SIGKILL)
        if self._proc is not None:
            self.wait(10)
        return True


def supervise(
    group: ProcessGroup,
    *,
    stop: StopRequest,
    grace: float,
    max_runtime: float | None = None,
    on_tick: Callable[[], None] | None = None,
) -> RunResult:
    """Wait for ``group``'s leader; a stop request or ``max_runtime`` ends it (the signal, grace,
    SIGKILL).

    When the leader exits on its own, what it left behind in its group gets the same SIGTERM/SIGKILL
    treatment so no orphan outlives the job.
    """
    started = group.started_at or time.monotonic()
    deadline = started + max_runtime if max_runtime else None
    stopped_by: str | None = None
    while True:
        code = group.wait(_POLL)
        if code is not None:
            group.terminate(min(grace, 5.0))  # leftovers in the group, if any
            group.stop_strays(min(grace, 5.0))  # and those that left it
            return RunResult(code, duration=time.monotonic() - started)
        if on_tick is not None:
            on_tick()
        if stop.requested:
            stopped_by = "signal"
        elif deadline is not None and time.monotonic() >= deadline:
            stopped_by = "max_runtime"
        if stopped_by is not None:
            # The signal the agent got is passed on (SIGINT stays SIGINT for a KeyboardInterrupt
            # handler).
            forward = (
                stop.signum
                if stopped_by == "signal" and stop.signum is not None
                else signal.SIGTERM
            )
            killed = group.terminate(grace, forward)
            code = group.wait(10)
            group.stop_strays(min(grace, 5.0))
            return RunResult(
                code if code is not None else 128 + signal.SIGKILL,
                stopped_by,
                stop.signum if stopped_by == "signal" else None,
                killed,
                duration=time.monotonic() - started,
            )


def _fd_of(output: Output) -> int | None:
    """The file descriptor of a Popen-style output (None: inherit the agent's)."""
    if output is None or isinstance(output, int):
        return output
    return output.fileno()


def _no_children() -> bool:
    """Whether this process has no child at all, exited or not (waitid answers ECHILD): at a
    normal end, when no orphan came to us as a subreaper, that spares importing psutil."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    except OSError:
        pass
    return False


def _reap_zombies(pgid: int) -> None:
    """Reap our dead children of process group ``pgid`` (orphans that came to us as a subreaper),
    so they neither count as alive nor linger as zombies."""
    while True:
        try:
            if os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG) is None:
                return  # none of them has exited
        except (ChildProcessError, OSError):
            return  # no child of ours is in the group


def _tagged_processes(tag: str) -> list[psutil.Process]:
    """Our descendants whose environment carries ``tag`` (the guard's tag; every process the
    command started inherits it unless it cleared its environment)."""
    if _no_children():
        return []
    try:
        import psutil  # ~8 ms: only when the group has ended and we have children
    except ImportError:
        return []
    found: list[psutil.Process] = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.environ().get(TAG_VARIABLE) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def check_command_size(
    argv: Sequence[str], env: Mapping[str, str], named: Mapping[str, Any]
) -> None:
    """Raise JobSpecError when exec would refuse ``argv`` + ``env`` (E2BIG), naming the biggest of
    ``named``
    (hyperparameter name -> value) and its size.

    Linux takes at most MAX_ARG_STRLEN bytes per argument or ``NAME=value`` string, and all of them
    together (plus a pointer each) within ARG_MAX (a quarter of the stack limit, usually 2 MiB);
    every
    hyperparameter is in argv and again in SM_HP_<NAME>, SM_HPS and SM_TRAINING_ENV.
    """
    strings = [a.encode("utf-8", "surrogateescape") for a in argv]
    strings += [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items()]
    longest = max(strings, key=len, default=b"")
    try:
        arg_max = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        arg_max = 2 * 1024 * 1024
    total = (
        sum(len(s) + 1 + 8 for s in strings) + 4096
    )  # + pointers and the kernel's auxiliary vector room
    if len(longest) + 1 <= MAX_ARG_STRLEN and total <= arg_max:
        return
    sizes = sorted(
        ((len(str(v).encode("utf-8", "surrogateescape")), k) for k, v in named.items()),
        reverse=True,
    )
    if len(longest) + 1 > MAX_ARG_STRLEN:
        limit = (
            f"one argument or environment variable can hold at most {MAX_ARG_STRLEN - 1} bytes "
            "on Linux"
        )
        where = (
            longest.split(b"=", 1)[0].decode("utf-8", "replace")[:60]
            if not longest.startswith(b"-")
            else None
        )
    else:
        limit = (
            f"the command line and environment together would take {total} bytes, over ARG_MAX "
            f"({arg_max})"
        )
        where = None
    if sizes and sizes[0][0] > 1024:
        size, name = sizes[0]
        subject = f"hyperparameter {name!r} is {size} bytes"
    else:
        subject = f"the command line is too long ({total} bytes)"
    raise JobSpecError(
        f"{subject}: {limit}{f' (here {where})' if where else ''}, and the script gets every "
        "hyperparameter as an "
        "argument and in SM_HP_<NAME>, SM_HPS and SM_TRAINING_ENV; put large values in a file (a "
        "data channel "
        "or the source directory) and pass its path as the hyperparameter"
    )

"""Running the user's command: its own session and process group, signals forwarded, a deadline, exit codes.

``ProcessGroup.start`` starts the command; ``supervise`` waits for it while watching a stop request
(SIGTERM/SIGINT to the agent, set by ``StopRequest``) and a deadline (MaxRuntimeInSeconds). Either
sends SIGTERM to the whole group, then SIGKILL after the grace period. The result carries the
child's exit code, 128+N when a signal N ended it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Mapping, Optional, Sequence, Union

from agent.errors import EntryPointError

__all__ = ["ProcessGroup", "StopRequest", "RunResult", "supervise", "exit_code_of"]

_POLL = 0.1
_SIGTERM = signal.SIGTERM  # the method ProcessGroup.signal hides the module inside the class body


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


class StopRequest:
    """A stop asked for by a signal. The handler only records it; the supervising loop acts on it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> "StopRequest":
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

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


@dataclass(frozen=True)
class RunResult:
    """How the user's command ended.

    ``exit_code`` is the child's (128+N for signal N); ``stopped_by`` is None, ``"signal"`` (the agent got
    SIGTERM/SIGINT; ``signum`` says which) or ``"max_runtime"``; ``killed`` is True when the grace period ran
    out and SIGKILL was sent.
    """

    exit_code: int
    stopped_by: Optional[str] = None
    signum: Optional[int] = None
    killed: bool = False
    duration: float = 0.0


Output = Union[int, IO[bytes], None]


class ProcessGroup:
    """One command in a new session (so its own process group), with an explicit environment."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Optional[Path] = None,
                 stdout: Output = None, stderr: Output = None) -> None:
        self.argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self._stdout = stdout
        self._stderr = stderr
        self._proc: Optional[subprocess.Popen] = None
        self.started_at: Optional[float] = None

    def start(self) -> "ProcessGroup":
        """Start the command; raises EntryPointError when it cannot be executed at all."""
        env = dict(self._env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self._proc = subprocess.Popen(
                self.argv, env=env, cwd=str(self._cwd) if self._cwd else None, stdin=subprocess.DEVNULL,
                stdout=self._stdout, stderr=self._stderr, start_new_session=True, close_fds=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as err:
            raise EntryPointError(
                f"cannot start {self.argv[0]!r}: {err.strerror or err}; check the entry point and its permissions"
            ) from err
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def poll(self) -> Optional[int]:
        """The exit code (128+N for signal N) once the leader has exited, else None."""
        assert self._proc is not None, "start() first"
        code = self._proc.poll()
        return None if code is None else exit_code_of(code)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait up to ``timeout`` seconds for the leader; its exit code, or None if still running."""
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
        try:
            os.killpg(self._proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def terminate(self, grace: float, signum: int = _SIGTERM) -> bool:
        """``signum`` (SIGTERM) to the group, up to ``grace`` seconds for it to exit, then SIGKILL; True if killed."""
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


def supervise(group: ProcessGroup, *, stop: StopRequest, grace: float, max_runtime: Optional[float] = None,
              on_tick: Optional[Callable[[], None]] = None) -> RunResult:
    """Wait for ``group``'s leader; a stop request or ``max_runtime`` ends it (the signal, grace, SIGKILL).

    When the leader exits on its own, what it left behind in its group gets the same SIGTERM/SIGKILL
    treatment so no orphan outlives the job.
    """
    started = group.started_at or time.monotonic()
    deadline = started + max_runtime if max_runtime else None
    stopped_by: Optional[str] = None
    while True:
        code = group.wait(_POLL)
        if code is not None:
            group.terminate(min(grace, 5.0))  # leftovers in the group, if any
            return RunResult(code, duration=time.monotonic() - started)
        if on_tick is not None:
            on_tick()
        if stop.requested:
            stopped_by = "signal"
        elif deadline is not None and time.monotonic() >= deadline:
            stopped_by = "max_runtime"
        if stopped_by is not None:
            # The signal the agent got is passed on (SIGINT stays SIGINT for a KeyboardInterrupt handler).
            forward = stop.signum if stopped_by == "signal" and stop.signum is not None else signal.SIGTERM
            killed = group.terminate(grace, forward)
            code = group.wait(10)
            return RunResult(code if code is not None else 128 + signal.SIGKILL, stopped_by,
                             stop.signum if stopped_by == "signal" else None, killed,
                             duration=time.monotonic() - started)

"""Process supervision with real child processes: exit codes, signals to the group, grace,
deadlines."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.errors import EntryPointError
from agent.process import ProcessGroup, StopRequest, exit_code_of, supervise

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _group(code: str, tmp_path: Path, **kwargs) -> ProcessGroup:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return ProcessGroup([sys.executable, str(script)], env=ENV, cwd=tmp_path, **kwargs).start()


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_exit_code_of() -> None:
    assert exit_code_of(0) == 0 and exit_code_of(3) == 3
    assert exit_code_of(-signal.SIGTERM) == 143 and exit_code_of(-signal.SIGKILL) == 137


def test_user_exit_code_passes_through(tmp_path: Path) -> None:
    group = _group("import sys; sys.exit(3)", tmp_path)
    result = supervise(group, stop=StopRequest(), grace=5)
    assert (result.exit_code, result.stopped_by, result.killed) == (3, None, False)


def test_signal_death_is_128_plus_n(tmp_path: Path) -> None:
    group = _group("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    assert supervise(group, stop=StopRequest(), grace=5).exit_code == 137


def test_explicit_environment_and_own_session(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    code = f"""
        import os
        open({str(out)!r}, "w").write(repr((sorted(os.environ), os.getsid(0) == os.getpid())))
    """
    group = _group(code, tmp_path)
    assert supervise(group, stop=StopRequest(), grace=5).exit_code == 0
    names, own_session = eval(out.read_text())
    assert own_session
    assert {"PATH", "PYTHONUNBUFFERED"} <= set(names) <= {"PATH", "PYTHONUNBUFFERED", "LC_CTYPE"}


def test_stop_reaches_the_whole_group_and_the_handler_runs(tmp_path: Path) -> None:
    ready, handled, grandchild_pid = tmp_path / "ready", tmp_path / "handled", tmp_path / "gc.pid"
    code = f"""
        import signal, subprocess, sys, time
        gc = subprocess.Popen(["sleep", "300"])
        open({str(grandchild_pid)!r}, "w").write(str(gc.pid))
        def on_term(signum, frame):
            open({str(handled)!r}, "w").write("saved")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open({str(ready)!r}, "w").write("1")
        time.sleep(300)
    """
    group = _group(code, tmp_path)
    _wait_for(ready)
    stop = StopRequest()
    stop.request(signal.SIGTERM)
    result = supervise(group, stop=stop, grace=20)
    assert (result.stopped_by, result.signum, result.exit_code, result.killed) == (
        "signal",
        signal.SIGTERM,
        0,
        False,
    )
    assert handled.read_text() == "saved"
    gc = int(grandchild_pid.read_text())
    deadline = time.monotonic() + 10
    while not _gone(gc) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(gc), "the grandchild in the same group must get SIGTERM too"


def test_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}, "w").write("1")
        time.sleep(300)
    """
    group = _group(code, tmp_path)
    _wait_for(ready)
    stop = StopRequest()
    stop.request()
    started = time.monotonic()
    result = supervise(group, stop=stop, grace=1.0)
    assert result.killed and result.exit_code == 137
    assert 0.9 <= time.monotonic() - started < 60


def test_max_runtime_stops_the_job(tmp_path: Path) -> None:
    group = _group("import time; time.sleep(300)", tmp_path)
    result = supervise(group, stop=StopRequest(), grace=10, max_runtime=1.0)
    assert (result.stopped_by, result.exit_code) == ("max_runtime", 143)


def test_orphans_left_in_the_group_are_cleaned_up(tmp_path: Path) -> None:
    pid_file = tmp_path / "orphan.pid"
    code = f"""
        import subprocess
        p = subprocess.Popen(["sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
    """
    group = _group(code, tmp_path)
    assert supervise(group, stop=StopRequest(), grace=5).exit_code == 0
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(orphan)
    assert not group.group_alive()


def test_signal_handler_only_records(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(5)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGINT  # the first one wins
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_command_that_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(EntryPointError, match="cannot start"):
        ProcessGroup([str(tmp_path / "nope")], env=ENV).start()


def test_sigint_is_passed_on_as_sigint(tmp_path: Path) -> None:
    ready, seen = tmp_path / "ready", tmp_path / "seen"
    code = f"""
        import time
        open({str(ready)!r}, "w").write("1")
        try:
            time.sleep(300)
        except KeyboardInterrupt:
            open({str(seen)!r}, "w").write("KeyboardInterrupt")
            raise SystemExit(130)
    """
    group = _group(code, tmp_path)
    _wait_for(ready)
    stop = StopRequest()
    stop.request(signal.SIGINT)
    result = supervise(group, stop=stop, grace=20)
    assert (result.exit_code, result.signum) == (130, signal.SIGINT)
    assert seen.read_text() == "KeyboardInterrupt"

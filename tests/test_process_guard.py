"""agent/process.py with guard=True (agent/_guard.py leads the group) and check_command_size."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.errors import EntryPointError, JobSpecError
from agent.process import MAX_ARG_STRLEN, ProcessGroup, StopRequest, check_command_size, supervise

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _group(code: str, tmp_path: Path, *args: str) -> ProcessGroup:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return ProcessGroup(
        [sys.executable, str(script), *args],
        env=ENV,
        cwd=tmp_path,
        guard=True,
        failure_file=tmp_path / "failure",
    ).start()


@pytest.mark.parametrize(
    "code, expected",
    [
        ("import sys; sys.exit(7)", 7),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + signal.SIGTERM),
        ("print('ok')", 0),
    ],
)
def test_exit_codes_pass_through_the_guard(tmp_path: Path, code: str, expected: int) -> None:
    assert _group(code, tmp_path).wait(30) == expected


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_waiting_with_a_timeout_answers_none_then_the_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    """The guard is waited for on a pidfd where the kernel has one, else by polling (kernels
    before 5.3): both time out while it runs and give its code once it ended, at once."""
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    group = _group("import time; time.sleep(2); raise SystemExit(5)", tmp_path)
    started = time.monotonic()
    assert group.wait(0.05) is None
    assert time.monotonic() - started < 1.5  # the timeout held: it did not wait for the end
    assert group.wait(30) == 5
    assert group.poll() == 5 and group.wait(0) == 5  # reaped once, answered every time after


def test_the_command_sees_its_environment_cwd_and_signals(tmp_path: Path) -> None:
    group = _group(
        """
        import os, signal, sys, time
        assert os.getcwd() == sys.argv[1], os.getcwd()
        assert os.environ["TORCHBAY_PROCESS_TAG"]
        def on_term(signum, frame):
            open("got-term", "w").close()
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        open("ready", "w").close()
        time.sleep(60)
    """,
        tmp_path,
        str(tmp_path),
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert group.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    stop = StopRequest()
    stop.request(signal.SIGTERM)
    result = supervise(group, stop=stop, grace=10)
    assert result.exit_code == 143 and not result.killed
    assert (tmp_path / "got-term").exists()
    assert not (tmp_path / "failure").exists()  # the agent is alive: the guard writes nothing


def test_a_command_that_cannot_start_under_the_guard(tmp_path: Path) -> None:
    with pytest.raises(EntryPointError, match="cannot start"):
        ProcessGroup(["/no/such/program"], env=ENV, guard=True).start()
    with pytest.raises(EntryPointError, match="cannot start"):
        ProcessGroup(["no-such-program-anywhere"], env=ENV, guard=True).start()


def test_a_missing_working_folder_is_named_before_the_guard_forks(tmp_path: Path) -> None:
    with pytest.raises(EntryPointError, match="No such directory"):
        ProcessGroup(
            [sys.executable, "-c", "pass"], env=ENV, cwd=tmp_path / "gone", guard=True
        ).start()


def test_the_forked_guard_keeps_none_of_the_agents_descriptors(tmp_path: Path) -> None:
    held = open(tmp_path / "agent-file", "wb")  # an agent-side descriptor the guard must not keep
    try:
        group = _group("import time; open('ready', 'w').close(); time.sleep(60)", tmp_path)
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert group.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert group.pid is not None
        guard_fds = sorted(int(fd) for fd in os.listdir(f"/proc/{group.pid}/fd"))
        assert guard_fds == [0, 1, 2]
        assert os.readlink(f"/proc/{group.pid}/fd/0") == os.devnull
        stop = StopRequest()
        stop.request(signal.SIGTERM)
        assert supervise(group, stop=stop, grace=10).exit_code == 128 + signal.SIGTERM
    finally:
        held.close()


def test_command_size_ok_for_normal_jobs() -> None:
    check_command_size(
        ["python", "train.py", "--epochs", "3"], {"SM_HPS": '{"epochs": 3}'}, {"epochs": 3}
    )


def test_command_size_names_the_big_hyperparameter() -> None:
    big = "x" * (MAX_ARG_STRLEN + 10)
    with pytest.raises(
        JobSpecError, match=rf"hyperparameter 'blob' is {len(big)} bytes.*{MAX_ARG_STRLEN - 1}"
    ):
        check_command_size(
            ["python", "train.py", "--blob", big], {"SM_HP_BLOB": big}, {"blob": big, "epochs": 3}
        )


def test_command_size_total_over_arg_max() -> None:
    parts = {f"p{i}": "y" * 100_000 for i in range(40)}  # each fits, together over ~2 MiB
    argv = ["python"] + [w for k, v in parts.items() for w in (f"--{k}", v)]
    with pytest.raises(JobSpecError, match="ARG_MAX"):
        check_command_size(argv, {}, parts)

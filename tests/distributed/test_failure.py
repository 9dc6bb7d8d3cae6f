"""first_failure: torchelastic error files, the ranks' stderr, the launcher's own error file; and a
real torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agent.distributed import LaunchPlan, first_failure
from tests.distributed.helpers import make_job


def _plan(tmp_path: Path, rank_base: int = 4, log_dir: bool = True) -> LaunchPlan:
    return LaunchPlan(
        argv=("python",),
        env={},
        rank_base=rank_base,
        nproc_per_node=2,
        torchrun_log_dir=tmp_path / "torchrun" if log_dir else None,
        host="algo-3",
        error_file=tmp_path / "torchrun-error.json",
    )


def _error_json(path: Path, message: str, timestamp: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "message": {
                    "message": message,
                    "extraInfo": {"py_callstack": "Traceback ...", "timestamp": str(timestamp)},
                }
            }
        )
    )


def test_nothing_to_report(tmp_path):
    assert first_failure(_plan(tmp_path)) is None
    assert first_failure(_plan(tmp_path, log_dir=False)) is None


def test_earliest_error_file_wins(tmp_path):
    attempt = tmp_path / "torchrun" / "job_abc" / "attempt_0"
    _error_json(attempt / "1" / "error.json", "RuntimeError: second", 200)
    _error_json(attempt / "0" / "error.json", "ValueError: first one", 100)
    assert (
        first_failure(_plan(tmp_path))
        == "rank 4 on host algo-3 failed first: ValueError: first one"
    )


def test_stderr_traceback_when_no_error_file(tmp_path):
    attempt = tmp_path / "torchrun" / "job_abc" / "attempt_0"
    (attempt / "0").mkdir(parents=True)
    (attempt / "0" / "stderr.log").write_text("warning: something\n")
    (attempt / "1").mkdir()
    (attempt / "1" / "stderr.log").write_text(
        '[rank5]: Traceback (most recent call last):\n[rank5]:   File "x.py", line 1\n'
        "[rank5]: ZeroDivisionError: division by zero\n"
    )
    assert (
        first_failure(_plan(tmp_path))
        == "rank 5 on host algo-3 failed first: ZeroDivisionError: division by zero"
    )


def test_launcher_error_file(tmp_path):
    _error_json(
        tmp_path / "torchrun-error.json",
        "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: timed out",
        1,
    )
    assert first_failure(_plan(tmp_path)) == (
        "torch.distributed.run on host algo-3 failed: "
        "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError: timed out"
    )


def test_real_torchrun_names_the_failing_rank(tmp_path):
    """Two local ranks under the real torch.distributed.run; local rank 1 raises."""
    from agent.distributed import build_plan, discover
    from agent.environment import EntryPoint

    code = tmp_path / "code"
    code.mkdir()
    (code / "fail.py").write_text(
        "import os, sys\n"
        "if os.environ['LOCAL_RANK'] == '1':\n"
        "    raise KeyError('missing-column')\n"
        "import time; time.sleep(30)\n"
    )
    job = make_job(tmp_path, settings_env={"TORCHBAY_NPROC_PER_NODE": "2"})
    plan = build_plan(
        job,
        EntryPoint(kind="script", name="fail.py", path=code / "fail.py", code_dir=code),
        [],
        discover(job),
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", **plan.env}
    start = time.monotonic()
    proc = subprocess.run(
        plan.argv, env=env, cwd=code, capture_output=True, timeout=240, check=False
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 200
    message = first_failure(plan)
    assert message is not None and message.startswith(
        "rank 1 on host algo-1 failed first: KeyError"
    ), message
    assert "missing-column" in message
    assert sys.executable == plan.argv[0]

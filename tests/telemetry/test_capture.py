"""LogCapture with real child processes writing to their rank files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.job import MetricDefinition
from agent.settings import read_settings
from agent.telemetry import LogCapture

CHILD_ENV = {"PYTHONUNBUFFERED": "1", "PATH": os.defpath, "LC_ALL": "C.UTF-8"}


class _Sink(io.BytesIO):
    """A container stdout that survives close() so the test can read it."""

    def close(self) -> None:  # pragma: no cover - never closed by LogCapture
        pass


def _settings(**changes):
    return read_settings({}).replace(**changes)


def _capture(tmp_path: Path, **kwargs) -> tuple[LogCapture, _Sink, Path]:
    out = _Sink()
    job_log = tmp_path / "job.log"
    settings = kwargs.pop("settings", None) or _settings()
    capture = LogCapture(
        host="algo-1",
        log_dir=tmp_path / "ranks",
        out=out,
        job_log=job_log,
        settings=settings,
        **kwargs,
    )
    return capture, out, job_log


def _run(script: str, stdout: Path, stderr: Path, *args: str) -> subprocess.Popen:
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=CHILD_ENV,
        )


BLOCK_WRITER = """
    import os, sys, time
    n = int(sys.argv[1])
    data = b"".join(b"line %06d %s end\\n" % (i, b"x" * (i % 97)) for i in range(n))
    for i in range(0, len(data), 4096):
        os.write(1, data[i:i + 4096])   # 4 KiB blocks that ignore line boundaries
        if i % (4096 * 16) == 0:
            time.sleep(0.01)             # let the tail catch up mid-line
"""


def test_4k_blocks_cut_mid_line_arrive_whole_and_tagged(tmp_path):
    capture, out, job_log = _capture(tmp_path)
    stdout, stderr = capture.files_for(0)
    capture.start()
    n = 20000
    child = _run(BLOCK_WRITER, stdout, stderr, str(n))
    assert child.wait(120) == 0
    capture.close()
    expected = [b"[algo-1:0] line %06d %s end" % (i, b"x" * (i % 97)) for i in range(n)]
    assert job_log.read_bytes().split(b"\n")[:-1] == expected
    assert out.getvalue() == job_log.read_bytes()


KILLED = """
    import os, signal, sys
    n = int(sys.argv[1])
    for i in range(n):
        print(f"step {i} of {n}")
    sys.stderr.write("fatal: about to die")   # no newline: held, then emitted at close
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_child_loses_no_line(tmp_path):
    capture, _out, job_log = _capture(tmp_path)
    stdout, stderr = capture.files_for(3)
    capture.start()
    n = 500
    child = _run(KILLED, stdout, stderr, str(n))
    assert child.wait(120) == -signal.SIGKILL
    capture.close()
    lines = job_log.read_text().splitlines()
    steps = [line for line in lines if "step" in line]
    assert steps == [f"[algo-1:3] step {i} of {n}" for i in range(n)]
    assert "[algo-1:3] fatal: about to die" in lines
    assert capture.stderr_tail(3, lines=1) == ["fatal: about to die"]
    assert capture.stderr_tail(lines=1) == ["[algo-1:3] fatal: about to die"]


RANK = """
    import sys
    rank, n = int(sys.argv[1]), int(sys.argv[2])
    for i in range(n):
        stream = sys.stderr if i % 3 == 0 else sys.stdout
        stream.write(f"rank={rank} i={i} " + "y" * (i % 50) + "\\n")
"""


def test_many_ranks_at_once_every_line_once_tagged_right(tmp_path):
    capture, _out, job_log = _capture(tmp_path)
    ranks, n = 8, 3000
    files = {rank: capture.files_for(rank) for rank in range(ranks)}
    capture.start()
    children = [_run(RANK, *files[rank], str(rank), str(n)) for rank in range(ranks)]
    for child in children:
        assert child.wait(120) == 0
    capture.close()
    seen: dict[tuple[int, int], int] = {}
    for line in job_log.read_text().splitlines():
        tag, rest = line.split(" ", 1)
        fields = dict(kv.split("=") for kv in rest.split()[:2])
        rank, i = int(fields["rank"]), int(fields["i"])
        assert tag == f"[algo-1:{rank}]"
        assert rest == f"rank={rank} i={i} " + "y" * (i % 50)
        seen[(rank, i)] = seen.get((rank, i), 0) + 1
    assert seen == {(rank, i): 1 for rank in range(ranks) for i in range(n)}


def test_json_lines_carry_time_host_rank_stream(tmp_path):
    capture, _out, job_log = _capture(tmp_path, settings=_settings(log_json=True))
    stdout, stderr = capture.files_for(1)
    stdout.write_bytes("hello ünïcode\n".encode())
    stderr.write_bytes(b"oops\n")
    capture.close()
    records = [json.loads(line) for line in job_log.read_text().splitlines()]
    assert sorted((r["stream"], r["line"]) for r in records) == [
        ("stderr", "oops"),
        ("stdout", "hello ünïcode"),
    ]
    for record in records:
        assert record["host"] == "algo-1" and record["rank"] == 1
        assert abs(record["time"] - time.time()) < 600


def test_tag_format_is_a_setting(tmp_path):
    capture, _out, job_log = _capture(
        tmp_path, settings=_settings(log_tag="{host}/{rank}/{stream}| ")
    )
    stdout, stderr = capture.files_for(2)
    stdout.write_bytes(b"a\n")
    stderr.write_bytes(b"b\n")
    capture.close()
    assert sorted(job_log.read_text().splitlines()) == ["algo-1/2/stderr| b", "algo-1/2/stdout| a"]


def test_over_long_line_is_cut_into_marked_pieces(tmp_path):
    capture, _out, job_log = _capture(tmp_path, settings=_settings(log_max_line=1000))
    stdout, _ = capture.files_for(0)
    stdout.write_bytes(b"z" * 2500 + b"\nnext\n")
    capture.close()
    lines = job_log.read_text().splitlines()
    assert lines == [
        "[algo-1:0] " + "z" * 1000 + "[...]",
        "[algo-1:0] [...]" + "z" * 1000 + "[...]",
        "[algo-1:0] [...]" + "z" * 500,
        "[algo-1:0] next",
    ]


def test_close_is_idempotent_and_start_after_close_does_nothing(tmp_path):
    capture, _out, job_log = _capture(tmp_path)
    capture.files_for(0)[0].write_bytes(b"one\n")
    capture.start()
    capture.close()
    capture.close()
    capture.start()
    assert job_log.read_text() == "[algo-1:0] one\n"


def test_broken_stdout_does_not_stop_the_job_log(tmp_path, caplog):
    class _Broken(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

    job_log = tmp_path / "job.log"
    capture = LogCapture(
        host="h", log_dir=tmp_path / "r", out=_Broken(), job_log=job_log, settings=_settings()
    )
    capture.files_for(0)[0].write_bytes(b"a\nb\n")
    capture.close()
    assert job_log.read_text() == "[h:0] a\n[h:0] b\n"
    assert "writing to the container's stdout failed" in caplog.text


def test_regex_metrics_go_to_the_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    capture, _out, _job_log = _capture(
        tmp_path,
        metric_definitions=[
            MetricDefinition("train:loss", r"loss=(\S+)"),
            MetricDefinition("never", r"zzz=(\d+)"),
        ],
        metrics_file=metrics,
    )
    stdout, _ = capture.files_for(4)
    capture.start()
    child = _run(
        """
        for i, v in enumerate(["1", "-2.5", "3e-2", "nan", "inf", "0.25,"]):
            print(f"step={i} loss={v}")
    """,
        stdout,
        tmp_path / "err",
    )
    assert child.wait(120) == 0
    capture.close()
    points = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [p["value"] for p in points] == [1, -2.5, 0.03, "nan", "inf", 0.25]
    assert {(p["name"], p["host"], p["rank"]) for p in points} == {("train:loss", "algo-1", 4)}


def _write_torchrun_rank(root: Path, attempt: int, local_rank: int, text: str) -> None:
    folder = root / "run_abc123" / f"attempt_{attempt}" / str(local_rank)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.log", "a") as handle:
        handle.write(text)


def test_torchrun_layout_files_appearing_later_and_restarts(tmp_path):
    capture, _out, job_log = _capture(tmp_path)
    tr = tmp_path / "torchrun"
    capture.add_torchrun_dir(tr, rank_base=4)  # nothing there yet
    capture.start()
    _write_torchrun_rank(tr, 0, 0, "a0\n")
    _write_torchrun_rank(tr, 0, 1, "b0\n")
    time.sleep(0.5)
    _write_torchrun_rank(tr, 1, 0, "a1\n")  # a restart: a new attempt folder
    _write_torchrun_rank(tr, 1, 1, "b1 partial")
    capture.close()
    assert sorted(job_log.read_text().splitlines()) == [
        "[algo-1:4] a0",
        "[algo-1:4] a1",
        "[algo-1:5] b0",
        "[algo-1:5] b1 partial",
    ]


def test_real_torchrun_redirects(tmp_path):
    pytest.importorskip("torch")
    capture, _out, job_log = _capture(tmp_path)
    tr = tmp_path / "torchrun"
    capture.add_torchrun_dir(tr, rank_base=2)
    capture.start()
    script = tmp_path / "s.py"
    script.write_text(
        "import os, sys\nprint('hi from', os.environ['RANK'])\nprint('err', file=sys.stderr)\n"
    )
    env = dict(CHILD_ENV, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            str(tr),
            "--redirects",
            "3",
            str(script),
        ],
        env=env,
        capture_output=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    capture.close()
    assert sorted(job_log.read_text().splitlines()) == [
        "[algo-1:2] err",
        "[algo-1:2] hi from 0",
        "[algo-1:3] err",
        "[algo-1:3] hi from 1",
    ]

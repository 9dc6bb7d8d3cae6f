"""The agent's lines in the job log, and every host's report (job log + status file) at the output
prefix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.storage import open_storage
from agent.telemetry.agentlog import AgentLogHandler
from agent.telemetry.shipping import host_report_uris, ship_host_report


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"torchbay.test-agentlog-{id(handler)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def test_agent_lines_are_tagged_and_appended(tmp_path: Path) -> None:
    job_log = tmp_path / "torchbay" / "job.log"
    job_log.parent.mkdir()
    job_log.write_text("[algo-1:0] a rank line\n")
    handler = AgentLogHandler(
        job_log, host="algo-1", fmt=logging.Formatter("%(levelname)s %(message)s")
    )
    log = _logger(handler)
    log.info("installing requirements.txt")
    log.error("InstallError: pip failed\nits last line\nfrom s3://key:secret@host/x")
    handler.close()
    log.info("after close: dropped")
    assert job_log.read_text().splitlines() == [
        "[algo-1:0] a rank line",
        "[algo-1:agent] INFO installing requirements.txt",
        "[algo-1:agent] ERROR InstallError: pip failed",
        "[algo-1:agent] its last line",
        "[algo-1:agent] from s3://***@host/x",
    ]


def test_agent_lines_as_json(tmp_path: Path) -> None:
    job_log = tmp_path / "job.log"
    handler = AgentLogHandler(
        job_log, host="algo-2", json_lines=True, fmt=logging.Formatter("%(message)s")
    )
    _logger(handler).warning("waiting for algo-1")
    handler.close()
    record = json.loads(job_log.read_text())
    assert {k: record[k] for k in ("host", "rank", "stream", "level", "line")} == {
        "host": "algo-2",
        "rank": "agent",
        "stream": "agent",
        "level": "WARNING",
        "line": "waiting for algo-1",
    }


def test_host_report_lands_beside_the_outputs(tmp_path: Path) -> None:
    out = tmp_path / "bucket"
    base = (out / "job" / "output").as_uri()
    ml = tmp_path / "ml"
    (ml / "torchbay").mkdir(parents=True)
    (ml / "torchbay" / "job.log").write_text("[h:agent] ERROR ChannelError: empty\n")
    (ml / "failure").write_text("ChannelError: empty")
    failed = ship_host_report(
        open_storage(base),
        base,
        "h",
        job_log=ml / "torchbay" / "job.log",
        failure_file=ml / "failure",
        success_file=ml / "success",
        log=logging.getLogger("t"),
    )
    assert failed == []
    assert (out / "job" / "output" / "failure-h").read_text() == "ChannelError: empty"
    assert (out / "job" / "output" / "job-h.log").read_text().startswith("[h:agent] ERROR")
    assert not (out / "job" / "output" / "success-h").exists()
    assert host_report_uris("s3://b/p/", "algo-1") == {
        "log": "s3://b/p/job-algo-1.log",
        "failure": "s3://b/p/failure-algo-1",
        "success": "s3://b/p/success-algo-1",
    }

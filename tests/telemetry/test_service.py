"""Telemetry end to end at the library level: a real failing child, LogCapture, sampler, shipping to
moto S3."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from agent.job import Job, Layout, MetricDefinition, Resource
from agent.settings import read_settings
from agent.telemetry import LogCapture, Telemetry, default_paths

CHILD_ENV = {"PYTHONUNBUFFERED": "1", "PATH": os.defpath}

FAILING = """
import sys, time
for step in range(30):
    print(f"step={step} loss={1.0 / (step + 1)}")
    time.sleep(0.02)
sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: CUDA out of memory\\n")
sys.exit(3)
"""


def _job(tmp_path: Path, env: dict[str, str], output_path: str | None, **settings: str) -> Job:
    layout = Layout(tmp_path / "ml")
    layout.data_dir.mkdir(parents=True)
    layout.model_dir.mkdir(parents=True)
    return Job(
        name="job-1",
        layout=layout,
        settings=read_settings({**env, **settings}),
        resource=Resource("algo-1", ("algo-1",)),
        output_path=output_path,
        metric_definitions=(MetricDefinition("train:loss", r"loss=(\S+)"),),
    )


def _run_job(job: Job, tmp_path: Path) -> tuple[Telemetry, LogCapture, int]:
    job_log, metrics_file = default_paths(job)
    capture = LogCapture(
        host="algo-1",
        log_dir=job.layout.agent_dir / "ranks",
        out=io.BytesIO(),
        job_log=job_log,
        settings=job.settings,
        metric_definitions=job.metric_definitions,
        metrics_file=metrics_file,
    )
    stdout, stderr = capture.files_for(0)
    capture.start()
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", FAILING],
            stdout=out,
            stderr=err,
            env=CHILD_ENV,
            start_new_session=True,
        )
    telemetry = Telemetry(job, root_pid=lambda: child.pid if child.poll() is None else None)
    telemetry.start()
    code = child.wait(120)
    capture.close()
    return telemetry, capture, code


def test_log_and_metrics_in_s3_after_a_failed_job(tmp_path, s3_env, bucket, s3):
    job = _job(
        tmp_path,
        s3_env,
        f"s3://{bucket}/jobs",
        TORCHBAY_SAMPLE_INTERVAL="0.2",
        TORCHBAY_LOG_UPLOAD_INTERVAL="0.3",
    )
    telemetry, capture, code = _run_job(job, tmp_path)
    assert code == 3
    assert capture.stderr_tail(0, lines=1) == ["RuntimeError: CUDA out of memory"]
    assert telemetry.close() == []
    assert telemetry.close() == []
    prefix = "jobs/job-1/output/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"])
    assert keys == [prefix + "job-algo-1.log", prefix + "metrics-algo-1.jsonl"]
    log = s3.get_object(Bucket=bucket, Key=prefix + "job-algo-1.log")["Body"].read().decode()
    assert log.splitlines()[0] == "[algo-1:0] step=0 loss=1.0"
    assert log.splitlines()[-1] == "[algo-1:0] RuntimeError: CUDA out of memory"
    assert log == default_paths(job)[0].read_text()
    records = [
        json.loads(line)
        for line in s3.get_object(Bucket=bucket, Key=prefix + "metrics-algo-1.jsonl")["Body"]
        .read()
        .splitlines()
    ]
    losses = [r["value"] for r in records if r["name"] == "train:loss"]
    assert losses == [1.0 / (step + 1) for step in range(30)]
    names = {r["name"] for r in records}
    assert {
        "node_cpu_utilization_ratio",
        "node_memory_available_bytes",
        "process_tree_resident_memory_bytes",
        "filesystem_avail_bytes",
    } <= names
    assert not any(n.startswith("gpu_") for n in names)  # no NVML here: left out, nothing crashed


def test_periodic_upload_happens_while_the_job_runs(tmp_path, s3_env, bucket, s3):
    job = _job(tmp_path, s3_env, f"s3://{bucket}/p", TORCHBAY_LOG_UPLOAD_INTERVAL="0.2")
    job_log, _ = default_paths(job)
    job_log.parent.mkdir(parents=True)
    job_log.write_text("early line\n")
    telemetry = Telemetry(job, root_pid=lambda: None)
    telemetry.start()
    try:
        key = "p/job-1/output/job-algo-1.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0)
            if found:
                break
            time.sleep(0.1)
        assert found, "no periodic upload within 60 s"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"early line\n"
    finally:
        telemetry.close()


def test_an_s3_outage_at_close_is_reported_not_raised(tmp_path, s3_env, bucket, s3_server, caplog):
    job = _job(tmp_path, s3_env, f"s3://{bucket}/p", TORCHBAY_SAMPLE_INTERVAL="0")
    job_log, _ = default_paths(job)
    job_log.parent.mkdir(parents=True)
    job_log.write_text("line\n")
    telemetry = Telemetry(job, root_pid=lambda: None)
    telemetry.start()
    s3_server.stop()
    try:
        failed = telemetry.close()
    finally:
        s3_server.start()
    assert f"s3://{bucket}/p/job-1/output/job-algo-1.log" in failed
    assert "could not upload" in caplog.text
    assert "testing-secret" not in caplog.text


def test_prometheus_endpoint_serves_system_metrics(tmp_path):
    job = _job(tmp_path, {}, None, TORCHBAY_PROMETHEUS_PORT="0", TORCHBAY_SAMPLE_INTERVAL="30")
    telemetry = Telemetry(job, root_pid=os.getpid)
    telemetry.start()
    try:
        url = telemetry.prometheus_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read().decode()
    finally:
        telemetry.close()
    assert "torchbay_node_memory_available_bytes" in body
    assert re.search(r"^torchbay_process_tree_processes [1-9]", body, re.MULTILINE)
    assert 'torchbay_filesystem_avail_bytes{path="data"}' in body


def test_a_busy_prometheus_port_is_a_warning_not_a_crash(tmp_path, caplog):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        job = _job(
            tmp_path, {}, None, TORCHBAY_PROMETHEUS_PORT=str(port), TORCHBAY_SAMPLE_INTERVAL="30"
        )
        telemetry = Telemetry(job, root_pid=lambda: None)
        telemetry.start()
        assert telemetry.prometheus_url is None
        telemetry.close()
    assert "Prometheus endpoint off" in caplog.text
    assert default_paths(job)[1].exists()  # sampling went on


def test_without_psutil_system_metrics_are_off_and_the_log_is_still_shipped(
    tmp_path, s3_env, bucket, s3, monkeypatch, caplog
):
    """The sampler (psutil) is imported when sampling starts: where it cannot be, the job gets
    no system metrics, says so, and its log is shipped all the same."""
    monkeypatch.setitem(sys.modules, "agent.telemetry.sampler", None)  # import raises ImportError
    job = _job(tmp_path, s3_env, f"s3://{bucket}/p", TORCHBAY_SAMPLE_INTERVAL="0.1")
    job_log, metrics_file = default_paths(job)
    job_log.parent.mkdir(parents=True)
    job_log.write_text("line\n")
    telemetry = Telemetry(job, root_pid=os.getpid)
    with caplog.at_level("DEBUG"):
        telemetry.start()
        assert telemetry.close() == []
    assert "telemetry sampler not available" in caplog.text
    assert s3.get_object(Bucket=bucket, Key="p/job-1/output/job-algo-1.log")["Body"].read() == (
        b"line\n"
    )
    assert not metrics_file.exists() or "node_" not in metrics_file.read_text()

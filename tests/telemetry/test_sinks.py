"""Sinks: the metrics file, TensorBoard event files, a Prometheus scrape over HTTP."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from agent.telemetry.metrics import MetricPoint
from agent.telemetry.sinks import MetricsFile, PrometheusEndpoint, TensorBoardSink


def test_metrics_file_appends_whole_lines_from_many_threads(tmp_path):
    sink = MetricsFile(tmp_path / "m" / "metrics.jsonl")

    def writer(k):
        for i in range(200):
            sink.write([{"k": k, "i": i, "pad": "x" * 300}, {"k": k, "i": -i}])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    sink.close()
    sink.write([{"late": 1}])  # ignored after close
    records = [
        json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 4 * 200 * 2


def test_prometheus_scrape_over_http():
    endpoint = PrometheusEndpoint(0, addr="127.0.0.1")
    try:
        assert endpoint.url.startswith("http://127.0.0.1:")
        endpoint.update(
            [
                {"name": "node_memory_available_bytes", "value": 1234.0, "labels": {}},
                {"name": "gpu_temperature_celsius", "value": 61, "labels": {"gpu": "0"}},
                {"name": "gpu_temperature_celsius", "value": 65, "labels": {"gpu": "1"}},
            ]
        )
        endpoint.update([{"name": "node_memory_available_bytes", "value": 99.0, "labels": {}}])
        with urllib.request.urlopen(endpoint.url, timeout=30) as response:
            body = response.read().decode()
    finally:
        endpoint.close()
        endpoint.close()
    assert "torchbay_node_memory_available_bytes 99.0" in body
    assert 'torchbay_gpu_temperature_celsius{gpu="0"} 61.0' in body
    assert 'torchbay_gpu_temperature_celsius{gpu="1"} 65.0' in body
    assert "python_gc" not in body  # a private registry, not the process-wide default one
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=5)


def test_tensorboard_event_files_readable_by_tensorboard(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink.open(
        tmp_path / "tb", log=__import__("logging").getLogger("t"), suffix=".algo-1"
    )
    assert sink is not None
    sink.write(
        [
            MetricPoint("train:loss", v, 1000.0 + i, "algo-1", 0)
            for i, v in enumerate([3.0, 2.0, 1.5])
        ]
    )
    sink.write([MetricPoint("train:loss", 9.0, 1000.0, "algo-1", 1)])
    sink.close()
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train:loss", "train:loss/rank1"]
    events = acc.Scalars("train:loss")
    assert [(e.step, e.value) for e in events] == [(0, 3.0), (1, 2.0), (2, 1.5)]

"""SystemSampler: the real absence path of NVML here, the presence path with an injected NVML
object."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest

from agent.telemetry.sampler import SystemSampler, tree_pids

CHILD_ENV = {"PATH": os.defpath, "PYTHONUNBUFFERED": "1"}


def _names(records, **labels):
    return {r["name"]: r["value"] for r in records if r["labels"] == labels}


@pytest.fixture
def tree():
    """A parent with 3 children, one of which has a child of its own, all sleeping."""
    script = textwrap.dedent("""
        import subprocess, sys, time
        code = (
            "import subprocess, sys, time; "
            "[subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
            " for _ in range(int(sys.argv[1]))]; time.sleep(120)"
        )
        kids = [subprocess.Popen([sys.executable, "-c", code, str(n)]) for n in (0, 0, 1)]
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        start_new_session=True,
        env=CHILD_ENV,
    )
    assert proc.stdout.readline() == b"ready\n"
    try:
        for _ in range(300):  # the grandchild starts a moment after its parent
            if len(tree_pids(proc.pid)) == 5:
                break
            time.sleep(0.1)
        yield proc
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_tree_pids_matches_psutil_recursive_children(tree):
    mine = sorted(tree_pids(tree.pid))
    theirs = sorted([tree.pid] + [p.pid for p in psutil.Process(tree.pid).children(recursive=True)])
    assert mine == theirs and len(mine) == 5


def test_tree_pids_of_a_missing_process_is_empty():
    assert tree_pids(2**22 + 17) == []


def test_without_nvml_one_info_line_and_no_gpu_metrics(tree, caplog, tmp_path):
    with caplog.at_level(logging.INFO):
        sampler = SystemSampler(root_pid=lambda: tree.pid, paths={"data": tmp_path})
        first = sampler.sample()
        second = sampler.sample()
    sampler.close()
    gpu_lines = [r for r in caplog.records if "GPU metrics off" in r.getMessage()]
    assert len(gpu_lines) == 1 and gpu_lines[0].levelno == logging.INFO
    assert sampler.gpu_count == 0
    assert not any(r["name"].startswith("gpu_") for r in first + second)
    values = _names(second)
    assert values["process_tree_processes"] == 5
    assert values["process_tree_threads"] >= 5
    assert values["process_tree_resident_memory_bytes"] > 5 * 1_000_000
    assert 0 <= values["process_tree_cpu_utilization_ratio"] <= 1
    assert 0 <= values["node_cpu_utilization_ratio"] <= 1
    assert 0 < values["node_memory_available_bytes"] <= values["node_memory_total_bytes"]
    assert _names(second, path="data")["filesystem_avail_bytes"] > 0


def test_no_root_process_yet_gives_machine_metrics_only():
    sampler = SystemSampler(root_pid=lambda: None, gpus=False)
    names = {r["name"] for r in sampler.sample()}
    assert "node_cpu_utilization_ratio" in names
    assert not any(n.startswith("process_tree_") for n in names)


def _fake_nvml(count=2, power_fails_on=1):
    class NVMLError(Exception):
        pass

    calls = []

    def handle(i):
        return f"h{i}"

    def power(h):
        if h == f"h{power_fails_on}":
            raise NVMLError("Not Supported")
        return 250_500  # milliwatts

    nvml = types.SimpleNamespace(
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            used=3 << 30, total=80 << 30, free=77 << 30
        ),
        nvmlDeviceGetTemperature=lambda h, sensor: 61,
        nvmlDeviceGetPowerUsage=power,
    )
    return nvml, calls


def test_with_nvml_per_gpu_metrics_in_base_units(caplog):
    nvml, calls = _fake_nvml()
    with caplog.at_level(logging.INFO):
        sampler = SystemSampler(root_pid=os.getpid, nvml=nvml)
        records = sampler.sample() + sampler.sample()
    sampler.close()
    sampler.close()
    assert sampler.gpu_count == 0 and calls == ["init", "shutdown"]
    gpu0 = _names(records, gpu="0")
    assert gpu0 == {
        "gpu_utilization_ratio": 0.87,
        "gpu_memory_bandwidth_utilization_ratio": 0.40,
        "gpu_memory_used_bytes": float(3 << 30),
        "gpu_memory_total_bytes": float(80 << 30),
        "gpu_temperature_celsius": 61.0,
        "gpu_power_watts": 250.5,
    }
    gpu1 = _names(records, gpu="1")
    assert "gpu_power_watts" not in gpu1 and gpu1["gpu_utilization_ratio"] == 0.87
    assert caplog.text.count("GPU power metrics off") == 1


def test_nvml_init_failure_is_absence_not_a_crash(caplog):
    nvml, _ = _fake_nvml()

    def init():
        raise nvml.NVMLError("Driver Not Loaded")

    nvml.nvmlInit = init
    with caplog.at_level(logging.INFO):
        sampler = SystemSampler(root_pid=lambda: None, nvml=nvml)
    assert sampler.gpu_count == 0 and "Driver Not Loaded" in caplog.text
    assert not any(r["name"].startswith("gpu_") for r in sampler.sample())


def test_nvml_with_no_gpu(caplog):
    nvml, calls = _fake_nvml(count=0)
    with caplog.at_level(logging.INFO):
        sampler = SystemSampler(root_pid=lambda: None, nvml=nvml)
    assert sampler.gpu_count == 0 and calls == ["init", "shutdown"] and "sees no GPU" in caplog.text

"""System metrics: the machine, the job's process tree (psutil) and each GPU (NVML), in base units.

The process tree is walked through the kernel's per-task ``children`` lists
(``/proc/<pid>/task/<tid>/children``), about 20 times cheaper than psutil's
``children(recursive=True)``, which scans all of ``/proc``; ``psutil.Process`` objects
are kept between samples so ``cpu_percent`` has its baseline. NVML is optional: no
library, no driver or no GPU gives one INFO line and no GPU metrics.

A sample is a list of records ``{"name", "value", "labels"}``; names follow Prometheus
rules (``_bytes``, ``_total`` for counters, ratios 0 to 1, watts, celsius).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

__all__ = ["SystemSampler", "tree_pids"]

_MAX_TREE = 4096  # processes followed under the root, a bound against runaway forks
_TASK = "/proc/{}/task"

Record = dict[str, Any]


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from the kernel's per-task children lists (empty if root is
    gone)."""
    if not os.path.exists(_TASK.format(root)):
        return []
    pids = [root]
    index = 0
    while index < len(pids) and len(pids) < _MAX_TREE:
        task_dir = _TASK.format(pids[index])
        index += 1
        try:
            tasks = os.listdir(task_dir)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for tid in tasks:
            try:
                with open(f"{task_dir}/{tid}/children", "rb") as handle:
                    data = handle.read()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if data:
                pids.extend(int(pid) for pid in data.split())
    return pids[:_MAX_TREE]


def _rec(name: str, value: float, **labels: str) -> Record:
    return {"name": name, "value": float(value), "labels": labels}


class SystemSampler:
    """Take one sample of machine, process-tree and GPU metrics per :meth:`sample` call.

    Args:
        root_pid: returns the pid at the top of the job's process tree, or None before launch.
        paths: folders whose free space is reported, by label (``{"data": ..., "model": ...}``).
        nvml: an NVML module object (``pynvml``); None imports ``pynvml`` (tests pass a fake).
        gpus: False leaves GPU metrics out without touching NVML.
        log: where the one INFO line about absent GPU metrics goes.
    """

    def __init__(
        self,
        *,
        root_pid: Callable[[], int | None],
        paths: Mapping[str, Path] = {},
        nvml: Any = None,
        gpus: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self._root_pid = root_pid
        self._paths = dict(paths)
        self._log = log or logging.getLogger("torchbay.telemetry")
        self._procs: dict[int, psutil.Process] = {}
        self._ncpu = psutil.cpu_count() or 1
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._gpu_failed: set[str] = set()
        psutil.cpu_percent(None)  # baseline for the first sample
        if gpus:
            self._open_nvml(nvml)

    @property
    def gpu_count(self) -> int:
        return len(self._handles)

    def _open_nvml(self, nvml: Any) -> None:
        if nvml is None:
            try:
                import pynvml  # nvidia-ml-py; only when GPU metrics are on
            except ImportError:
                self._log.info("GPU metrics off: nvidia-ml-py is not installed")
                return
            nvml = pynvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            self._log.info("GPU metrics off: NVML is not available here (%s)", err)
            return
        try:
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as err:
            self._log.info("GPU metrics off: NVML could not list the GPUs (%s)", err)
            nvml.nvmlShutdown()
            return
        if not self._handles:
            self._log.info("GPU metrics off: NVML sees no GPU")
            nvml.nvmlShutdown()
            return
        self._nvml = nvml

    def sample(self) -> list[Record]:
        """One sample of every metric available here."""
        records = self._system()
        records.extend(self._tree())
        if self._nvml is not None:
            records.extend(self._gpus())
        return records

    def _system(self) -> list[Record]:
        memory = psutil.virtual_memory()
        records = [
            _rec("node_cpu_utilization_ratio", psutil.cpu_percent(None) / 100.0),
            _rec("node_memory_available_bytes", memory.available),
            _rec("node_memory_total_bytes", memory.total),
        ]
        disk = psutil.disk_io_counters()
        if disk is not None:
            records.append(_rec("node_disk_read_bytes_total", disk.read_bytes))
            records.append(_rec("node_disk_written_bytes_total", disk.write_bytes))
        net = psutil.net_io_counters()
        if net is not None:
            records.append(_rec("node_network_receive_bytes_total", net.bytes_recv))
            records.append(_rec("node_network_transmit_bytes_total", net.bytes_sent))
        for label, path in self._paths.items():
            try:
                usage = psutil.disk_usage(str(path))
            except OSError:
                continue
            records.append(_rec("filesystem_avail_bytes", usage.free, path=label))
            records.append(_rec("filesystem_size_bytes", usage.total, path=label))
        return records

    def _tree(self) -> list[Record]:
        root = self._root_pid()
        if root is None:
            self._procs.clear()
            return []
        pids = tree_pids(root)
        cpu = rss = 0.0
        threads = count = 0
        alive: dict[int, psutil.Process] = {}
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # baseline: counts from the next sample
                else:
                    cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
                threads += proc.num_threads()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            alive[pid] = proc
            count += 1
        self._procs = alive
        return [
            _rec("process_tree_cpu_utilization_ratio", cpu / 100.0 / self._ncpu),
            _rec("process_tree_resident_memory_bytes", rss),
            _rec("process_tree_processes", count),
            _rec("process_tree_threads", threads),
        ]

    def _gpus(self) -> list[Record]:
        nvml = self._nvml
        records: list[Record] = []
        for index, handle in enumerate(self._handles):
            gpu = str(index)
            util = self._gpu_call("utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
            if util is not None:
                records.append(_rec("gpu_utilization_ratio", util.gpu / 100.0, gpu=gpu))
                records.append(
                    _rec("gpu_memory_bandwidth_utilization_ratio", util.memory / 100.0, gpu=gpu)
                )
            memory = self._gpu_call("memory", nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                records.append(_rec("gpu_memory_used_bytes", memory.used, gpu=gpu))
                records.append(_rec("gpu_memory_total_bytes", memory.total, gpu=gpu))
            temp = self._gpu_call(
                "temperature", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
            )
            if temp is not None:
                records.append(_rec("gpu_temperature_celsius", temp, gpu=gpu))
            power = self._gpu_call("power", nvml.nvmlDeviceGetPowerUsage, handle)
            if power is not None:
                records.append(
                    _rec("gpu_power_watts", power / 1000.0, gpu=gpu)
                )  # NVML gives milliwatts
        return records

    def _gpu_call(self, what: str, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except self._nvml.NVMLError as err:
            if what not in self._gpu_failed:
                self._gpu_failed.add(what)
                self._log.info("GPU %s metrics off: NVML says %s", what, err)
            return None

    def close(self) -> None:
        """Shut NVML down. Idempotent."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None
            self._handles = []

"""State the master and every worker share through memory mapped before fork.

Two things live here: worker health (which workers are booted, when one last died unexpectedly),
which makes ``/ping`` honest, and the request metrics, summed across workers (and kept when a
worker dies), which ``/metrics`` exposes in Prometheus format.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["BATCH_BUCKETS", "CODES", "DURATION_BUCKETS", "ENDPOINTS", "SharedState"]

ENDPOINTS = ("invocations", "ping", "execution-parameters", "metrics", "other")
CODES = (200, 400, 404, 405, 406, 408, 413, 414, 415, 431, 500, 503, 504, 0)  # 0: any other status
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, float("inf"))

_SLOTS = 256
_FREE, _READY, _CLEAN, _STUCK = 0, 1, 2, 3


class SharedState:
    """Create in the master before the workers fork; every method is safe from any process and
    thread."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._lock = ctx.Lock()
        self._pids = ctx.RawArray(ctypes.c_long, _SLOTS)
        self._states = ctx.RawArray(ctypes.c_int, _SLOTS)
        self._conns = ctx.RawArray(
            ctypes.c_long, _SLOTS
        )  # connections each worker holds (for balancing)
        # health: [last unexpected death (CLOCK_MONOTONIC), deaths, stopping]
        self._health = ctx.RawArray(ctypes.c_double, 3)
        self._health[0] = -1e18
        self._stuck_since = ctx.RawArray(
            ctypes.c_double, _SLOTS
        )  # when a stuck worker's model call began
        # events: [requests answered 504, workers replaced because stuck, boot failures]
        self._events = ctx.RawArray(ctypes.c_double, 3)
        n_codes, n_buckets = len(CODES), len(DURATION_BUCKETS)
        self._requests = ctx.RawArray(ctypes.c_double, len(ENDPOINTS) * n_codes)
        self._durations = ctx.RawArray(
            ctypes.c_double, len(ENDPOINTS) * (n_buckets + 1)
        )  # buckets + sum
        self._batches = ctx.RawArray(ctypes.c_double, len(BATCH_BUCKETS) + 1)

    # --- health ------------------------------------------------------------------------------
    def worker_ready(self, pid: int) -> None:
        """A worker finished booting (called in the worker)."""
        with self._lock:
            for i in range(_SLOTS):
                if self._states[i] == _FREE:
                    self._pids[i], self._states[i], self._conns[i] = pid, _READY, 0
                    return

    def worker_exiting(self, pid: int) -> None:
        """A worker is exiting on purpose (called in the worker, on a clean exit only)."""
        with self._lock:
            for i in range(_SLOTS):
                if self._pids[i] == pid and self._states[i] == _READY:
                    self._states[i] = _CLEAN
                    return

    def worker_gone(self, pid: int, *, stopping: bool = False) -> bool:
        """The master reaped a worker; True (and /ping unhealthy for a while) when its death was
        unexpected."""
        with self._lock:
            clean = False
            stuck = False
            for i in range(_SLOTS):
                if self._pids[i] == pid and self._states[i] != _FREE:
                    clean = self._states[i] == _CLEAN
                    stuck = self._states[i] == _STUCK
                    self._pids[i], self._states[i], self._stuck_since[i] = 0, _FREE, 0.0
            if stuck:
                self._events[1] += 1
                return False
            if clean or stopping or self._health[2]:
                return False
            self._health[0] = time.monotonic()
            self._health[1] += 1
            return True

    def was_ready(self, pid: int) -> bool:
        """Whether the worker ``pid`` finished booting (call before :meth:`worker_gone` forgets
        it)."""
        with self._lock:
            return any(self._pids[i] == pid and self._states[i] != _FREE for i in range(_SLOTS))

    def worker_stuck(self, pid: int, since: float) -> None:
        """The worker ``pid`` gives up on a model call running since ``since`` (monotonic) and will
        exit."""
        with self._lock:
            for i in range(_SLOTS):
                if self._pids[i] == pid and self._states[i] == _READY:
                    self._states[i], self._stuck_since[i] = _STUCK, since
                    return

    def stuck_workers(self) -> list[tuple[int, float]]:
        """(pid, seconds in its model call) of every worker being replaced because it is stuck."""
        now = time.monotonic()
        return [
            (int(self._pids[i]), now - self._stuck_since[i])
            for i in range(_SLOTS)
            if self._states[i] == _STUCK
        ]

    def record_timeout(self) -> None:
        with self._lock:
            self._events[0] += 1

    def record_boot_failure(self) -> int:
        """Count a worker that failed to boot; the count so far."""
        with self._lock:
            self._events[2] += 1
            return int(self._events[2])

    def worker_slot(self, pid: int) -> int | None:
        """The slot of a ready worker (for :meth:`set_connections`), None when it is not ready."""
        with self._lock:
            for i in range(_SLOTS):
                if self._pids[i] == pid and self._states[i] == _READY:
                    return i
        return None

    def set_connections(self, slot: int, count: int) -> None:
        """Publish how many connections the worker in ``slot`` holds (no lock: one writer per
        slot)."""
        self._conns[slot] = count

    def fewest_connections(self, slot: int) -> int | None:
        """The fewest connections any other ready worker holds; None when there is no other."""
        counts = [self._conns[i] for i in range(_SLOTS) if i != slot and self._states[i] == _READY]
        return min(counts) if counts else None

    def set_stopping(self) -> None:
        with self._lock:
            self._health[2] = 1.0

    def ready_workers(self) -> int:
        with self._lock:
            return sum(1 for i in range(_SLOTS) if self._states[i] == _READY)

    def unexpected_deaths(self) -> int:
        return int(self._health[1])

    def health(self, expected_workers: int, crash_window: float) -> tuple[bool, str]:
        """(healthy, reason): every expected worker booted, none died unexpectedly lately, not
        stopping."""
        ready = self.ready_workers()
        since = time.monotonic() - self._health[0]
        if self._health[2]:
            return False, "the server is shutting down"
        stuck = self.stuck_workers()
        if stuck:
            pid, seconds = stuck[0]
            return False, (
                f"worker {pid} is stuck in a model call for {seconds:.0f} s (over "
                "TORCHBAY_SERVE_STUCK_TIMEOUT) and is being replaced"
            )
        if since < crash_window:
            return False, (
                f"a worker died unexpectedly {since:.1f} s ago ({int(self._health[1])} so far); "
                "see the server log"
            )
        if ready < expected_workers:
            return False, f"{ready} of {expected_workers} workers are ready"
        return True, f"{ready} workers ready"

    # --- metrics -----------------------------------------------------------------------------
    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        e = ENDPOINTS.index(endpoint) if endpoint in ENDPOINTS else len(ENDPOINTS) - 1
        c = CODES.index(status) if status in CODES else len(CODES) - 1
        b = _bucket(DURATION_BUCKETS, seconds)
        stride = len(DURATION_BUCKETS) + 1
        with self._lock:
            self._requests[e * len(CODES) + c] += 1
            self._durations[e * stride + b] += 1
            self._durations[e * stride + stride - 1] += seconds

    def record_batch(self, size: int) -> None:
        b = _bucket(BATCH_BUCKETS, size)
        with self._lock:
            self._batches[b] += 1
            self._batches[len(BATCH_BUCKETS)] += size

    def snapshot(self) -> dict[str, Any]:
        """Copies of every counter, taken under the lock."""
        with self._lock:
            return {
                "requests": list(self._requests),
                "durations": list(self._durations),
                "batches": list(self._batches),
                "deaths": self._health[1],
                "timeouts": self._events[0],
                "stuck": self._events[1],
                "ready": sum(1 for i in range(_SLOTS) if self._states[i] == _READY),
            }

    def collector(self) -> _Collector:
        """A prometheus_client collector over these counters."""
        return _Collector(self)


def _bucket(bounds: Sequence[float], value: float) -> int:
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds) - 1


def _cumulative(bounds: Sequence[float], counts: Sequence[float]) -> list[tuple[str, float]]:
    out, total = [], 0.0
    for bound, count in zip(bounds, counts, strict=False):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return out


class _Collector:
    def __init__(self, state: SharedState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        # prometheus_client (~90 ms): only /metrics needs it, and agent.serving imports this module
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snap = self._state.snapshot()
        requests = CounterMetricFamily(
            "torchbay_serve_requests",
            "HTTP requests answered, by endpoint and status.",
            labels=["endpoint", "code"],
        )
        for e, endpoint in enumerate(ENDPOINTS):
            for c, code in enumerate(CODES):
                value = snap["requests"][e * len(CODES) + c]
                if value:
                    requests.add_metric([endpoint, str(code) if code else "other"], value)
        yield requests
        durations = HistogramMetricFamily(
            "torchbay_serve_request_duration_seconds",
            "Time from the request's arrival at a worker to its response.",
            labels=["endpoint"],
        )
        stride = len(DURATION_BUCKETS) + 1
        for e, endpoint in enumerate(ENDPOINTS):
            row = snap["durations"][e * stride : (e + 1) * stride]
            if sum(row[:-1]):
                durations.add_metric([endpoint], _cumulative(DURATION_BUCKETS, row[:-1]), row[-1])
        yield durations
        batches = HistogramMetricFamily(
            "torchbay_serve_batch_size", "Requests joined into one model call (1 without batching)."
        )
        if sum(snap["batches"][:-1]):
            batches.add_metric(
                [], _cumulative(BATCH_BUCKETS, snap["batches"][:-1]), snap["batches"][-1]
            )
        yield batches
        yield CounterMetricFamily(
            "torchbay_serve_worker_deaths", "Workers that died unexpectedly.", value=snap["deaths"]
        )
        yield CounterMetricFamily(
            "torchbay_serve_timeouts",
            "Requests answered 504 because the model was too slow.",
            value=snap["timeouts"],
        )
        replaced = CounterMetricFamily(
            "torchbay_serve_worker_replacements",
            "Workers replaced after boot, by reason (died: any exit or signal; stuck: "
            "a model call over TORCHBAY_SERVE_STUCK_TIMEOUT).",
            labels=["reason"],
        )
        replaced.add_metric(["died"], snap["deaths"])
        replaced.add_metric(["stuck"], snap["stuck"])
        yield replaced
        yield GaugeMetricFamily(
            "torchbay_serve_workers_ready", "Workers booted and answering.", value=snap["ready"]
        )

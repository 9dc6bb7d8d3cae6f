"""Where metric points go: a JSON-lines file, TensorBoard event files, a Prometheus endpoint.

Each sink is optional and cheap to leave out: TensorBoard is used only when the
``tensorboard`` package is installed (its own event writer, never torch), and the
Prometheus endpoint only when a port is set (prometheus_client, its own registry,
127.0.0.1 by default).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["MetricsFile", "PrometheusEndpoint", "TensorBoardSink"]


class MetricsFile:
    """Append-only JSON lines; every ``write`` is one ``os.write`` of whole lines (safe across
    threads)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append one JSON object per record."""
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        if not data:
            return
        with self._lock:
            if self._fd is None:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        """Close the file; later writes are ignored. Idempotent."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class TensorBoardSink:
    """Scalars as TensorBoard event files in ``log_dir``, through the tensorboard package's own
    writer.

    ``TensorBoardSink.open`` returns None (and logs one INFO line) when tensorboard is not
    installed.
    """

    def __init__(self, writer: Any, summary_pb2: Any, event_pb2: Any) -> None:
        self._writer = writer
        self._summary = summary_pb2
        self._event = event_pb2
        self._steps: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, log_dir: Path, *, log: logging.Logger, suffix: str = ""
    ) -> TensorBoardSink | None:
        try:
            # tensorboard and protobuf: only for a job that asks for TensorBoard events
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            log.info("tensorboard is not installed: metric definitions go to the metrics file only")
            return None
        log_dir.mkdir(parents=True, exist_ok=True)
        writer = EventFileWriter(
            str(log_dir), max_queue_size=100, flush_secs=5, filename_suffix=suffix
        )
        return cls(writer, summary_pb2, event_pb2)

    def write(self, points: Iterable[Any]) -> None:
        """Add each point (``name``, ``value``, ``time``, ``rank``) as a scalar; the step counts per
        tag."""
        with self._lock:
            for point in points:
                tag = point.name if point.rank == 0 else f"{point.name}/rank{point.rank}"
                step = self._steps.get(tag, 0)
                self._steps[tag] = step + 1
                summary = self._summary.Summary(
                    value=[self._summary.Summary.Value(tag=tag, simple_value=point.value)]
                )
                self._writer.add_event(
                    self._event.Event(summary=summary, wall_time=point.time, step=step)
                )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


class PrometheusEndpoint:
    """Gauges in a private registry, served over HTTP by prometheus_client."""

    def __init__(self, port: int, *, addr: str = "127.0.0.1", prefix: str = "torchbay_") -> None:
        # prometheus_client (~70 ms): only for a job that serves its metrics
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self._registry = CollectorRegistry(auto_describe=True)
        self._gauge_cls = Gauge
        self._gauges: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._prefix = prefix
        self._lock = threading.Lock()
        server, self._thread = start_http_server(port, addr=addr, registry=self._registry)
        self._server: WSGIServer | None = server
        self.port: int = server.server_address[1]
        self.addr = addr

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        if self.addr in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}/metrics"

    def update(self, samples: Iterable[Mapping[str, Any]]) -> None:
        """Set gauges from records ``{"name": ..., "value": ..., "labels": {...}}``."""
        with self._lock:
            for sample in samples:
                labels = dict(sample.get("labels") or {})
                name = sample["name"]
                entry = self._gauges.get(name)
                if entry is None:
                    names = tuple(sorted(labels))
                    entry = (
                        self._gauge_cls(
                            self._prefix + name,
                            sample.get("help") or name,
                            labelnames=names,
                            registry=self._registry,
                        ),
                        names,
                    )
                    self._gauges[name] = entry
                gauge, names = entry
                if set(labels) != set(names):
                    continue  # a record whose labels differ from the first one's: not representable
                (gauge.labels(**labels) if names else gauge).set(float(sample["value"]))

    def close(self) -> None:
        """Stop serving. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

"""Telemetry: the system sampler, the Prometheus endpoint and the shipping of the log and metrics
files.

Started by the train lifecycle after the user's processes; :meth:`Telemetry.close` takes a
final sample and makes a final upload, also when the job failed or was stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.job import Job
from agent.storage import open_storage
from agent.telemetry.shipping import Shipper
from agent.telemetry.sinks import MetricsFile, PrometheusEndpoint

if TYPE_CHECKING:  # pragma: no cover
    from agent.telemetry.sampler import SystemSampler  # psutil: only when sampling

__all__ = ["Telemetry", "default_paths"]


def default_paths(job: Job) -> tuple[Path, Path]:
    """``(job log, metrics file)`` of this host: ``output/torchbay/job.log`` and
    ``output/torchbay/metrics.jsonl``."""
    return job.layout.job_log_file, job.layout.metrics_file


class Telemetry:
    """System metrics every ``sample_interval`` seconds, to the metrics file and Prometheus; log
    shipping.

    Args:
        job: the job (settings, layout, host, ``job_output_uri``).
        root_pid: the pid at the top of the job's process tree, or None (before launch / after
        exit).
        job_log, metrics_file: the files to write and ship (default: :func:`default_paths`).
        log: the agent's logger.
        nvml: an NVML module object for the sampler (tests inject a fake); None imports pynvml.
        storage: a Storage for the uploads; None opens one for ``job_output_uri``.
    """

    def __init__(
        self,
        job: Job,
        *,
        root_pid: Callable[[], int | None],
        job_log: Path | None = None,
        metrics_file: Path | None = None,
        log: logging.Logger | None = None,
        nvml: Any = None,
        storage: Any = None,
    ) -> None:
        default_log, default_metrics = default_paths(job)
        self._job = job
        self._host = job.resource.current_host
        self._settings = job.settings
        self._root_pid = root_pid
        self._job_log = job_log or default_log
        self._metrics_path = metrics_file or default_metrics
        self._log = log or logging.getLogger("torchbay.telemetry")
        self._nvml = nvml
        self._storage = storage
        self._sampler: SystemSampler | None = None
        self._metrics: MetricsFile | None = None
        self._prometheus: PrometheusEndpoint | None = None
        self._shipper: Shipper | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False

    @property
    def prometheus_url(self) -> str | None:
        """The URL of the Prometheus endpoint, when one is serving."""
        return self._prometheus.url if self._prometheus is not None else None

    def start(self) -> None:
        """Start sampling, the Prometheus endpoint (when a port is set) and periodic uploads.
        Idempotent."""
        if self._started or self._closed:
            return
        self._started = True
        settings = self._settings
        self._metrics = MetricsFile(self._metrics_path)
        if settings.telemetry.sample_interval > 0:
            self._start_sampling()
        uri = self._job.job_output_uri
        if uri is not None:
            given = self._storage

            def storage() -> Any:
                if given is not None:
                    return given
                return open_storage(uri, endpoint_url=settings.general.endpoint_url)

            base = uri.rstrip("/")
            files = [
                (self._job_log, f"{base}/job-{self._host}.log"),
                (self._metrics_path, f"{base}/metrics-{self._host}.jsonl"),
            ]
            self._shipper = Shipper(
                storage, files, interval=settings.telemetry.upload_interval, log=self._log
            )
            self._shipper.start()

    def _start_sampling(self) -> None:
        """The system sampler, its first sample and its thread, and the Prometheus endpoint when a
        port is set; without psutil system metrics are off and the rest of telemetry runs on."""
        try:
            from agent.telemetry.sampler import SystemSampler  # psutil (~8 ms): only when sampling
        except ImportError as err:
            self._log.debug("telemetry sampler not available (%s); system metrics are off", err)
            return
        settings = self._settings
        layout = self._job.layout
        paths = {"data": layout.data_dir, "model": layout.model_dir}
        self._sampler = SystemSampler(
            root_pid=self._root_pid,
            paths={k: p for k, p in paths.items() if p.exists()},
            nvml=self._nvml,
            log=self._log,
        )
        if settings.telemetry.prometheus_port is not None:
            try:
                self._prometheus = PrometheusEndpoint(
                    settings.telemetry.prometheus_port, addr=settings.telemetry.prometheus_addr
                )
            except OSError as err:  # optional: the job runs on without the endpoint
                self._log.warning(
                    "Prometheus endpoint off: cannot listen on %s:%s (%s); set "
                    "TORCHBAY_PROMETHEUS_PORT to a free port",
                    settings.telemetry.prometheus_addr,
                    settings.telemetry.prometheus_port,
                    err,
                )
            else:
                self._log.info("Prometheus metrics at %s", self._prometheus.url)
        self._take_sample()
        self._thread = threading.Thread(target=self._run, name="torchbay-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self._settings.telemetry.sample_interval
        while not self._stop.wait(interval):
            try:
                self._take_sample()
            except Exception:  # the sampler thread's top level: keep sampling, say why
                self._log.exception("telemetry: taking a system metrics sample failed")

    def _take_sample(self) -> None:
        if self._sampler is None:
            return
        now = time.time()
        records = self._sampler.sample()
        if self._metrics is not None:
            self._metrics.write(
                {
                    "time": round(now, 3),
                    "host": self._host,
                    "name": r["name"],
                    "value": r["value"],
                    **({"labels": r["labels"]} if r["labels"] else {}),
                }
                for r in records
            )
        if self._prometheus is not None:
            self._prometheus.update(records)

    def close(self) -> list[str]:
        """Final sample, flush, final upload of the log and metrics; returns URIs not uploaded.
        Idempotent."""
        if self._closed:
            return []
        self._closed = True
        if not self._started:
            return []
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._take_sample()
        except Exception:  # close must finish the upload below whatever the sampler does; it logs
            self._log.exception("telemetry: the final system metrics sample failed")
        if self._sampler is not None:
            self._sampler.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._prometheus is not None:
            self._prometheus.close()
        failed: list[str] = []
        if self._shipper is not None:
            failed = self._shipper.close()
            if failed:
                self._log.warning(
                    "telemetry: could not upload %s at the end of the job", ", ".join(failed)
                )
        return failed

"""Shipping: copy the job log and the metrics file to the job's output prefix now and then, and at
the end.

A file is uploaded only when it changed since its last upload, from a snapshot of
its first ``size`` bytes (the capture thread may be appending meanwhile). A failed
upload is logged and retried at the next turn; it never ends the job.

:func:`ship_host_report` is the last step of every train run: this host's job log and its
``failure``/``success`` file go to ``<output>/job-<host>.log`` and ``<output>/failure-<host>``
(or ``success-<host>``), also when the host failed before its script started.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from agent.errors import StorageError
from agent.storage import Storage, redact

__all__ = ["Shipper", "host_report_uris", "ship_host_report"]


class Shipper:
    """Upload ``files`` (local path, URI) every ``interval`` seconds from :meth:`start` and once
    more at :meth:`close`."""

    def __init__(
        self,
        storage: Callable[[], Storage],
        files: Sequence[tuple[Path, str]],
        *,
        interval: float,
        log: logging.Logger | None = None,
    ) -> None:
        """``storage`` gives the Storage on the first upload (the job's: agent.storage.JobStorage),
        so whatever it still has to set up happens in the shipping thread, not while the user's
        processes start."""
        self._make_storage = storage
        self._storage: Storage | None = None
        self._files = list(files)
        self._interval = interval
        self._log = log or logging.getLogger("torchbay.telemetry")
        self._shipped: dict[Path, tuple[int, int]] = {}
        self._failing: set[Path] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start periodic uploads. Idempotent."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="torchbay-ship", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.ship()
            except Exception:  # the shipping thread's top level: keep going, say why
                self._log.exception(
                    "telemetry: periodic upload of the job log failed; retrying later"
                )

    def ship(self) -> list[str]:
        """Upload every file that changed; returns the URIs that failed."""
        failed = []
        with self._lock:
            for path, uri in self._files:
                if not self._ship_one(path, uri):
                    failed.append(uri)
        return failed

    def _ship_one(self, path: Path, uri: str) -> bool:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return True
        key = (stat.st_size, stat.st_mtime_ns)
        if self._shipped.get(path) == key:
            return True
        try:
            with tempfile.TemporaryDirectory(prefix=".ship-", dir=path.parent) as tmp:
                snapshot = Path(tmp) / path.name
                with open(path, "rb") as src, open(snapshot, "wb") as dst:
                    _copy_prefix(src, dst, stat.st_size)
                if self._storage is None:
                    self._storage = self._make_storage()
                self._storage.put_file(snapshot, uri)
        except (StorageError, OSError) as err:
            if path not in self._failing:
                self._log.warning(
                    "telemetry: uploading %s to %s failed (%s); will retry",
                    path,
                    redact(uri),
                    redact(str(err)),
                )
            self._failing.add(path)
            return False
        if path in self._failing:
            self._log.info("telemetry: uploading %s to %s works again", path, redact(uri))
            self._failing.discard(path)
        self._shipped[path] = key
        return True

    def close(self) -> list[str]:
        """Stop the timer and upload once more; returns the URIs that could not be uploaded.
        Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.ship()


def _copy_prefix(src: IO[bytes], dst: IO[bytes], size: int) -> None:
    remaining = size
    while remaining > 0:
        chunk = src.read(min(remaining, 1 << 20))
        if not chunk:
            break
        dst.write(chunk)
        remaining -= len(chunk)


def host_report_uris(base: str, host: str) -> dict[str, str]:
    """Where one host's report goes under the job's output prefix: its job log and status file."""
    base = base.rstrip("/")
    return {
        "log": f"{base}/job-{host}.log",
        "failure": f"{base}/failure-{host}",
        "success": f"{base}/success-{host}",
    }


def ship_host_report(
    storage: Storage,
    base: str,
    host: str,
    *,
    job_log: Path,
    failure_file: Path,
    success_file: Path,
    log: logging.Logger,
) -> list[str]:
    """Upload this host's job log and its ``failure`` (or ``success``) file beside the job's
    outputs.

    Runs at the very end of every train run, whether the script ran or not; returns the URIs that
    failed
    (each logged as a warning: a report that cannot be uploaded never changes the job's exit code).
    """
    uris = host_report_uris(base, host)
    files = [(job_log, uris["log"])]
    if failure_file.exists():
        files.append((failure_file, uris["failure"]))
    elif success_file.exists():
        files.append((success_file, uris["success"]))
    failed = []
    for path, uri in files:
        if not path.exists():
            continue
        try:
            storage.put_file(path, uri)
        except (StorageError, OSError) as err:
            log.warning(
                "could not upload %s to %s (%s); it stays at %s",
                path.name,
                redact(uri),
                redact(str(err)),
                path,
            )
            failed.append(uri)
    if not failed:
        log.debug("uploaded %s", ", ".join(redact(uri) for _, uri in files))
    return failed

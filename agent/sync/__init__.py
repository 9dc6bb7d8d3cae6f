"""Live sync: checkpoints both ways, intermediate outputs and TensorBoard events uploaded as they
are written.

``restore()`` pulls ``CheckpointConfig.S3Uri`` into the local checkpoint folder before the script
starts. ``start()`` watches three folders with watchdog (inotify on Linux):

- the checkpoint folder (``job.checkpoint_local_path``) -> ``job.checkpoint_uri``
- ``output/intermediate/`` -> ``<S3OutputPath>/<job>/output/intermediate/``
- the TensorBoard folder (``job.tensorboard_local_path``) -> ``job.tensorboard_uri``

A file is uploaded once it is closed after writing (IN_CLOSE_WRITE) and has stayed untouched for
``sync_settle`` seconds, or, for files kept open (TensorBoard event files; every file when the
platform gives no close events), once its size and mtime stayed the same for ``sync_stable``
seconds. The bytes sent are checked against the file after reading: a file that changed while it
was read is not sent (small files are one PUT of a snapshot; large ones are a multipart upload
completed only when every part came from the same unchanged file), so no half-written object ever
appears under a real key. Failed uploads are retried with backoff until ``close(deadline)``, which
also re-scans every folder, compares it with the remote listing and reports what it could not send.

Parts: ``folders`` (what mirrors where), ``restore``, ``watch`` (watchdog events as notes),
``scheduler`` (pending uploads, the worker pool, retries), ``upload`` (the checked PUT / multipart).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import TorchBayError
from agent.job import Job
from agent.storage import JobStorage, Location, Storage
from agent.sync.folders import folder_prefix, plan_folders, remote_rel, walk_files
from agent.sync.restore import RestoreStopped, restore_folder
from agent.sync.scheduler import UploadScheduler
from agent.sync.watch import event_notes, start_observer

__all__ = ["LiveSync", "RestoreStopped"]


class LiveSync:
    """Keep the checkpoint, intermediate and TensorBoard folders in step with their S3 prefixes.

    ``storages`` is the job's (its one S3 client); ``storage`` overrides the backend (one shared by
    the three prefixes); ``on_uploaded(path, uri)``
    is called after each object is complete remotely (for benchmarks and tests).
    """

    def __init__(
        self,
        job: Job,
        *,
        log: logging.Logger,
        storage: Storage | None = None,
        storages: JobStorage | None = None,
        on_uploaded: Callable[[Path, str], None] | None = None,
    ) -> None:
        self._job = job
        self._log = log
        settings = job.settings
        self._workers = int(settings.sync.sync_workers)
        self._stable = float(settings.sync.sync_stable)
        self._endpoint_url = settings.general.endpoint_url
        self._storage_override = storage
        self._storages = storages or JobStorage.from_settings(settings)
        self._folders = plan_folders(job, log)
        self._scheduler = UploadScheduler(
            self._folders, settings, storage_for=self._storage_for, log=log, on_uploaded=on_uploaded
        )
        self._observer: Any = None
        self._started = False
        self._stopped = False
        self._left: list[str] = []
        self.counters = self._scheduler.counters

    @property
    def folders(self) -> tuple[tuple[Path, str], ...]:
        """(local folder, remote URI) of every folder this sync mirrors."""
        return tuple((f.local, f.remote.uri) for f in self._folders)

    def restore(self, stop: threading.Event | None = None) -> int:
        """Download every object under the checkpoint URI into the local checkpoint folder; returns
        files restored.

        Files already present locally with the object's size are kept. Raises StorageError (or a
        subclass)
        when the listing or a download fails, DiskFullError / StorageError naming the file on local
        errors,
        UnsafePathError for a key that would land outside the folder. ``stop`` set: no new file
        starts, the files under way end between two reads, RestoreStopped is raised
        (agent.sync.restore).
        """
        folder = next((f for f in self._folders if f.name == "checkpoints"), None)
        if folder is None:
            return 0
        return restore_folder(
            folder,
            self._storage_for(folder.remote),
            workers=self._workers,
            done=self._scheduler.done,
            log=self._log,
            stop=stop,
        )

    def start(self, *, watch: bool = True) -> None:
        """Start watching the folders and the upload pool; returns at once. Does nothing without
        folders. ``watch=False`` (the script already ended: nothing more will be written) uploads
        what the folders hold without starting the watcher."""
        if self._started or not self._folders:
            if not self._folders:
                self._log.info(
                    "live sync: no checkpoint, intermediate or TensorBoard URI; nothing to watch"
                )
            return
        self._started = True
        for folder in self._folders:
            folder.local.mkdir(parents=True, exist_ok=True)
        self._scheduler.start(self._workers)
        if watch:
            self._observer, close_events = start_observer(
                [f.local for f in self._folders], self._on_event, stable=self._stable, log=self._log
            )
            self._scheduler.close_events = close_events
        # Files written before the watch began (between restore and start) are picked up too.
        self._scheduler.note(
            lambda _sent: [
                (path, "found") for folder in self._folders for path in walk_files(folder.local)
            ]
        )
        for folder in self._folders:
            self._log.info("live sync: %s -> %s", folder.local, folder.remote.uri)

    def close(self, deadline: float) -> list[str]:
        """Upload everything not yet uploaded, by ``time.monotonic()`` deadline; returns the paths
        left unsent.

        Every folder is scanned again and compared with what was sent and with the remote listing
        (so
        objects lost remotely are sent again). Idempotent; logs what it could not finish.
        """
        if self._stopped:
            return list(self._left)
        if not self._folders:
            self._stopped = True
            return []
        if not self._started:
            self._started = True
            self._scheduler.start(self._workers)
        self._stop_observer(max(0.0, min(5.0, deadline - time.monotonic())))
        left = self._scheduler.drain(self._remote_sizes(deadline), deadline)
        self._stopped = True
        c = self.counters
        self._log.info(
            "live sync closed: %d uploads (%d bytes), %d deletes, %d retries, %d unchanged skipped",
            c.uploads,
            c.bytes,
            c.deletes,
            c.retries,
            c.skipped_unchanged,
        )
        for path, why in sorted(left.items()):
            self._log.warning("live sync: %s was not uploaded: %s", path, why)
        self._left = sorted(str(p) for p in left)
        return list(self._left)

    def _storage_for(self, loc: Location) -> Storage:
        """The job's storage for ``loc`` with no retries of its own: the sync retries with its own
        backoff."""
        if self._storage_override is not None:
            return self._storage_override
        return self._storages.for_uploads(loc.uri)

    def _on_event(self, event: Any) -> None:
        self._scheduler.note(lambda sent: event_notes(event, sent))

    def _stop_observer(self, timeout: float) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        observer.join(timeout)

    def _remote_sizes(self, deadline: float) -> dict[tuple[str, str], int] | None:
        """Sizes of the objects under every folder's prefix, or None when a listing failed."""
        sizes: dict[tuple[str, str], int] = {}
        for folder in self._folders:
            if time.monotonic() >= deadline:
                return None
            prefix = folder_prefix(folder.remote)
            try:
                for info in self._storage_for(folder.remote).list(prefix.uri):
                    sizes[(folder.name, remote_rel(info, prefix))] = info.size
            except TorchBayError as err:
                self._log.warning(
                    "live sync: cannot list %s to check what arrived (%s); sending what is "
                    "known to be unsent",
                    prefix.uri,
                    err,
                )
                return None
        return sizes

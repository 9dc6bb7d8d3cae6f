"""Live sync: checkpoints both ways, intermediate outputs and TensorBoard events uploaded as they are written.

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
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from agent.errors import DiskFullError, StorageError, TorchBayError
from agent.job import Job
from agent.safety import safe_join
from agent.storage import Location, S3Storage, Storage, make_s3_client, open_storage, parse_uri, translate_s3_error

__all__ = ["LiveSync"]

_S3_MIN_PART = 5 * 1024 * 1024
_PART_THREADS = 4
_RETRY_FIRST = 0.5
_CLOSE_RETRY_MAX = 1.0
_FAR = float("inf")
_GROWING_FACTOR = 5  # a file kept open and still growing is sent at least every 5 x sync_stable seconds

# (size, mtime_ns, inode): what "unchanged" means for a local file.
_Sig = tuple[int, int, int]


@dataclass(frozen=True)
class _Folder:
    """One watched folder and the prefix it mirrors to."""

    name: str
    local: Path
    remote: Location
    wait_for_close: bool  # True: upload on close only (checkpoints, intermediate); False: also when stable

    def uri_for(self, rel: str) -> str:
        return self.remote.child(rel).uri


@dataclass
class _Entry:
    """A pending upload or delete of one local path."""

    folder: _Folder
    rel: str
    path: Path
    due: float
    delete: bool = False
    closed: bool = False  # closed (or renamed in) after its last write
    created_only: bool = False  # appeared (moved in from outside, or found by a scan) with no write seen
    seen: Optional[_Sig] = None  # signature at the last stability look
    since: float = 0.0  # when the first change not yet sent was seen
    attempts: int = 0
    running: bool = False
    again: bool = False  # an event arrived while it was running
    last_error: str = ""


@dataclass
class _Counters:
    uploads: int = 0
    deletes: int = 0
    bytes: int = 0
    retries: int = 0
    skipped_unchanged: int = 0
    changed_while_reading: int = 0


class LiveSync:
    """Keep the checkpoint, intermediate and TensorBoard folders in step with their S3 prefixes.

    ``storage`` overrides the backend (one shared by the three prefixes); ``on_uploaded(path, uri)``
    is called after each object is complete remotely (for benchmarks and tests).
    """

    def __init__(self, job: Job, *, log: logging.Logger, storage: Optional[Storage] = None,
                 on_uploaded: Optional[Callable[[Path, str], None]] = None) -> None:
        self._job = job
        self._log = log
        settings = job.settings
        self._delete_remote = bool(settings.sync_delete)
        self._workers = int(settings.sync_workers)
        self._settle = float(settings.sync_settle)
        self._stable = float(settings.sync_stable)
        self._part_size = int(settings.sync_part_size)
        self._retry_max = float(settings.sync_retry_max)
        self._ignore = tuple(p.strip() for p in str(settings.sync_ignore).split(",") if p.strip())
        self._endpoint_url = settings.endpoint_url
        self._on_uploaded = on_uploaded
        self._storage_override = storage
        self._storages: dict[str, Storage] = {}
        self._folders = self._plan_folders(job)

        self._cond = threading.Condition()
        self._pending: dict[Path, _Entry] = {}
        self._done: dict[Path, _Sig] = {}
        self._sent_at: dict[Path, float] = {}  # when each growing (TensorBoard) file was last sent
        self._failed: dict[Path, str] = {}
        self._work: "queue.Queue[Optional[tuple[_Entry, bool, Optional[_Sig]]]]" = queue.Queue()
        self._storage_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._observer: Any = None
        self._close_events = True
        self._started = False
        self._closing = False
        self._stopped = False
        self._left: list[str] = []
        self.counters = _Counters()

    # --- public -------------------------------------------------------------------------------------

    @property
    def folders(self) -> tuple[tuple[Path, str], ...]:
        """(local folder, remote URI) of every folder this sync mirrors."""
        return tuple((f.local, f.remote.uri) for f in self._folders)

    def restore(self) -> int:
        """Download every object under the checkpoint URI into the local checkpoint folder; returns files restored.

        Files already present locally with the object's size are kept. Raises StorageError (or a subclass)
        when the listing or a download fails, DiskFullError / StorageError naming the file on local errors,
        UnsafePathError for a key that would land outside the folder.
        """
        folder = next((f for f in self._folders if f.name == "checkpoints"), None)
        if folder is None:
            return 0
        storage = self._storage_for(folder.remote)
        prefix = _folder_prefix(folder.remote)
        folder.local.mkdir(parents=True, exist_ok=True)
        todo: list[tuple[str, Path, int]] = []
        for info in storage.list(prefix.uri):
            rel = info.key[len(prefix.key):] if info.location.scheme == "s3" else \
                os.path.relpath(info.key, prefix.key)
            if not rel or rel.endswith("/"):
                continue
            dest = safe_join(folder.local, rel, what=f"checkpoint key {info.key!r}")
            if dest.is_file() and dest.stat().st_size == info.size:
                self._done[dest] = _sig(dest)
                continue
            todo.append((info.uri, dest, info.size))
        if not todo:
            self._log.info("checkpoint restore: nothing to fetch from %s", prefix.uri)
            return 0
        started = time.monotonic()
        errors: list[BaseException] = []
        lock = threading.Lock()

        def fetch(item: tuple[str, Path, int]) -> None:
            uri, dest, size = item
            try:
                storage.get_file(uri, dest, expected_size=size)
            except PermissionError as err:
                raise StorageError(
                    f"cannot write {dest} while restoring {uri}: permission denied; make {folder.local} "
                    f"writable by uid {os.getuid()}") from err
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise DiskFullError(f"disk full while restoring {dest} from {uri}; free space on "
                                        f"{folder.local} or use a bigger volume") from err
                raise StorageError(f"cannot write {dest} while restoring {uri}: {err.strerror}; "
                                   f"check {folder.local}") from err
            sig = _sig(dest)
            with lock:
                self._done[dest] = sig

        _run_parallel(fetch, todo, self._workers, errors)
        if errors:
            raise errors[0]
        total = sum(size for _, _, size in todo)
        self._log.info("checkpoint restore: %d files (%d bytes) from %s into %s in %.2f s", len(todo), total,
                       prefix.uri, folder.local, time.monotonic() - started)
        return len(todo)

    def start(self) -> None:
        """Start watching the folders and the upload pool; returns at once. Does nothing without folders."""
        if self._started or not self._folders:
            if not self._folders:
                self._log.info("live sync: no checkpoint, intermediate or TensorBoard URI; nothing to watch")
            return
        self._started = True
        for folder in self._folders:
            folder.local.mkdir(parents=True, exist_ok=True)
        for i in range(self._workers):
            self._spawn(self._worker_loop, f"torchbay-sync-upload-{i}")
        self._spawn(self._scheduler_loop, "torchbay-sync-scheduler")
        self._observer = self._start_observer()
        # Files written before the watch began (between restore and start) are picked up too.
        with self._cond:
            for folder in self._folders:
                for path in _walk_files(folder.local):
                    self._note_locked(path, "found")
            self._cond.notify_all()
        for folder in self._folders:
            self._log.info("live sync: %s -> %s", folder.local, folder.remote.uri)

    def close(self, deadline: float) -> list[str]:
        """Upload everything not yet uploaded, by ``time.monotonic()`` deadline; returns the paths left unsent.

        Every folder is scanned again and compared with what was sent and with the remote listing (so
        objects lost remotely are sent again). Idempotent; logs what it could not finish.
        """
        if self._stopped:
            return list(self._left)
        if not self._folders:
            self._stopped = True
            return []
        if not self._started:
            self._started = True
            for i in range(self._workers):
                self._spawn(self._worker_loop, f"torchbay-sync-upload-{i}")
            self._spawn(self._scheduler_loop, "torchbay-sync-scheduler")
        self._stop_observer(max(0.0, min(5.0, deadline - time.monotonic())))
        remote = self._remote_sizes(deadline)
        with self._cond:
            self._closing = True
            for folder in self._folders:
                for path in _walk_files(folder.local):
                    if self._ignored(path):
                        continue
                    try:
                        sig = _sig(path)
                    except OSError:
                        continue
                    rel = _rel(folder, path)
                    lost = remote is not None and remote.get((folder.name, rel), -1) != sig[0]
                    if self._done.get(path) != sig or lost:
                        if lost:
                            self._done.pop(path, None)
                        entry = self._entry_locked(folder, path, upload=True)
                        entry.closed = True
                        entry.due = 0.0
                        if entry.running:
                            entry.again = True
            for entry in self._pending.values():
                if not entry.running:
                    entry.closed = True
                    entry.due = min(entry.due, 0.0)
            self._cond.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(max(0.01, min(1.0, deadline - time.monotonic())))
            left = {p: (e.last_error or "not finished before the deadline") for p, e in self._pending.items()}
            left.update({p: why for p, why in self._failed.items() if p not in left})
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()
        for _ in self._threads:
            self._work.put(None)
        c = self.counters
        self._log.info("live sync closed: %d uploads (%d bytes), %d deletes, %d retries, %d unchanged skipped",
                       c.uploads, c.bytes, c.deletes, c.retries, c.skipped_unchanged)
        for path, why in sorted(left.items()):
            self._log.warning("live sync: %s was not uploaded: %s", path, why)
        self._left = sorted(str(p) for p in left)
        return list(self._left)

    # --- planning -----------------------------------------------------------------------------------

    def _plan_folders(self, job: Job) -> tuple[_Folder, ...]:
        if job.on_sagemaker:
            self._log.info("live sync: on SageMaker the platform syncs checkpoints and outputs; not watching")
            return ()
        layout = job.layout
        folders: list[_Folder] = []
        if job.checkpoint_uri:
            local = Path(job.checkpoint_local_path or layout.checkpoints_dir)
            folders.append(_Folder("checkpoints", local, parse_uri(job.checkpoint_uri), True))
        if job.job_output_uri:
            folders.append(_Folder("intermediate", Path(layout.intermediate_dir),
                                   parse_uri(job.job_output_uri.rstrip("/") + "/intermediate"), True))
        if job.tensorboard_uri:
            local = Path(job.tensorboard_local_path or layout.tensorboard_dir)
            folders.append(_Folder("tensorboard", local, parse_uri(job.tensorboard_uri), False))
        return tuple(folders)

    def _storage_for(self, loc: Location) -> Storage:
        if self._storage_override is not None:
            return self._storage_override
        with self._storage_lock:
            storage = self._storages.get(loc.scheme)
            if storage is None:
                if loc.scheme == "s3":
                    storage = S3Storage(make_s3_client(  # few built-in retries: the sync retries with its own backoff
                        self._endpoint_url, self._workers * _PART_THREADS + 4, max_attempts=2, connect_timeout=5))
                else:
                    storage = open_storage(loc.uri)
                self._storages[loc.scheme] = storage
            return storage

    # --- watching -----------------------------------------------------------------------------------

    def _start_observer(self) -> Any:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        sync = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                sync._on_event(event)

        roots = sorted({f.local.resolve() for f in self._folders})
        # Nested roots: watching the outer one recursively covers the inner one.
        roots = [r for r in roots if not any(o != r and o in r.parents for o in roots)]
        observer: Any = Observer()
        try:
            for root in roots:
                observer.schedule(_Handler(), str(root), recursive=True, event_filter=_event_filter())
            observer.start()
        except OSError as err:
            self._log.info("live sync: no inotify here (%s); polling every second and uploading files once "
                           "stable for %.1f s", err, self._stable)
            self._close_events = False
            observer = PollingObserver(timeout=1.0)
            for root in roots:
                observer.schedule(_Handler(), str(root), recursive=True, event_filter=_event_filter())
            observer.start()
        if type(observer).__name__ != "InotifyObserver" and self._close_events:
            self._log.info("live sync: %s gives no close events; files are uploaded once stable for %.1f s",
                           type(observer).__name__, self._stable)
            self._close_events = False
        return observer

    def _stop_observer(self, timeout: float) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        observer.join(timeout)

    def _on_event(self, event: Any) -> None:
        kind = event.event_type  # created, modified, closed, deleted, moved, opened, closed_no_write
        if kind in ("opened", "closed_no_write"):
            return
        src = Path(os.fsdecode(event.src_path))
        with self._cond:
            if self._stopped:
                return
            if event.is_directory:
                if kind in ("created", "moved"):
                    target = Path(os.fsdecode(event.dest_path)) if kind == "moved" else src
                    for path in _walk_files(target):
                        self._note_locked(path, "found")
                if kind in ("deleted", "moved"):
                    prefix = str(src) + os.sep
                    for path in [p for p in self._done if str(p).startswith(prefix)]:
                        self._note_locked(path, "deleted")
            elif kind == "moved":
                self._note_locked(src, "deleted")
                self._note_locked(Path(os.fsdecode(event.dest_path)), "closed")
            else:
                self._note_locked(src, kind)
            self._cond.notify_all()

    def _folder_of(self, path: Path) -> Optional[_Folder]:
        best: Optional[_Folder] = None
        for folder in self._folders:
            if folder.local == path.parent or folder.local in path.parents:
                if best is None or len(str(folder.local)) > len(str(best.local)):
                    best = folder
        return best

    def _ignored(self, path: Path) -> bool:
        return any(fnmatch.fnmatch(path.name, pattern) for pattern in self._ignore)

    def _note_locked(self, path: Path, kind: str) -> None:
        folder = self._folder_of(path)
        if folder is None or self._ignored(path):
            return
        now = time.monotonic()
        if kind == "deleted":
            entry = self._pending.get(path)
            if not self._delete_remote or (path not in self._done and (entry is None or not entry.running)):
                if entry is not None and not entry.running:
                    del self._pending[path]
                return
            entry = self._entry_locked(folder, path, upload=False)
            entry.due = now
        else:
            entry = self._entry_locked(folder, path, upload=True)
            if kind == "closed":
                entry.closed, entry.created_only = True, False
                entry.due = now + (0.0 if _size(path) >= self._part_size else self._settle)  # big: no bursts
            elif kind == "modified":
                entry.closed, entry.created_only = False, False
                entry.due = self._stable_due(entry, now) if self._stable_ok(folder) else _FAR
            else:  # created, found: complete if nothing writes to it for a while
                if not entry.closed:
                    entry.created_only = True
                    entry.seen = None
                    entry.due = now + self._stable
        if entry.running:
            entry.again = True

    def _stable_ok(self, folder: _Folder) -> bool:
        return not folder.wait_for_close or not self._close_events

    def _stable_due(self, entry: _Entry, now: float) -> float:
        """Next look at a file that is not closed: after the stability window, sooner for a growing open file."""
        due = now + self._stable
        if not entry.folder.wait_for_close:
            due = min(due, entry.since + _GROWING_FACTOR * self._stable)
        return due

    def _entry_locked(self, folder: _Folder, path: Path, *, upload: bool) -> _Entry:
        entry = self._pending.get(path)
        if entry is None:
            entry = _Entry(folder, _rel(folder, path), path, _FAR, since=time.monotonic())
            self._pending[path] = entry
        if entry.delete == upload:  # switching between upload and delete starts afresh
            entry.delete = not upload
            entry.closed = entry.created_only = False
            entry.seen = None
            entry.attempts = 0
        self._failed.pop(path, None)
        return entry

    # --- scheduling ---------------------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _scheduler_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                next_due = _FAR
                for entry in list(self._pending.values()):
                    if entry.running:
                        continue
                    if entry.due <= now:
                        self._decide_locked(entry, now)
                    if not entry.running and entry.path in self._pending:
                        next_due = min(next_due, entry.due)
                timeout = None if next_due == _FAR else max(0.005, next_due - time.monotonic())
                self._cond.wait(timeout)

    def _decide_locked(self, entry: _Entry, now: float) -> None:
        """Send a due entry to the pool, wait longer, or drop it."""
        if entry.delete:
            entry.running = True
            self._work.put((entry, True, None))
            return
        try:
            sig = _sig(entry.path)
        except FileNotFoundError:
            del self._pending[entry.path]  # gone before it was sent; its delete event handles the rest
            return
        except OSError as err:
            self._fail_locked(entry, f"cannot read it: {err.strerror}; check its permissions")
            return
        if self._done.get(entry.path) == sig:
            self.counters.skipped_unchanged += 1
            del self._pending[entry.path]
            return
        if not entry.folder.wait_for_close and not self._closing:
            # Event files grow by a record per flush (and some writers reopen them each time): send each
            # at most once per stability window rather than once per flush.
            next_send = self._sent_at.get(entry.path, -_FAR) + self._stable
            if now < next_send:
                entry.due = next_send
                return
        ready = entry.closed or self._closing
        if not ready and (entry.created_only or self._stable_ok(entry.folder)):
            growing_too_long = not entry.folder.wait_for_close and \
                now - entry.since >= _GROWING_FACTOR * self._stable
            if entry.seen == sig or growing_too_long:
                ready = True
            else:
                entry.seen = sig
                entry.due = self._stable_due(entry, now)
                return
        if not ready:
            entry.due = _FAR  # wait for its close event
            return
        entry.seen = sig
        entry.running = True
        self._work.put((entry, False, sig))

    def _fail_locked(self, entry: _Entry, why: str) -> None:
        self._log.error("live sync: %s: %s", entry.path, why)
        self._failed[entry.path] = why
        self._pending.pop(entry.path, None)

    # --- uploading ----------------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            entry, delete, expected = item
            outcome, detail = self._perform(entry, delete, expected)
            with self._cond:
                self._finish_locked(entry, delete, outcome, detail)
                self._cond.notify_all()

    def _perform(self, entry: _Entry, delete: bool, expected: Optional[_Sig]) -> tuple[str, Any]:
        """Run one upload or delete; returns (outcome, detail) with outcome ok/changed/retry/fail/gone."""
        uri = entry.folder.uri_for(entry.rel)
        try:
            storage = self._storage_for(entry.folder.remote)
            if delete or expected is None:
                storage.delete(uri)
                return "ok", None
            if not self._put(storage, entry.path, uri, expected):
                return "changed", None
            return "ok", expected
        except FileNotFoundError:
            return "gone", None
        except StorageError as err:
            return "retry", str(err)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                return "retry", f"disk full while reading it ({err.strerror}); free space"
            return "fail", f"cannot read it: {err.strerror}; check its permissions"
        except Exception as err:  # a worker thread's top level: log, never die silently
            self._log.exception("live sync: unexpected error on %s", entry.path)
            return "retry", f"{type(err).__name__}: {err}"

    def _finish_locked(self, entry: _Entry, delete: bool, outcome: str, detail: Any) -> None:
        entry.running = False
        path = entry.path
        if self._pending.get(path) is not entry:
            return
        now = time.monotonic()
        if outcome == "ok":
            if delete:
                self._done.pop(path, None)
                self.counters.deletes += 1
            else:
                self._done[path] = detail
                self._sent_at[path] = now
                self.counters.uploads += 1
                self.counters.bytes += detail[0]
                if self._on_uploaded is not None:
                    self._on_uploaded(path, entry.folder.uri_for(entry.rel))
            if entry.attempts:
                self._log.info("live sync: %s sent after %d retries", path, entry.attempts)
            entry.attempts, entry.last_error = 0, ""
            if entry.again:
                entry.again = False  # decide again: unchanged files are dropped there
                entry.since = now
                entry.due = min(entry.due, now)
            else:
                del self._pending[path]
        elif outcome == "changed":
            self.counters.changed_while_reading += 1
            entry.again = False
            entry.seen = None
            entry.due = now + (self._settle if entry.closed else self._stable)
            if self._closing:
                entry.due = now + 0.05
        elif outcome == "gone":
            if not entry.again:
                del self._pending[path]
            entry.again = False
        elif outcome == "fail":
            self._fail_locked(entry, str(detail))
        else:
            entry.attempts += 1
            entry.last_error = str(detail)
            self.counters.retries += 1
            cap = _CLOSE_RETRY_MAX if self._closing else self._retry_max
            delay = min(cap, _RETRY_FIRST * (2 ** min(entry.attempts - 1, 10)))
            entry.due = min(entry.due, now) if entry.again else now + delay
            entry.again = False
            log = self._log.warning if entry.attempts in (1, 5) or entry.attempts % 20 == 0 else self._log.debug
            log("live sync: %s %s failed (attempt %d), retrying in %.1f s: %s", "delete of" if delete
                else "upload of", path, entry.attempts, delay, detail)

    def _put(self, storage: Storage, path: Path, uri: str, expected: _Sig) -> bool:
        """Send ``path`` to ``uri`` only if every byte came from the file as ``expected``; False if it changed."""
        if isinstance(storage, S3Storage):
            return self._put_s3(storage, path, uri, expected)
        return _put_local(path, uri, expected)

    def _put_s3(self, storage: S3Storage, path: Path, uri: str, expected: _Sig) -> bool:
        client = storage.client
        loc = parse_uri(uri)
        size = expected[0]
        part_size = max(self._part_size, _S3_MIN_PART)
        where = str(getattr(client.meta, "endpoint_url", "the S3 endpoint"))
        if size < part_size:
            with open(path, "rb") as handle:
                data = handle.read()
            if len(data) != size or _sig(path) != expected:
                return False
            try:
                client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
            except Exception as err:  # botocore's exception classes are made at run time
                raise translate_s3_error(err, uri, where) from err
            return True
        try:
            upload_id = client.create_multipart_upload(Bucket=loc.bucket, Key=loc.key,
                                                       ChecksumAlgorithm="CRC32")["UploadId"]
        except Exception as err:
            raise translate_s3_error(err, uri, where) from err
        completed = False
        try:
            offsets = list(range(0, size, part_size))
            parts: dict[int, dict[str, Any]] = {}
            errors: list[BaseException] = []
            lock = threading.Lock()

            def send(index_offset: tuple[int, int]) -> None:
                from s3transfer.utils import ReadFileChunk  # streamed like boto3's own transfers

                number, offset = index_offset
                length = min(part_size, size - offset)
                body = ReadFileChunk.from_filename(str(path), offset, length, enable_callbacks=False)
                try:
                    if len(body) != length:
                        raise _Changed()
                    resp = client.upload_part(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id,
                                              PartNumber=number, Body=body, ChecksumAlgorithm="CRC32")
                except _Changed:
                    raise
                except Exception as err:
                    raise translate_s3_error(err, uri, where) from err
                finally:
                    body.close()
                part = {"PartNumber": number, "ETag": resp["ETag"]}
                if "ChecksumCRC32" in resp:
                    part["ChecksumCRC32"] = resp["ChecksumCRC32"]
                with lock:
                    parts[number] = part

            _run_parallel(send, list(enumerate(offsets, start=1)), _PART_THREADS, errors)
            if any(isinstance(err, _Changed) for err in errors):
                return False
            if errors:
                raise errors[0]
            if _sig(path) != expected:
                return False
            try:
                client.complete_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id,
                                                 MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]})
            except Exception as err:
                raise translate_s3_error(err, uri, where) from err
            completed = True
            return True
        finally:
            if not completed:
                try:
                    client.abort_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id)
                except Exception:  # best effort: an unreachable endpoint keeps the parts until its lifecycle rule
                    self._log.debug("live sync: could not abort multipart upload of %s", uri)

    def _remote_sizes(self, deadline: float) -> Optional[dict[tuple[str, str], int]]:
        """Sizes of the objects under every folder's prefix, or None when a listing failed."""
        sizes: dict[tuple[str, str], int] = {}
        for folder in self._folders:
            if time.monotonic() >= deadline:
                return None
            prefix = _folder_prefix(folder.remote)
            try:
                for info in self._storage_for(folder.remote).list(prefix.uri):
                    rel = info.key[len(prefix.key):] if info.location.scheme == "s3" else \
                        os.path.relpath(info.key, prefix.key)
                    sizes[(folder.name, rel)] = info.size
            except TorchBayError as err:
                self._log.warning("live sync: cannot list %s to check what arrived (%s); sending what is "
                                  "known to be unsent", prefix.uri, err)
                return None
        return sizes


def _event_filter() -> list:
    """The events the sync acts on: no opens or read-only closes (the uploader's own reads make those)."""
    from watchdog import events as ev

    return [ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileClosedEvent, ev.FileDeletedEvent,
            ev.FileMovedEvent, ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirMovedEvent]


class _Changed(Exception):
    """The file changed while a part was being read."""


def _sig(path: Path) -> _Sig:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _rel(folder: _Folder, path: Path) -> str:
    return path.relative_to(folder.local).as_posix()


def _folder_prefix(loc: Location) -> Location:
    """The location as a folder: a trailing slash so that ``ckpt`` does not match ``ckpt2/``."""
    if loc.scheme == "s3":
        key = loc.key if (not loc.key or loc.key.endswith("/")) else loc.key + "/"
        return Location("s3", loc.bucket, key)
    return loc


def _walk_files(root: Path) -> Iterable[Path]:
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return found


def _put_local(path: Path, uri: str, expected: _Sig) -> bool:
    dest = parse_uri(uri).key
    os.makedirs(os.path.dirname(dest) or "/", exist_ok=True)
    tmp = dest + ".torchbay-part"
    try:
        shutil.copyfile(path, tmp)
        if os.path.getsize(tmp) != expected[0] or _sig(path) != expected:
            os.unlink(tmp)
            return False
        os.replace(tmp, dest)
    except FileNotFoundError:
        if not os.path.exists(path):
            raise
        raise StorageError(f"cannot write {uri}: its folder vanished; check the destination")
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if err.filename and str(err.filename) == str(path):
            raise
        raise StorageError(f"cannot write {uri}: {err.strerror}; check the path and free space") from err
    return True


def _run_parallel(fn: Callable[[Any], None], items: list, threads: int, errors: list[BaseException]) -> None:
    """Run ``fn`` over ``items`` on up to ``threads`` daemon threads; exceptions are appended to ``errors``."""
    if not items:
        return
    work: "queue.Queue[Any]" = queue.Queue()
    for item in items:
        work.put(item)

    def loop() -> None:
        while not errors:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            try:
                fn(item)
            except BaseException as err:  # handed back to the caller, which raises it
                errors.append(err)

    if threads <= 1 or len(items) == 1:
        loop()
        return
    pool = [threading.Thread(target=loop, daemon=True) for _ in range(min(threads, len(items)))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()



"""The upload scheduler: pending uploads and deletes, when each is due, the worker pool and its
retries.

A file is uploaded once it is closed after writing (IN_CLOSE_WRITE) and has stayed untouched for
``sync_settle`` seconds, or, for files kept open (TensorBoard event files; every file when the
platform gives no close events), once its size and mtime stayed the same for ``sync_stable``
seconds. Failed uploads are retried with backoff until ``drain``.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.storage import Location, Storage
from agent.sync.folders import Folder, Sig, file_sig, file_size, rel_path, walk_files
from agent.sync.upload import put_checked

__all__ = ["Counters", "UploadScheduler"]

_RETRY_FIRST = 0.5
_CLOSE_RETRY_MAX = 1.0
_FAR = float("inf")
_GROWING_FACTOR = (
    5  # a file kept open and still growing is sent at least every 5 x sync_stable seconds
)


@dataclass
class _Entry:
    """A pending upload or delete of one local path."""

    folder: Folder
    rel: str
    path: Path
    due: float
    delete: bool = False
    closed: bool = False  # closed (or renamed in) after its last write
    created_only: bool = (
        False  # appeared (moved in from outside, or found by a scan) with no write seen
    )
    seen: Sig | None = None  # signature at the last stability look
    since: float = 0.0  # when the first change not yet sent was seen
    attempts: int = 0
    running: bool = False
    again: bool = False  # an event arrived while it was running
    last_error: str = ""


@dataclass
class Counters:
    """What the sync has done so far."""

    uploads: int = 0
    deletes: int = 0
    bytes: int = 0
    retries: int = 0
    skipped_unchanged: int = 0
    changed_while_reading: int = 0


class UploadScheduler:
    """Notes about local files in; uploads and deletes on a worker pool out, each once it is due.

    ``done`` maps every path whose current content is known to be remote to its signature.
    """

    def __init__(
        self,
        folders: tuple[Folder, ...],
        settings: Any,
        *,
        storage_for: Callable[[Location], Storage],
        log: logging.Logger,
        on_uploaded: Callable[[Path, str], None] | None = None,
    ) -> None:
        self._folders = folders
        self._log = log
        self._storage_for = storage_for
        self._on_uploaded = on_uploaded
        self._delete_remote = bool(settings.sync.sync_delete)
        self._settle = float(settings.sync.sync_settle)
        self._stable = float(settings.sync.sync_stable)
        self._part_size = int(settings.sync.sync_part_size)
        self._retry_max = float(settings.sync.sync_retry_max)
        self._ignore = tuple(
            p.strip() for p in str(settings.sync.sync_ignore).split(",") if p.strip()
        )

        self._cond = threading.Condition()
        self._pending: dict[Path, _Entry] = {}
        self.done: dict[Path, Sig] = {}
        self._sent_at: dict[Path, float] = {}  # when each growing (TensorBoard) file was last sent
        self._failed: dict[Path, str] = {}
        self._work: queue.Queue[tuple[_Entry, bool, Sig | None] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.close_events = True  # False: the watcher gives no close events, files go once stable
        self._closing = False
        self._stopped = False
        self.counters = Counters()

    # --- public
    # -------------------------------------------------------------------------------------

    def start(self, workers: int) -> None:
        """Start ``workers`` upload threads and the scheduling thread."""
        for i in range(workers):
            self._spawn(self._worker_loop, f"torchbay-sync-upload-{i}")
        self._spawn(self._scheduler_loop, "torchbay-sync-scheduler")

    def note(self, make_notes: Callable[[Iterable[Path]], Iterable[tuple[Path, str]]]) -> None:
        """Take the notes ``make_notes(done paths)`` returns (path, kind) unless stopped; see
        agent.sync.watch."""
        with self._cond:
            if self._stopped:
                return
            for path, kind in make_notes(self.done):
                self._note_locked(path, kind)
            self._cond.notify_all()

    def drain(self, remote: dict[tuple[str, str], int] | None, deadline: float) -> dict[Path, str]:
        """Send every file not yet sent (or whose size differs from ``remote``) by ``deadline``,
        then stop.

        Returns the paths left unsent with why. ``remote`` maps (folder name, rel) to the remote
        size,
        or is None when the listing failed.
        """
        with self._cond:
            self._closing = True
            for folder in self._folders:
                for path in walk_files(folder.local):
                    if self._ignored(path):
                        continue
                    try:
                        sig = file_sig(path)
                    except OSError:
                        continue
                    rel = rel_path(folder, path)
                    lost = remote is not None and remote.get((folder.name, rel), -1) != sig[0]
                    if self.done.get(path) != sig or lost:
                        if lost:
                            self.done.pop(path, None)
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
            left = {
                p: (e.last_error or "not finished before the deadline")
                for p, e in self._pending.items()
            }
            left.update({p: why for p, why in self._failed.items() if p not in left})
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()
        for _ in self._threads:
            self._work.put(None)
        return left

    # --- notes
    # --------------------------------------------------------------------------------------

    def _folder_of(self, path: Path) -> Folder | None:
        best: Folder | None = None
        for folder in self._folders:
            inside = folder.local == path.parent or folder.local in path.parents
            if inside and (best is None or len(str(folder.local)) > len(str(best.local))):
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
            if not self._delete_remote or (
                path not in self.done and (entry is None or not entry.running)
            ):
                if entry is not None and not entry.running:
                    del self._pending[path]
                return
            entry = self._entry_locked(folder, path, upload=False)
            entry.due = now
        else:
            entry = self._entry_locked(folder, path, upload=True)
            if kind == "closed":
                entry.closed, entry.created_only = True, False
                entry.due = now + (
                    0.0 if file_size(path) >= self._part_size else self._settle
                )  # big: no bursts
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

    def _stable_ok(self, folder: Folder) -> bool:
        return not folder.wait_for_close or not self.close_events

    def _stable_due(self, entry: _Entry, now: float) -> float:
        """Next look at a file that is not closed: after the stability window, sooner for a growing
        open file."""
        due = now + self._stable
        if not entry.folder.wait_for_close:
            due = min(due, entry.since + _GROWING_FACTOR * self._stable)
        return due

    def _entry_locked(self, folder: Folder, path: Path, *, upload: bool) -> _Entry:
        entry = self._pending.get(path)
        if entry is None:
            entry = _Entry(folder, rel_path(folder, path), path, _FAR, since=time.monotonic())
            self._pending[path] = entry
        if entry.delete == upload:  # switching between upload and delete starts afresh
            entry.delete = not upload
            entry.closed = entry.created_only = False
            entry.seen = None
            entry.attempts = 0
        self._failed.pop(path, None)
        return entry

    # --- scheduling
    # ---------------------------------------------------------------------------------

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
            sig = file_sig(entry.path)
        except FileNotFoundError:
            del self._pending[
                entry.path
            ]  # gone before it was sent; its delete event handles the rest
            return
        except OSError as err:
            self._fail_locked(entry, f"cannot read it: {err.strerror}; check its permissions")
            return
        if self.done.get(entry.path) == sig:
            self.counters.skipped_unchanged += 1
            del self._pending[entry.path]
            return
        if not entry.folder.wait_for_close and not self._closing:
            # Event files grow by a record per flush (and some writers reopen them each time): send
            # each
            # at most once per stability window rather than once per flush.
            next_send = self._sent_at.get(entry.path, -_FAR) + self._stable
            if now < next_send:
                entry.due = next_send
                return
        ready = entry.closed or self._closing
        if not ready and (entry.created_only or self._stable_ok(entry.folder)):
            growing_too_long = (
                not entry.folder.wait_for_close
                and now - entry.since >= _GROWING_FACTOR * self._stable
            )
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

    # --- uploading
    # ----------------------------------------------------------------------------------

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

    def _perform(self, entry: _Entry, delete: bool, expected: Sig | None) -> tuple[str, Any]:
        """Run one upload or delete; returns (outcome, detail) with outcome
        ok/changed/retry/fail/gone."""
        uri = entry.folder.uri_for(entry.rel)
        try:
            storage = self._storage_for(entry.folder.remote)
            if delete or expected is None:
                storage.delete(uri)
                return "ok", None
            if not put_checked(
                storage, entry.path, uri, expected, part_size=self._part_size, log=self._log
            ):
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
                self.done.pop(path, None)
                self.counters.deletes += 1
            else:
                self.done[path] = detail
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
            log = (
                self._log.warning
                if entry.attempts in (1, 5) or entry.attempts % 20 == 0
                else self._log.debug
            )
            log(
                "live sync: %s %s failed (attempt %d), retrying in %.1f s: %s",
                "delete of" if delete else "upload of",
                path,
                entry.attempts,
                delay,
                detail,
            )

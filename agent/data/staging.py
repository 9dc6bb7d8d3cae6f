"""File mode: download a channel's objects into its folder, in parallel, verified and resumable.

Every object goes to ``<name>.part`` and is renamed into place only once its byte count and a
digest are right, so a crash never leaves a truncated file under its real name. A rerun skips files
that are already complete (same size, and the same ETag recorded in the ``user.torchbay.etag``
extended attribute when the filesystem has them). Short reads, spoiled bodies and transient errors
are retried under the one retry policy (agent.storage.retry); a full disk raises DiskFullError
naming the folder; a key that would escape the folder raises UnsafePathError before anything is
written.

Every GET is agent.storage's verified read: whole objects take the lean path
(agent.storage.lean: signed here, read over http.client, ~0.2 ms of CPU per GET against
botocore's ~1-2 ms), boto3 for anything unusual; the digest is the full-object CRC32/SHA S3 returns
when it returns one, else the MD5 a plain ETag is (agent.storage.checked). Large objects
(``large_size``) are fetched at most ``large_streams`` at a time, read 1 MiB at a time into a
reused buffer; objects at or above ``range_threshold`` in parallel ranges. Worker processes (each
with its own client) are used for lists of more than ``2 * objects_per_process`` objects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.data.fetch import DISK_FULL, ETAG_XATTR, Counters, FetchJob, run_in_process
from agent.data.listing import Entry
from agent.data.options import StageOptions
from agent.data.staging_progress import Progress, mib
from agent.data.staging_workers import run_processes
from agent.errors import ChannelError, DiskFullError, StoppedOnRequest
from agent.safety import safe_join, safe_join_empty
from agent.storage import Storage

__all__ = [  # StageOptions lives in agent.data.options
    "StageOptions",
    "StageResult",
    "StagingStopped",
    "stage",
]

DEFAULT_OPTIONS = StageOptions()


class StagingStopped(StoppedOnRequest):
    """Staging (or the listing it waits for) ended early because a stop was asked for (a signal
    to the agent); what was already in place stays, a rerun resumes."""


@dataclass(frozen=True)
class StageResult:
    """What one ``stage`` call did."""

    files: int  # objects now in place
    bytes: int
    fetched: int  # objects downloaded by this call
    skipped: int  # objects already complete from an earlier run
    seconds: float
    processes: int = 1


def stage(
    entries: Sequence[Entry],
    dest: Path,
    *,
    options: StageOptions = DEFAULT_OPTIONS,
    log: logging.Logger,
    channel: str = "?",
    storage: Storage | None = None,
    stop: Callable[[], bool] | None = None,
) -> StageResult:
    """Download ``entries`` into ``dest`` (each at its ``relative`` path); returns counts once all
    are in place.

    ``storage``: the job's storage for the entries' scheme (the one that listed the channel),
    shared by this process's threads (None: one is made from ``options.endpoint_url``).

    ``stop``: asked at every progress tick (every 0.2-0.5 s); once it says yes no new GET starts,
    the worker processes are ended, and StagingStopped is raised (files already renamed into place
    stay, no ``.part`` file is left by this process's fetchers).

    Raises UnsafePathError (a hostile key, before anything is written), ChannelError (two keys for
    one path),
    DiskFullError, or StorageError once retries are spent. Never returns with a file missing.
    """
    start = time.monotonic()
    dest = Path(dest)
    _make_dir(dest)
    empty = _empty(dest)  # a first run: nothing to resume, no link to follow
    jobs = _plan(entries, dest, channel, empty)
    todo = jobs if empty else [job for job in jobs if not _complete(job)]
    skipped = len(jobs) - len(todo)
    todo_set = set(todo)
    skipped_bytes = (
        sum(os.path.getsize(job.target) for job in jobs if job not in todo_set) if skipped else 0
    )
    known = [job.size for job in jobs]
    total_bytes = sum(size for size in known if size is not None) if None not in known else None
    for job in jobs:
        if job not in todo_set and skipped:
            try:
                os.unlink(
                    job.target + ".part"
                )  # left by a crash after the file itself was complete
            except FileNotFoundError:
                pass
    if skipped:
        log.info(
            "channel %r: %d of %d files already complete in %s; fetching the other %d",
            channel,
            skipped,
            len(jobs),
            dest,
            len(todo),
        )
    processes = _pick_processes(todo, options)
    progress = Progress(
        channel, len(jobs), total_bytes, skipped, skipped_bytes, options.progress_interval, log
    )
    fetched_bytes = 0  # counted by the fetchers (each checked against its Content-Length)
    cancel = threading.Event()

    def tick(files: int, nbytes: int) -> None:
        if stop is not None and stop():
            cancel.set()  # the fetchers and the workers' loop end on it
        progress.tick(files, nbytes)

    try:
        if todo and processes > 1:
            fetched_bytes = run_processes(todo, options, processes, tick, cancel)
        elif todo:
            counters = Counters()
            run_in_process(todo, options, counters, tick, cancel, storage=storage)
            fetched_bytes = counters.bytes
    except Exception:
        # a fetch that gave up because of the cancel is no failure of its own
        _raise_if_stopped(cancel, stop, channel)
        raise
    _raise_if_stopped(cancel, stop, channel)
    seconds = time.monotonic() - start
    result = StageResult(
        len(jobs), skipped_bytes + fetched_bytes, len(todo), skipped, seconds, processes
    )
    rate = fetched_bytes / seconds / 2**20 if seconds > 0 else 0.0
    log.info(
        "channel %r: staged %d files (%s) into %s in %.2f s: fetched %d (%.1f MiB/s, %.0f files/s, "
        "%d process(es)), skipped %d already complete",
        channel,
        result.files,
        mib(result.bytes),
        dest,
        seconds,
        len(todo),
        rate,
        len(todo) / seconds if seconds > 0 else 0.0,
        processes,
        skipped,
    )
    return result


def _raise_if_stopped(
    cancel: threading.Event, stop: Callable[[], bool] | None, channel: str
) -> None:
    if cancel.is_set() and stop is not None and stop():
        raise StagingStopped(f"channel {channel!r}: staging stopped on request")


# --- planning ------------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise DiskFullError(
                f"disk full creating {path}; free space there or use a bigger volume"
            ) from err
        raise ChannelError(
            f"cannot create {path}: {err.strerror}; check the path and permissions"
        ) from err


def _empty(path: Path) -> bool:
    with os.scandir(path) as found:
        return next(found, None) is None


def _plan(entries: Sequence[Entry], dest: Path, channel: str, empty: bool) -> list[FetchJob]:
    jobs = []
    owner: dict[str, str] = {}
    what = f"channel {channel!r}: object key"
    root = str(dest.resolve())
    for entry in entries:
        if empty:  # the names alone decide: ~10 system calls an object fewer than safe_join
            text = safe_join_empty(root, entry.relative, what=what)
        else:
            text = str(safe_join(dest, entry.relative, what=what))
        if text in owner:
            raise ChannelError(
                f"channel {channel!r}: {owner[text]} and {entry.uri} both map to {text}; "
                "rename one of the objects"
            )
        owner[text] = entry.uri
        jobs.append(FetchJob(entry.uri, text, entry.size, entry.etag))
    for text, uri in owner.items():
        parent = os.path.dirname(text)
        while len(parent) > len(root):
            if parent in owner:
                raise ChannelError(
                    f"channel {channel!r}: {owner[parent]} is a file but {uri} needs it as a "
                    "folder; rename one of the objects"
                )
            parent = os.path.dirname(parent)
    return jobs


def _complete(job: FetchJob) -> bool:
    try:
        st = os.stat(job.target)
    except OSError:
        return False
    if job.size is None or st.st_size != job.size:
        return False
    if job.etag:
        try:
            return os.getxattr(job.target, ETAG_XATTR).decode() == job.etag
        except OSError:
            return False
    return True


def _pick_processes(jobs: Sequence[FetchJob], options: StageOptions) -> int:
    if options.processes > 0:
        return max(1, min(options.processes, len(jobs)))
    per_process = max(1, options.objects_per_process)
    if len(jobs) < 2 * per_process:
        return 1  # a worker's start-up (~0.35 s of CPU) would cost more than it saves
    sizes = [job.size for job in jobs if job.size is not None]
    if sizes and sum(sizes) / len(sizes) > 4 * 1024**2:
        return 1  # large objects are bound by the network and the disk, not by Python
    cpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(cpus, 4, len(jobs) // per_process))

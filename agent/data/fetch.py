"""Fetching staged objects in this process: each into ``<name>.part``, verified, then renamed into
place.

``run_in_process`` fetches a list of jobs on a pool of threads sharing one storage (one S3
client); every GET is a verified read of agent.storage (byte count and digest), retried under the
one retry policy (agent.storage.retry). See agent.data.staging for the whole picture.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.data.options import StageOptions
from agent.errors import ChannelError, DiskFullError, StorageError, TorchBayError
from agent.storage import (
    CheckedRead,
    JobStorage,
    ReadOptions,
    RetryPolicy,
    S3Storage,
    ShortRead,
    Storage,
    parse_uri,
    with_retries,
)
from agent.storage.multiget import get_many

if TYPE_CHECKING:  # pragma: no cover
    from agent.storage.lean import LeanGetter

__all__ = ["DISK_FULL", "ETAG_XATTR", "Counters", "FetchJob", "run_in_process"]

ETAG_XATTR = "user.torchbay.etag"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass
class Counters:
    """Objects and bytes fetched so far, shared by the fetch threads."""

    files: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, nbytes: int) -> None:
        """Count one more object of ``nbytes``."""
        with self.lock:
            self.files += 1
            self.bytes += nbytes


@dataclass(frozen=True)
class FetchJob:
    """One object to fetch: its URI, the local path, and the size and ETag the listing gave."""

    uri: str
    target: str
    size: int | None
    etag: str | None


def run_in_process(
    jobs: Sequence[FetchJob],
    options: StageOptions,
    counters: Counters,
    tick: Callable[[int, int], None] | None,
    cancel: threading.Event | None = None,
    *,
    storage: Storage | None = None,
) -> None:
    """Fetch ``jobs``; raises the first error after stopping the rest.

    Objects up to ``options.small_size`` go over one thread's ``options.small_connections``
    multiplexed connections (agent.storage.multiget) where the lean path reaches the bucket over
    plain HTTP, the others meanwhile on ``options.threads`` threads; an object the multiplexed GETs
    could not deliver is fetched again on the threads, under the retry policy.

    ``storage`` is the job's storage for the jobs' scheme (the one that listed the channel); None
    makes one from ``options.endpoint_url``."""
    if storage is None:
        pool = max(10, options.threads + 4)
        storage = JobStorage(options.endpoint_url, pool=pool).for_uri(jobs[0].uri)
    fetcher = _Fetcher(storage, options)
    cancel = cancel or threading.Event()
    lean = fetcher.multiplexed(jobs[0]) if jobs else None
    small_size = options.small_size
    small = [job for job in jobs if job.size is not None and job.size <= small_size] if lean else []
    if lean is None or not small:
        _run_threads(jobs, fetcher, counters, tick, cancel)
        return
    others = [job for job in jobs if job.size is None or job.size > small_size]
    failures: list[BaseException] = []

    def threads(part: Sequence[FetchJob]) -> None:
        try:
            _run_threads(part, fetcher, counters, None, cancel)
        except BaseException as err:  # raised below, after the multiplexed GETs stopped
            failures.append(err)
            cancel.set()

    background = threading.Thread(target=threads, args=(others,), name="stage-large", daemon=True)
    if others:
        background.start()

    def deliver(job: FetchJob, body: CheckedRead) -> None:
        # read_all checks it (a ShortRead is fetched again on the threads); writing the file on
        # this thread measured as fast as handing it to writer threads
        counters.add(fetcher.write(job, body.read_all(), body.etag))

    def progress() -> None:
        if tick is not None:
            tick(counters.files, counters.bytes)

    try:
        missed = get_many(
            lean,
            ((job.uri, job.size, job) for job in small),
            deliver,
            connections=options.small_connections,
            options=fetcher.read_options,
            cancel=cancel,
            tick=progress,
        )
    except BaseException:
        cancel.set()
        raise
    finally:
        if others:
            background.join()
    if failures:
        raise failures[0]
    if missed.other and not cancel.is_set():
        _run_threads(missed.other, fetcher, counters, tick, cancel)
    if missed.spent and not cancel.is_set():  # their first attempt is spent
        _run_threads(missed.spent, fetcher, counters, tick, cancel, spent=1)


def _run_threads(
    jobs: Sequence[FetchJob],
    fetcher: _Fetcher,
    counters: Counters,
    tick: Callable[[int, int], None] | None,
    cancel: threading.Event,
    *,
    spent: int = 0,
) -> None:
    """Fetch ``jobs`` with ``options.threads`` threads, each object retried on its own (``spent``:
    attempts each has had already, counted against ``options.attempts``; one more at least)."""
    failures: list[BaseException] = []
    pending = iter(jobs)
    lock = threading.Lock()

    count = max(1, min(fetcher.threads, len(jobs)))
    running = [count]
    done = threading.Event()  # set by the last thread to finish: the wait ends at once

    def work() -> None:
        try:
            while not cancel.is_set():
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                try:
                    counters.add(fetcher.fetch(job, cancel, spent))
                except BaseException as err:  # handed to the caller below
                    with lock:
                        failures.append(err)
                    cancel.set()
                    return
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    done.set()

    threads = [threading.Thread(target=work, name=f"stage-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        while not done.wait(0.2):
            if tick is not None:
                tick(counters.files, counters.bytes)
    except BaseException:
        cancel.set()
        raise
    finally:
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]


class _Fetcher:
    """Downloads one job at a time into ``<target>.part``, verifies it and renames it into place."""

    def __init__(self, storage: Storage, options: StageOptions) -> None:
        self._options = options
        self._storage = storage
        self._ranged = isinstance(storage, S3Storage)
        self.read_options = ReadOptions(options.lean, options.verify_md5, options.md5_max_size)
        self._policy = RetryPolicy(attempts=max(1, options.attempts), backoff=options.backoff)
        self._large = threading.BoundedSemaphore(max(1, options.large_streams))
        self._buffers = threading.local()

    @property
    def threads(self) -> int:
        return self._options.threads

    def multiplexed(self, job: FetchJob) -> LeanGetter | None:
        """The lean getter when ``job``'s bucket can take multiplexed GETs (lean, plain HTTP)."""
        storage = self._storage
        if not (isinstance(storage, S3Storage) and self._options.lean and self._options.small_size):
            return None
        lean = storage.lean()
        return lean if lean is not None and lean.over_http(parse_uri(job.uri).bucket) else None

    def write(self, job: FetchJob, data: bytes, etag: str | None) -> int:
        """Put ``data`` (a whole verified body) in place of ``job``'s file; its byte count."""

        def fill(part: str) -> int:
            fd = _open_fd(part, job)
            try:
                _write_all(fd, data, job)
                if etag:
                    _set_etag(fd, etag)
            finally:
                os.close(fd)
            return len(data)

        return _into_place(job, fill)

    def fetch(self, job: FetchJob, cancel: threading.Event, spent: int = 0) -> int:
        policy = self._policy
        if spent:
            policy = dataclasses.replace(policy, attempts=max(1, policy.attempts - spent))
        return with_retries(
            lambda: self._fetch_once(job, cancel), policy, what=job.uri, cancel=cancel
        )[0]

    def _fetch_once(self, job: FetchJob, cancel: threading.Event) -> int:
        if job.size is not None and job.size >= self._options.large_size:
            with self._large:  # a few whole streams at a time beat many on a couple of cores
                return self._fetch_to_part(job, cancel)
        return self._fetch_to_part(job, cancel)

    def _fetch_to_part(self, job: FetchJob, cancel: threading.Event) -> int:
        if self._ranged and job.size is not None and job.size >= self._options.range_threshold:
            return _into_place(job, lambda part: self._get_ranged(job, part, cancel))
        return _into_place(job, lambda part: self._get_whole(job, part, cancel))

    def _get_whole(self, job: FetchJob, part: str, cancel: threading.Event) -> int:
        """Fetch into ``part``, verified (ETag recorded as an xattr for resumption); the bytes."""
        body = self._storage.get_checked(job.uri, size=job.size, options=self.read_options)
        try:
            fd = _open_fd(part, job)
            try:
                if body.length <= self._options.read_size:
                    _write_all(fd, body.read(-1), job)
                else:
                    buffer = self._buffer()
                    view = memoryview(buffer)
                    while True:
                        _check_cancel(cancel, job)  # a large body: between two reads
                        count = body.readinto(buffer)
                        if not count:
                            break
                        _write_all(fd, view[:count], job)
                body.finish()
                if body.etag:
                    _set_etag(fd, body.etag)
            finally:
                os.close(fd)
        finally:
            body.close()
        return body.length

    def _buffer(self) -> bytearray:
        buffer: bytearray | None = getattr(self._buffers, "buffer", None)
        if buffer is None:
            buffer = self._buffers.buffer = bytearray(max(64 * 1024, self._options.read_size))
        return buffer

    def _get_ranged(self, job: FetchJob, part: str, cancel: threading.Event) -> int:
        size = int(job.size or 0)
        step = max(1, self._options.range_size)
        ranges = [(start, min(start + step, size)) for start in range(0, size, step)]
        etags: set[str | None] = set()
        fd = _open_fd(part, job)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as err:
                raise _local_error(err, job) from err

            def one(byte_range: tuple[int, int]) -> None:
                offset = byte_range[0]
                with self._storage.get_checked(
                    job.uri, byte_range=byte_range, options=self.read_options
                ) as body:
                    etags.add(body.etag)
                    while True:
                        _check_cancel(cancel, job)
                        chunk = body.read(self._options.read_size)
                        if not chunk:
                            break
                        try:
                            os.pwrite(fd, chunk, offset)
                        except OSError as err:
                            raise _local_error(err, job) from err
                        offset += len(chunk)
                    body.finish()

            # concurrent.futures (~12 ms): only objects of range_threshold (1 GiB) or more need it
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max(1, min(len(ranges), self._options.threads))) as pool:
                for future in [pool.submit(one, r) for r in ranges]:
                    future.result()
            if len(etags) > 1:
                raise ShortRead(
                    f"{job.uri} changed while its ranges were fetched "
                    f"(ETags {sorted(map(str, etags))})"
                )
            etag = etags.pop() if etags else None
            if etag:
                _set_etag(fd, etag)
        finally:
            os.close(fd)
        return size


def _check_cancel(cancel: threading.Event, job: FetchJob) -> None:
    """Stop a large body between two reads once the staging is cancelled (a stop request, or
    another object's failure); its ``.part`` file is removed by _into_place."""
    if cancel.is_set():
        raise StorageError(f"staging cancelled while {job.uri} was fetched")


def _into_place(job: FetchJob, fill: Callable[[str], int]) -> int:
    """``fill(part)`` writes ``job``'s ``.part`` file (and returns its bytes); it is then renamed
    into place, or removed when anything failed, so no file is ever under its name half-written."""
    part = job.target + ".part"
    try:
        nbytes = fill(part)
        os.replace(part, job.target)
    except BaseException:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
    return nbytes


def _open_fd(part: str, job: FetchJob) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(part, flags, 0o644)
    except FileNotFoundError:
        pass  # its folder is not there yet
    except OSError as err:
        raise _local_error(err, job) from err
    try:
        os.makedirs(os.path.dirname(part), exist_ok=True)
        return os.open(part, flags, 0o644)
    except OSError as err:
        raise _local_error(err, job) from err


def _write_all(fd: int, data: bytes | memoryview, job: FetchJob) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as err:
        raise _local_error(err, job) from err


def _set_etag(fd: int, etag: str) -> None:
    try:
        os.setxattr(fd, ETAG_XATTR, etag.encode())
    except OSError:
        pass  # no xattrs here: a rerun trusts the size alone


def _local_error(err: OSError, job: FetchJob) -> TorchBayError:
    folder = os.path.dirname(job.target)
    if err.errno in DISK_FULL:
        return DiskFullError(
            f"disk full while staging {job.uri} into {folder}; free space there or give the "
            "job a bigger volume (nothing was marked staged)"
        )
    return ChannelError(
        f"cannot write {job.target} for {job.uri}: {err.strerror}; check the folder and "
        "its permissions"
    )

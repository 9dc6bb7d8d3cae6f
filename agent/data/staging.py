"""File mode: download a channel's objects into its folder, in parallel, verified and resumable.

Every object goes to ``<name>.part`` and is renamed into place only once its byte count and a digest are
right, so a crash never leaves a truncated file under its real name. A rerun skips files that are already
complete (same size, and the same ETag recorded in the ``user.torchbay.etag`` extended attribute when the
filesystem has them). Short reads, spoiled bodies and transient errors are retried with backoff; a full disk
raises DiskFullError naming the folder; a key that would escape the folder raises UnsafePathError before
anything is written.

Whole-object GETs take the lean path (agent.data.leanget: signed here, read over http.client, ~0.2 ms of CPU
per GET against botocore's ~1-2 ms), boto3 for anything unusual. The digest is the full-object CRC32/SHA S3
returns when it returns one (CRC32 costs a tenth of MD5), else the MD5 a plain ETag is; the boto3 path checks
the MD5 and botocore the CRC. Large objects (``large_size``) are fetched at most ``large_streams`` at a time,
read 1 MiB at a time into a reused buffer; objects at or above ``range_threshold`` in parallel ranges. Worker
processes (each with its own client) are used for lists of more than ``2 * objects_per_process`` objects.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue as queue_mod
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import agent.errors as errors_mod
from agent.data.leanget import BodyCheck, LeanNetError
from agent.data.listing import Entry
from agent.errors import (
    BucketMissing,
    ChannelError,
    DiskFullError,
    EndpointUnreachable,
    ObjectMissing,
    StorageError,
    TorchBayError,
    UnsafePathError,
)
from agent.safety import safe_join
from agent.storage import parse_uri

__all__ = ["StageOptions", "StageResult", "stage"]

ETAG_XATTR = "user.torchbay.etag"
_NO_RETRY_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "AccessDenied", "403", "404", "NotFound",
                             "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidObjectState"})
_LOCAL_ERRNOS = frozenset({errno.EACCES, errno.EROFS, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST})
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class StageOptions:
    """How to stage: threads per process, worker processes (0 = pick from the list), ranged GETs for objects
    of ``range_threshold`` bytes or more in ``range_size`` parts, attempts per object, progress interval."""

    threads: int = 16
    processes: int = 0
    range_threshold: int = 1024 ** 3
    range_size: int = 64 * 1024 ** 2
    attempts: int = 5
    progress_interval: float = 5.0
    verify_md5: bool = True
    endpoint_url: Optional[str] = None
    backoff: float = 0.5
    lean: bool = True  # signed GETs over http.client (agent.data.leanget), boto3 for anything unusual
    read_size: int = 1024 ** 2  # bytes per read of a large body into a reused buffer (1 MiB beat 4 and 16 MiB)
    md5_max_size: int = 1024 ** 3  # lean path, no CRC32/SHA from S3: bodies up to this size are checked by MD5
    large_size: int = 16 * 1024 ** 2  # objects this big or bigger ...
    large_streams: int = 2  # ... are fetched at most this many at a time per process
    objects_per_process: int = 4000  # processes=0: a worker process per this many objects (up to one per core)
    child_env: Optional[Mapping[str, str]] = None  # worker processes' environment (None: this process's)

    @classmethod
    def from_settings(cls, settings: Any, child_env: Optional[Mapping[str, str]] = None) -> "StageOptions":
        return cls(
            child_env=dict(child_env) if child_env else None,
            threads=settings.data_threads,
            processes=settings.data_processes,
            range_threshold=settings.data_range_threshold,
            range_size=settings.data_range_size,
            attempts=settings.data_attempts,
            progress_interval=settings.data_progress_interval,
            verify_md5=settings.data_verify_md5,
            endpoint_url=settings.endpoint_url,
            lean=settings.data_lean_get,
            read_size=settings.data_read_size,
            md5_max_size=settings.data_md5_max_size,
            large_size=settings.data_large_size,
            large_streams=settings.data_large_streams,
            objects_per_process=settings.data_objects_per_process,
        )


@dataclass(frozen=True)
class StageResult:
    """What one ``stage`` call did."""

    files: int  # objects now in place
    bytes: int
    fetched: int  # objects downloaded by this call
    skipped: int  # objects already complete from an earlier run
    seconds: float
    processes: int = 1


@dataclass
class _Counters:
    files: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.files += 1
            self.bytes += nbytes


@dataclass(frozen=True)
class _Job:
    uri: str
    target: str
    size: Optional[int]
    etag: Optional[str]


def stage(entries: Sequence[Entry], dest: Path, *, options: StageOptions = StageOptions(),
          log: logging.Logger, channel: str = "?") -> StageResult:
    """Download ``entries`` into ``dest`` (each at its ``relative`` path); returns counts once all are in place.

    Raises UnsafePathError (a hostile key, before anything is written), ChannelError (two keys for one path),
    DiskFullError, or StorageError once retries are spent. Never returns with a file missing.
    """
    start = time.monotonic()
    dest = Path(dest)
    _make_dir(dest)
    jobs = _plan(entries, dest, channel)
    todo = [job for job in jobs if not _complete(job)]
    skipped = len(jobs) - len(todo)
    todo_set = set(todo)
    skipped_bytes = sum(os.path.getsize(job.target) for job in jobs if job not in todo_set) if skipped else 0
    known = [job.size for job in jobs]
    total_bytes = sum(size for size in known if size is not None) if None not in known else None
    for job in jobs:
        if job not in todo_set and skipped:
            try:
                os.unlink(job.target + ".part")  # left by a crash after the file itself was complete
            except FileNotFoundError:
                pass
    if skipped:
        log.info("channel %r: %d of %d files already complete in %s; fetching the other %d",
                 channel, skipped, len(jobs), dest, len(todo))
    processes = _pick_processes(todo, options)
    progress = _Progress(channel, len(jobs), total_bytes, skipped, skipped_bytes, options.progress_interval, log)
    if todo:
        if processes > 1:
            _run_processes(todo, options, processes, progress)
        else:
            counters = _Counters()
            _run_in_process(todo, options, counters, progress.tick)
    fetched_bytes = sum(os.path.getsize(job.target) for job in todo)
    seconds = time.monotonic() - start
    result = StageResult(len(jobs), skipped_bytes + fetched_bytes, len(todo), skipped, seconds, processes)
    rate = fetched_bytes / seconds / 2 ** 20 if seconds > 0 else 0.0
    log.info("channel %r: staged %d files (%s) into %s in %.1f s: fetched %d (%.1f MiB/s, %.0f files/s, "
             "%d process(es)), skipped %d already complete", channel, result.files, _mib(result.bytes), dest,
             seconds, len(todo), rate, len(todo) / seconds if seconds > 0 else 0.0, processes, skipped)
    return result


# --- planning ------------------------------------------------------------------------------------

def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise DiskFullError(f"disk full creating {path}; free space there or use a bigger volume") from err
        raise ChannelError(f"cannot create {path}: {err.strerror}; check the path and permissions") from err


def _plan(entries: Sequence[Entry], dest: Path, channel: str) -> list[_Job]:
    jobs = []
    owner: dict[str, str] = {}
    for entry in entries:
        target = safe_join(dest, entry.relative, what=f"channel {channel!r}: object key")
        text = str(target)
        if text in owner:
            raise ChannelError(f"channel {channel!r}: {owner[text]} and {entry.uri} both map to {text}; "
                               "rename one of the objects")
        owner[text] = entry.uri
        jobs.append(_Job(entry.uri, text, entry.size, entry.etag))
    for text, uri in owner.items():
        parent = os.path.dirname(text)
        while len(parent) > len(str(dest)):
            if parent in owner:
                raise ChannelError(f"channel {channel!r}: {owner[parent]} is a file but {uri} needs it as a "
                                   "folder; rename one of the objects")
            parent = os.path.dirname(parent)
    return jobs


def _complete(job: _Job) -> bool:
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


def _pick_processes(jobs: Sequence[_Job], options: StageOptions) -> int:
    if options.processes > 0:
        return max(1, min(options.processes, len(jobs)))
    per_process = max(1, options.objects_per_process)
    if len(jobs) < 2 * per_process:
        return 1  # a worker's start-up (~0.35 s of CPU: Python, botocore) would cost more than it saves
    sizes = [job.size for job in jobs if job.size is not None]
    if sizes and sum(sizes) / len(sizes) > 4 * 1024 ** 2:
        return 1  # large objects are bound by the network and the disk, not by Python
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 4, len(jobs) // per_process))


# --- progress ------------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


class _Progress:
    """One log line every ``interval`` seconds: files, bytes, rate, ETA."""

    def __init__(self, channel: str, total_files: int, total_bytes: Optional[int], done_files: int,
                 done_bytes: int, interval: float, log: logging.Logger) -> None:
        self._channel = channel
        self._total_files = total_files
        self._total_bytes = total_bytes
        self._base_files = done_files
        self._base_bytes = done_bytes
        self._interval = interval
        self._log = log
        self._start = time.monotonic()
        self._next = self._start + interval

    def tick(self, files: int, nbytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        elapsed = max(now - self._start, 1e-6)
        rate = nbytes / elapsed
        done_files, done_bytes = self._base_files + files, self._base_bytes + nbytes
        if self._total_bytes:
            eta = (self._total_bytes - done_bytes) / rate if rate > 0 else float("inf")
            of_bytes = f"{_mib(done_bytes)}/{_mib(self._total_bytes)}"
        else:
            per_file = elapsed / files if files else float("inf")
            eta = (self._total_files - done_files) * per_file
            of_bytes = _mib(done_bytes)
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "unknown"
        self._log.info("channel %r: %d/%d files, %s, %.1f MiB/s, %.0f files/s, ETA %s", self._channel,
                       done_files, self._total_files, of_bytes, rate / 2 ** 20, files / elapsed, eta_text)


# --- downloading in this process ----------------------------------------------------------------

def _run_in_process(jobs: Sequence[_Job], options: StageOptions, counters: _Counters,
                    tick: Optional[Callable[..., None]], cancel: Optional[threading.Event] = None) -> None:
    """Fetch ``jobs`` with ``options.threads`` threads; raises the first error after stopping the others."""
    fetcher = _Fetcher(jobs[0].uri, options)
    cancel = cancel or threading.Event()
    failures: list[BaseException] = []
    pending = iter(jobs)
    lock = threading.Lock()

    def work() -> None:
        while not cancel.is_set():
            with lock:
                job = next(pending, None)
            if job is None:
                return
            try:
                counters.add(fetcher.fetch(job, cancel))
            except BaseException as err:  # handed to the caller below
                with lock:
                    failures.append(err)
                cancel.set()
                return

    threads = [threading.Thread(target=work, name=f"stage-{i}", daemon=True)
               for i in range(max(1, min(options.threads, len(jobs))))]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            threads[0].join(0.2) if threads[0].is_alive() else time.sleep(0.2)
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

    def __init__(self, any_uri: str, options: StageOptions) -> None:
        self._options = options
        self._scheme = parse_uri(any_uri).scheme
        self._client: Any = None
        self._lean: Any = None
        if self._scheme == "s3":
            from agent.storage import make_s3_client

            self._client = make_s3_client(options.endpoint_url, max_pool_connections=max(10, options.threads + 4))
            if options.lean:
                from agent.data.leanget import LeanGetter

                self._lean = LeanGetter.from_client(self._client)
        self._large = threading.BoundedSemaphore(max(1, options.large_streams))
        self._buffers = threading.local()

    def fetch(self, job: _Job, cancel: threading.Event) -> int:
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._fetch_once(job)
            except TorchBayError as err:
                if not _retryable(err) or attempt >= self._options.attempts or cancel.is_set():
                    if isinstance(err, LeanNetError):
                        raise self._translate(err, job) from err
                    raise
                last: BaseException = err
            except Exception as err:
                if isinstance(err, OSError) and not isinstance(err, ConnectionError):
                    raise _local_error(err, job) from err
                if not _retryable(err) or attempt >= self._options.attempts or cancel.is_set():
                    raise self._translate(err, job) from err
                last = err
            delay = min(self._options.backoff * 2 ** (attempt - 1), 10.0) * (0.5 + random.random())
            logging.getLogger(__name__).debug("retrying %s in %.1f s after %s", job.uri, delay, type(last).__name__)
            if cancel.wait(delay):
                if isinstance(last, TorchBayError) and not isinstance(last, LeanNetError):
                    raise last
                raise self._translate(last, job) from last

    def _translate(self, err: BaseException, job: _Job) -> TorchBayError:
        if isinstance(err, LeanNetError):
            where = str(getattr(self._client.meta, "endpoint_url", "the S3 endpoint"))
            return EndpointUnreachable(f"cannot reach {where} for {job.uri} ({err}); check AWS_ENDPOINT_URL and "
                                       "that the server is up")
        if isinstance(err, TorchBayError):
            return err
        if self._client is not None:
            from agent.storage import translate_s3_error

            where = str(getattr(self._client.meta, "endpoint_url", "the S3 endpoint"))
            return translate_s3_error(err, job.uri, where)  # type: ignore[arg-type]
        return StorageError(f"reading {job.uri} failed: {type(err).__name__}: {err}; check the source")

    def _fetch_once(self, job: _Job) -> int:
        if job.size is not None and job.size >= self._options.large_size:
            with self._large:  # a few whole streams at a time beat many on a couple of cores
                return self._fetch_to_part(job)
        return self._fetch_to_part(job)

    def _fetch_to_part(self, job: _Job) -> int:
        part = job.target + ".part"
        try:
            if self._scheme == "s3" and job.size is not None and job.size >= self._options.range_threshold:
                etag, nbytes = self._get_ranged(job, part), job.size
            else:
                etag, nbytes = self._get_whole(job, part)
            os.replace(part, job.target)
        except BaseException:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise
        return nbytes

    def _get_whole(self, job: _Job, part: str) -> tuple[Optional[str], int]:
        """Fetch into ``part`` (ETag recorded as an xattr for resumption); (etag, bytes)."""
        if self._lean is not None:
            loc = parse_uri(job.uri)
            resp = self._lean.open(loc.bucket, loc.key)
            if resp is not None:
                return self._get_lean(job, part, resp)
        return self._get_boto(job, part)

    def _get_lean(self, job: _Job, part: str, resp: Any) -> tuple[Optional[str], int]:
        length = resp.length
        try:
            if job.size is not None and length != job.size:
                raise _ShortRead(f"{job.uri} is {length} bytes but the listing said {job.size}; "
                                 "the object changed while staging, or the server is misbehaving")
            # One digest per object: the full-object CRC32/SHA S3 returned (CRC32 costs a tenth of MD5), else the
            # MD5 a plain ETag is, up to md5_max_size; the byte count is checked always.
            md5 = hashlib.md5() if (resp.checksum is None and resp.md5 and self._options.verify_md5 and
                                   length <= self._options.md5_max_size) else None
            check = BodyCheck(resp.checksum)
            fd = _open_fd(part, job)
            try:
                if length <= self._options.read_size:
                    data = resp.read()
                    if len(data) != length:
                        raise _ShortRead(f"short read: {job.uri} gave {len(data)} of {length} bytes")
                    if md5 is not None:
                        md5.update(data)
                    check.update(data)
                    _write_all(fd, data, job)
                    written = length
                else:
                    buffer = self._buffer()
                    view = memoryview(buffer)
                    written = 0
                    while True:
                        n = resp.readinto(buffer)
                        if not n:
                            break
                        chunk = view[:n]
                        if md5 is not None:
                            md5.update(chunk)
                        check.update(chunk)
                        _write_all(fd, chunk, job)
                        written += n
                    if written != length:
                        raise _ShortRead(f"short read: {job.uri} gave {written} of {length} bytes")
                if resp.etag:
                    _set_etag(fd, resp.etag)
            finally:
                os.close(fd)
        finally:
            resp.close()
        if md5 is not None and md5.hexdigest() != resp.etag:
            raise _ShortRead(f"checksum mismatch: {job.uri} has MD5 {md5.hexdigest()}, its ETag says {resp.etag}")
        if not check.matches():
            raise _ShortRead(f"checksum mismatch: {job.uri} {check.mismatch()}")
        return resp.etag, written

    def _buffer(self) -> bytearray:
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None:
            buffer = self._buffers.buffer = bytearray(max(64 * 1024, self._options.read_size))
        return buffer

    def _open(self, job: _Job, byte_range: Optional[tuple[int, int]] = None) -> tuple[Any, int, Optional[str], bool]:
        """(stream, length, etag, etag_is_md5)."""
        if self._scheme == "s3":
            loc = parse_uri(job.uri)
            kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
            if byte_range is not None:
                kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
            resp = self._client.get_object(**kwargs)
            etag = (resp.get("ETag") or "").strip('"') or None
            plain = bool(etag) and "-" not in etag and len(etag) == 32 and \
                resp.get("ServerSideEncryption") in (None, "AES256") and "SSECustomerAlgorithm" not in resp
            return resp["Body"], int(resp["ContentLength"]), etag, plain
        path = parse_uri(job.uri).key
        try:
            handle = open(path, "rb")
        except FileNotFoundError as err:
            raise ObjectMissing(f"{job.uri} does not exist; check the path") from err
        except OSError as err:
            raise StorageError(f"cannot read {job.uri}: {err.strerror}; check the path and permissions") from err
        return handle, os.fstat(handle.fileno()).st_size, None, False

    def _get_boto(self, job: _Job, part: str) -> tuple[Optional[str], int]:
        stream, length, etag, plain = self._open(job)
        try:
            if job.size is not None and length != job.size:
                raise _ShortRead(f"{job.uri} is {length} bytes but the listing said {job.size}; "
                                 "the object changed while staging, or the server is misbehaving")
            digest = hashlib.md5() if (plain and self._options.verify_md5) else None
            written = 0
            fd = _open_fd(part, job)
            try:
                while True:
                    chunk = stream.read(self._options.read_size)
                    if not chunk:
                        break
                    _write_all(fd, chunk, job)
                    written += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                if etag:
                    _set_etag(fd, etag)
            finally:
                os.close(fd)
        finally:
            stream.close()
        if written != length:
            raise _ShortRead(f"short read: {job.uri} gave {written} of {length} bytes")
        if digest is not None and digest.hexdigest() != etag:
            raise _ShortRead(f"checksum mismatch: {job.uri} has MD5 {digest.hexdigest()}, its ETag says {etag}")
        return etag, written

    def _get_ranged(self, job: _Job, part: str) -> Optional[str]:
        size = int(job.size or 0)
        step = max(1, self._options.range_size)
        ranges = [(start, min(start + step, size)) for start in range(0, size, step)]
        etags: set[Optional[str]] = set()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, size) if hasattr(os, "posix_fallocate") else os.ftruncate(fd, size)
            except OSError as err:
                raise _local_error(err, job) from err

            def one(byte_range: tuple[int, int]) -> None:
                stream, length, etag, _ = self._open(job, byte_range)
                etags.add(etag)
                offset, want = byte_range[0], byte_range[1] - byte_range[0]
                try:
                    if length != want:
                        raise _ShortRead(f"{job.uri} range {byte_range} gave {length} bytes, wanted {want}")
                    while True:
                        chunk = stream.read(self._options.read_size)
                        if not chunk:
                            break
                        try:
                            os.pwrite(fd, chunk, offset)
                        except OSError as err:
                            raise _local_error(err, job) from err
                        offset += len(chunk)
                finally:
                    stream.close()
                if offset != byte_range[1]:
                    raise _ShortRead(f"short read: {job.uri} range {byte_range} stopped at byte {offset}")

            with ThreadPoolExecutor(max(1, min(len(ranges), self._options.threads))) as pool:
                for future in [pool.submit(one, r) for r in ranges]:
                    future.result()
        finally:
            os.close(fd)
        if len(etags) > 1:
            raise _ShortRead(f"{job.uri} changed while its ranges were fetched (ETags {sorted(map(str, etags))})")
        etag = etags.pop() if etags else None
        if etag:
            try:
                os.setxattr(part, ETAG_XATTR, etag.encode())
            except OSError:
                pass  # no xattrs here: a rerun trusts the size alone
        return etag


class _ShortRead(StorageError):
    """A read that gave fewer (or other) bytes than promised: always retried, never accepted."""


def _open_fd(part: str, job: _Job) -> int:
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


def _write_all(fd: int, data: Any, job: _Job) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as err:
        raise _local_error(err, job) from err


def _set_etag(fd: int, etag: str) -> None:
    try:
        os.setxattr(fd, ETAG_XATTR, etag.encode())
    except OSError:
        pass  # no xattrs here: a rerun trusts the size alone


def _local_error(err: OSError, job: _Job) -> TorchBayError:
    folder = os.path.dirname(job.target)
    if err.errno in _DISK_FULL:
        return DiskFullError(f"disk full while staging {job.uri} into {folder}; free space there or give the "
                             "job a bigger volume (nothing was marked staged)")
    return ChannelError(f"cannot write {job.target} for {job.uri}: {err.strerror}; check the folder and "
                        "its permissions")


def _retryable(err: BaseException) -> bool:
    if isinstance(err, (_ShortRead, LeanNetError)):
        return True
    if isinstance(err, (DiskFullError, UnsafePathError, ObjectMissing, BucketMissing, ChannelError)):
        return False
    if isinstance(err, TorchBayError):
        return False
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        if code in _NO_RETRY_CODES:
            return False
    return not isinstance(err, (TypeError, ValueError, AttributeError, KeyError))


# --- worker processes ----------------------------------------------------------------------------
# Workers are plain `python -c ...` children (not multiprocessing, which would re-import the
# agent's __main__): the job list goes in on stdin as JSON, progress and the outcome come back as JSON lines.

def _run_processes(jobs: Sequence[_Job], options: StageOptions, processes: int, progress: _Progress) -> None:
    import json
    import signal
    import subprocess
    import sys

    # Largest first, dealt round-robin, so every worker gets a similar share of bytes.
    ordered = sorted(jobs, key=lambda job: -(job.size or 0))
    threads = max(4, options.threads // processes)
    worker_options = {**options.__dict__, "threads": threads, "processes": 1, "child_env": None}
    env = dict(options.child_env, PYTHONUNBUFFERED="1") if options.child_env else None  # None: inherit ours
    package_root = str(Path(__file__).resolve().parents[2])
    argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {package_root!r}); "
            "from agent.data.staging import _worker_main; sys.exit(_worker_main())"]
    messages: "queue_mod.Queue[tuple]" = queue_mod.Queue()
    children: list[subprocess.Popen] = []

    def pump(index: int, child: subprocess.Popen) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                messages.put((index, json.loads(line)))
            except ValueError:
                continue
        messages.put((index, {"kind": "eof"}))

    try:
        for index in range(processes):
            child = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True)
            children.append(child)
            payload = {"index": index, "options": worker_options,
                       "jobs": [job.__dict__ for job in ordered[index::processes]]}
            assert child.stdin is not None
            child.stdin.write(json.dumps(payload).encode())
            child.stdin.close()
            threading.Thread(target=pump, args=(index, child), daemon=True).start()
        files = [0] * processes
        nbytes = [0] * processes
        finished: set[int] = set()
        while len(finished) < processes:
            try:
                index, message = messages.get(timeout=0.5)
            except queue_mod.Empty:
                progress.tick(sum(files), sum(nbytes))
                continue
            kind = message.get("kind")
            if kind in ("progress", "done"):
                files[index], nbytes[index] = message["files"], message["bytes"]
                if kind == "done":
                    finished.add(index)
            elif kind == "error":
                cls = getattr(errors_mod, str(message.get("error")), StorageError)
                if not (isinstance(cls, type) and issubclass(cls, TorchBayError)):
                    cls = StorageError
                raise cls(str(message.get("message")))
            elif kind == "eof" and index not in finished:
                code = children[index].wait()
                raise StorageError(f"staging worker {index} exited with code {code} before finishing; "
                                   "see its output above")
            progress.tick(sum(files), sum(nbytes))
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            if child.stdout is not None:
                child.stdout.close()


def _worker_main() -> int:
    """A staging worker process: reads its jobs from stdin, writes JSON lines to stdout."""
    import json
    import sys

    spec = json.loads(sys.stdin.buffer.read())
    index = spec["index"]
    options = StageOptions(**spec["options"])
    jobs = [_Job(**job) for job in spec["jobs"]]
    lock = threading.Lock()

    def emit(message: dict) -> None:
        with lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    counters = _Counters()
    last = [0.0]

    def tick(files: int, nbytes: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            emit({"kind": "progress", "files": files, "bytes": nbytes})

    try:
        _run_in_process(jobs, options, counters, tick)
    except TorchBayError as err:
        name = "StorageError" if isinstance(err, _ShortRead) else type(err).__name__
        emit({"kind": "error", "error": name, "message": str(err)})
        return 1
    except Exception as err:  # top level of a worker process: report it; the parent raises
        emit({"kind": "error", "error": "StorageError",
              "message": f"staging worker {index} failed: {type(err).__name__}: {err}"})
        return 1
    emit({"kind": "done", "files": counters.files, "bytes": counters.bytes})
    return 0


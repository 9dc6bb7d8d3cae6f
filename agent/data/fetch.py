"""Fetching staged objects in this process: each into ``<name>.part``, verified, then renamed into
place.

``run_in_process`` fetches a list of jobs on a pool of threads with one client; short reads, spoiled
bodies and transient errors are retried with backoff (see agent.data.staging for the whole picture).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.data.leanget import BodyCheck, LeanNetError
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
from agent.storage import parse_uri

if TYPE_CHECKING:
    from agent.data.staging import StageOptions

__all__ = ["DISK_FULL", "ETAG_XATTR", "Counters", "FetchJob", "ShortRead", "run_in_process"]

ETAG_XATTR = "user.torchbay.etag"
_NO_RETRY_CODES = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "AccessDenied",
        "403",
        "404",
        "NotFound",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidObjectState",
    }
)
_LOCAL_ERRNOS = frozenset(
    {errno.EACCES, errno.EROFS, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}
)
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
    tick: Callable[..., None] | None,
    cancel: threading.Event | None = None,
    *,
    client: Any = None,
) -> None:
    """Fetch ``jobs`` with ``options.threads`` threads; raises the first error after stopping the
    others.

    ``client`` is an S3 client to share (the one that listed the channel); None makes one."""
    fetcher = _Fetcher(jobs[0].uri, options, client=client)
    cancel = cancel or threading.Event()
    failures: list[BaseException] = []
    pending = iter(jobs)
    lock = threading.Lock()

    count = max(1, min(options.threads, len(jobs)))
    running = [count]
    done = (
        threading.Event()
    )  # set by the last thread to finish: the wait below ends at once, not on a tick

    def work() -> None:
        try:
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

    def __init__(self, any_uri: str, options: StageOptions, *, client: Any = None) -> None:
        self._options = options
        self._scheme = parse_uri(any_uri).scheme
        self._client: Any = None
        self._lean: Any = None
        if self._scheme == "s3":
            if client is None:
                from agent.storage import make_s3_client

                client = make_s3_client(
                    options.endpoint_url, max_pool_connections=max(10, options.threads + 4)
                )
            self._client = client
            if options.lean:
                from agent.data.leanget import LeanGetter

                self._lean = LeanGetter.from_client(self._client)
        self._large = threading.BoundedSemaphore(max(1, options.large_streams))
        self._buffers = threading.local()

    def fetch(self, job: FetchJob, cancel: threading.Event) -> int:
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
            logging.getLogger(__name__).debug(
                "retrying %s in %.1f s after %s", job.uri, delay, type(last).__name__
            )
            if cancel.wait(delay):
                if isinstance(last, TorchBayError) and not isinstance(last, LeanNetError):
                    raise last
                raise self._translate(last, job) from last

    def _translate(self, err: BaseException, job: FetchJob) -> TorchBayError:
        if isinstance(err, LeanNetError):
            where = str(getattr(self._client.meta, "endpoint_url", "the S3 endpoint"))
            return EndpointUnreachable(
                f"cannot reach {where} for {job.uri} ({err}); check AWS_ENDPOINT_URL and "
                "that the server is up"
            )
        if isinstance(err, TorchBayError):
            return err
        if self._client is not None:
            from agent.storage import translate_s3_error

            where = str(getattr(self._client.meta, "endpoint_url", "the S3 endpoint"))
            return translate_s3_error(err, job.uri, where)  # type: ignore[arg-type]
        return StorageError(
            f"reading {job.uri} failed: {type(err).__name__}: {err}; check the source"
        )

    def _fetch_once(self, job: FetchJob) -> int:
        if job.size is not None and job.size >= self._options.large_size:
            with self._large:  # a few whole streams at a time beat many on a couple of cores
                return self._fetch_to_part(job)
        return self._fetch_to_part(job)

    def _fetch_to_part(self, job: FetchJob) -> int:
        part = job.target + ".part"
        try:
            if (
                self._scheme == "s3"
                and job.size is not None
                and job.size >= self._options.range_threshold
            ):
                _etag, nbytes = self._get_ranged(job, part), job.size
            else:
                _etag, nbytes = self._get_whole(job, part)
            os.replace(part, job.target)
        except BaseException:
            try:
                os.unlink(part)
            except OSError:
                pass
            raise
        return nbytes

    def _get_whole(self, job: FetchJob, part: str) -> tuple[str | None, int]:
        """Fetch into ``part`` (ETag recorded as an xattr for resumption); (etag, bytes)."""
        if self._lean is not None:
            loc = parse_uri(job.uri)
            resp = self._lean.open(loc.bucket, loc.key)
            if resp is not None:
                return self._get_lean(job, part, resp)
        return self._get_boto(job, part)

    def _get_lean(self, job: FetchJob, part: str, resp: Any) -> tuple[str | None, int]:
        length = resp.length
        try:
            if job.size is not None and length != job.size:
                raise ShortRead(
                    f"{job.uri} is {length} bytes but the listing said {job.size}; "
                    "the object changed while staging, or the server is misbehaving"
                )
            # One digest per object: the full-object CRC32/SHA S3 returned (CRC32 costs a tenth of
            # MD5), else the
            # MD5 a plain ETag is, up to md5_max_size; the byte count is checked always.
            md5 = (
                hashlib.md5()
                if (
                    resp.checksum is None
                    and resp.md5
                    and self._options.verify_md5
                    and length <= self._options.md5_max_size
                )
                else None
            )
            check = BodyCheck(resp.checksum)
            fd = _open_fd(part, job)
            try:
                if length <= self._options.read_size:
                    data = resp.read()
                    if len(data) != length:
                        raise ShortRead(f"short read: {job.uri} gave {len(data)} of {length} bytes")
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
                        raise ShortRead(f"short read: {job.uri} gave {written} of {length} bytes")
                if resp.etag:
                    _set_etag(fd, resp.etag)
            finally:
                os.close(fd)
        finally:
            resp.close()
        if md5 is not None and md5.hexdigest() != resp.etag:
            raise ShortRead(
                f"checksum mismatch: {job.uri} has MD5 {md5.hexdigest()}, its ETag says {resp.etag}"
            )
        if not check.matches():
            raise ShortRead(f"checksum mismatch: {job.uri} {check.mismatch()}")
        return resp.etag, written

    def _buffer(self) -> bytearray:
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None:
            buffer = self._buffers.buffer = bytearray(max(64 * 1024, self._options.read_size))
        return buffer

    def _open(
        self, job: FetchJob, byte_range: tuple[int, int] | None = None
    ) -> tuple[Any, int, str | None, bool]:
        """(stream, length, etag, etag_is_md5)."""
        if self._scheme == "s3":
            loc = parse_uri(job.uri)
            kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
            if byte_range is not None:
                kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
            resp = self._client.get_object(**kwargs)
            etag = (resp.get("ETag") or "").strip('"') or None
            plain = (
                bool(etag)
                and "-" not in etag
                and len(etag) == 32
                and resp.get("ServerSideEncryption") in (None, "AES256")
                and "SSECustomerAlgorithm" not in resp
            )
            return resp["Body"], int(resp["ContentLength"]), etag, plain
        path = parse_uri(job.uri).key
        try:
            handle = open(path, "rb")
        except FileNotFoundError as err:
            raise ObjectMissing(f"{job.uri} does not exist; check the path") from err
        except OSError as err:
            raise StorageError(
                f"cannot read {job.uri}: {err.strerror}; check the path and permissions"
            ) from err
        return handle, os.fstat(handle.fileno()).st_size, None, False

    def _get_boto(self, job: FetchJob, part: str) -> tuple[str | None, int]:
        stream, length, etag, plain = self._open(job)
        try:
            if job.size is not None and length != job.size:
                raise ShortRead(
                    f"{job.uri} is {length} bytes but the listing said {job.size}; "
                    "the object changed while staging, or the server is misbehaving"
                )
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
            raise ShortRead(f"short read: {job.uri} gave {written} of {length} bytes")
        if digest is not None and digest.hexdigest() != etag:
            raise ShortRead(
                f"checksum mismatch: {job.uri} has MD5 {digest.hexdigest()}, its ETag says {etag}"
            )
        return etag, written

    def _get_ranged(self, job: FetchJob, part: str) -> str | None:
        size = int(job.size or 0)
        step = max(1, self._options.range_size)
        ranges = [(start, min(start + step, size)) for start in range(0, size, step)]
        etags: set[str | None] = set()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, size) if hasattr(os, "posix_fallocate") else os.ftruncate(
                    fd, size
                )
            except OSError as err:
                raise _local_error(err, job) from err

            def one(byte_range: tuple[int, int]) -> None:
                stream, length, etag, _ = self._open(job, byte_range)
                etags.add(etag)
                offset, want = byte_range[0], byte_range[1] - byte_range[0]
                try:
                    if length != want:
                        raise ShortRead(
                            f"{job.uri} range {byte_range} gave {length} bytes, wanted {want}"
                        )
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
                    raise ShortRead(
                        f"short read: {job.uri} range {byte_range} stopped at byte {offset}"
                    )

            with ThreadPoolExecutor(max(1, min(len(ranges), self._options.threads))) as pool:
                for future in [pool.submit(one, r) for r in ranges]:
                    future.result()
        finally:
            os.close(fd)
        if len(etags) > 1:
            raise ShortRead(
                f"{job.uri} changed while its ranges were fetched (ETags {sorted(map(str, etags))})"
            )
        etag = etags.pop() if etags else None
        if etag:
            try:
                os.setxattr(part, ETAG_XATTR, etag.encode())
            except OSError:
                pass  # no xattrs here: a rerun trusts the size alone
        return etag


class ShortRead(StorageError):
    """A read that gave fewer (or other) bytes than promised: always retried, never accepted."""


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


def _write_all(fd: int, data: Any, job: FetchJob) -> None:
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


def _retryable(err: BaseException) -> bool:
    if isinstance(err, (ShortRead, LeanNetError)):
        return True
    if isinstance(
        err, (DiskFullError, UnsafePathError, ObjectMissing, BucketMissing, ChannelError)
    ):
        return False
    if isinstance(err, TorchBayError):
        return False
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        if code in _NO_RETRY_CODES:
            return False
    return not isinstance(err, (TypeError, ValueError, AttributeError, KeyError))

"""End-of-job uploads that outlast an outage: retried with backoff until a deadline, multipart
resumed.

:func:`put_until` sends one file. Below the part size it is one PUT, sent again after each failure;
above, one multipart upload whose ``UploadId`` is kept across failures: after an outage the parts S3
already has are listed (``ListParts``) and only the missing ones are sent, then the upload is
completed and the object's size checked. Errors that waiting cannot fix (a missing bucket, access
denied, a local file gone) end it at once; anything else (connection refused or reset, timeouts,
5xx, throttling) is retried until ``deadline`` (``time.monotonic()``), after which
:class:`~agent.errors.UploadIncomplete` names the file, the URI, the attempts and the last error.
Nothing is reported uploaded that did not arrive whole.

:class:`DeadlineStorage` gives the same retries to code that only knows the Storage interface (the
job log and metrics uploads), once a deadline is set.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from agent.errors import BucketMissing, StorageError, UploadIncomplete
from agent.storage import ObjectInfo, S3Storage, Storage, parse_uri, redact, translate_s3_error

__all__ = ["S3_MIN_PART", "DeadlineStorage", "put_until"]

S3_MIN_PART = 5 * 1024 * 1024
_PART_THREADS = 4
_FIRST_PAUSE = 0.25
_MAX_PAUSE = 4.0
# Error codes that waiting does not fix.
_FATAL_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "InvalidBucketName",
        "EntityTooLarge",
        "InvalidArgument",
        "403",
        "400",
    }
)


class _Fatal(Exception):
    """Wraps an error that retrying cannot fix."""


class _UploadLost(Exception):
    """The server no longer knows the multipart upload (NoSuchUpload): start a new one."""


def put_until(
    storage: Storage,
    path: Path,
    uri: str,
    deadline: float,
    *,
    log: logging.Logger,
    part_size: int = 16 * 1024 * 1024,
    what: str | None = None,
) -> int:
    """Upload ``path`` to ``uri``, retrying until ``deadline``; returns the attempts it took (1: no
    retry).

    At least one attempt is made even when the deadline has passed. Raises UploadIncomplete when the
    deadline passes first, or the StorageError of a failure that retrying cannot fix.
    """
    what = what or Path(path).name
    if isinstance(storage, S3Storage) and os.path.getsize(path) > max(part_size, S3_MIN_PART):
        job = _Multipart(storage, Path(path), uri, max(part_size, S3_MIN_PART), log)
        return _retry(job.attempt, job.describe, uri, what, deadline, log, on_give_up=job.abort)
    if not isinstance(storage, S3Storage):  # file://: a local error does not heal by waiting
        storage.put_file(path, uri)
        return 1
    return _retry(lambda: storage.put_file(path, uri), lambda: "", uri, what, deadline, log)


def _retry(
    attempt: Callable[[], None],
    describe: Callable[[], str],
    uri: str,
    what: str,
    deadline: float,
    log: logging.Logger,
    on_give_up: Callable[[], None] | None = None,
) -> int:
    attempts = 0
    pause = _FIRST_PAUSE
    while True:
        attempts += 1
        try:
            attempt()
            if attempts > 1:
                log.info(
                    "%s reached %s after %d attempts%s", what, redact(uri), attempts, describe()
                )
            return attempts
        except _Fatal as err:
            if on_give_up is not None:
                on_give_up()
            cause = err.args[0]
            raise cause
        except (StorageError, OSError) as err:
            if _hopeless(err):
                if on_give_up is not None:
                    on_give_up()
                raise
            left = deadline - time.monotonic()
            if left <= pause:
                if on_give_up is not None:
                    on_give_up()
                raise UploadIncomplete(
                    f"{what} was not uploaded to {redact(uri)}: the upload deadline passed after "
                    f"{attempts} "
                    f"attempt(s){describe()}; last error: {err}; check the endpoint, or raise "
                    "TORCHBAY_UPLOAD_TIMEOUT"
                ) from err
            log.warning(
                "uploading %s to %s failed (%s); retrying in %.2g s (attempt %d, %.0f s left before "
                ""
                ""
                ""
                "the upload deadline)",
                what,
                redact(uri),
                err,
                pause,
                attempts,
                left,
            )
            time.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE)


def _hopeless(err: Exception) -> bool:
    """Whether waiting cannot fix ``err``: a local file error, a missing bucket, refused
    credentials."""
    if isinstance(err, OSError):
        return not isinstance(err, ConnectionError)
    text = str(err)
    return isinstance(err, BucketMissing) or text.startswith(
        ("access denied", "no AWS credentials")
    )


def _classify(err: Exception, uri: str, where: str) -> Exception:
    """A botocore error as StorageError (retried) or _Fatal / _UploadLost."""
    response = getattr(err, "response", None)
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if code == "NoSuchUpload":
        return _UploadLost(code)
    translated = translate_s3_error(err, uri, where)
    if (
        code in _FATAL_CODES
        or isinstance(translated, BucketMissing)
        or type(err).__name__ in ("NoCredentialsError", "ParamValidationError")
    ):
        return _Fatal(translated)
    return translated


class _Multipart:
    """One resumable multipart upload of a file that does not change."""

    def __init__(
        self, storage: S3Storage, path: Path, uri: str, part_size: int, log: logging.Logger
    ) -> None:
        self._client = storage.client
        self._where = redact(str(getattr(self._client.meta, "endpoint_url", "the S3 endpoint")))
        self._loc = parse_uri(uri)
        self._uri = uri
        self._path = path
        self._log = log
        self._size = os.path.getsize(path)
        self._part_size = part_size
        self._offsets = list(range(0, self._size, part_size)) or [0]
        self._upload_id: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._resumed = 0
        self._completing = False

    def describe(self) -> str:
        total = len(self._offsets)
        note = f"; {len(self._parts)} of {total} parts arrived"
        if self._resumed:
            note += f", {self._resumed} of them kept from before the outage"
        return note

    def _call(self, name: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, name)(Bucket=self._loc.bucket, Key=self._loc.key, **kwargs)
        except Exception as err:  # botocore's exception classes are made at run time
            raise _classify(err, self._uri, self._where) from err

    def attempt(self) -> None:
        try:
            self._attempt()
        except _UploadLost:
            if self._completing and self._arrived():
                return  # the completion went through; only its answer was lost
            self._log.warning(
                "the server no longer knows the multipart upload of %s; starting it again",
                redact(self._uri),
            )
            self._upload_id = None
            self._parts.clear()
            raise StorageError(
                f"multipart upload of {redact(self._uri)} was lost by the server"
            ) from None

    def _attempt(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload", ChecksumAlgorithm="CRC32")[
                "UploadId"
            ]
            self._parts.clear()
        else:
            self._list_parts()
        missing = [(n, off) for n, off in enumerate(self._offsets, start=1) if n not in self._parts]
        errors: list[BaseException] = []
        _run(self._send, missing, _PART_THREADS, errors)
        if errors:
            first = next((e for e in errors if isinstance(e, (_Fatal, _UploadLost))), errors[0])
            raise first
        self._completing = True
        self._call(
            "complete_multipart_upload",
            UploadId=self._upload_id,
            MultipartUpload={"Parts": [self._parts[n] for n in sorted(self._parts)]},
        )
        if not self._arrived():
            raise StorageError(
                f"{redact(self._uri)} is not the expected {self._size} bytes after the upload"
            )

    def _list_parts(self) -> None:
        known: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            resp = self._call("list_parts", UploadId=self._upload_id, PartNumberMarker=marker)
            for item in resp.get("Parts", ()):
                number = int(item["PartNumber"])
                offset = self._offsets[number - 1] if number <= len(self._offsets) else None
                if offset is None or int(item["Size"]) != min(self._part_size, self._size - offset):
                    continue
                part = {"PartNumber": number, "ETag": item["ETag"]}
                if item.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = item["ChecksumCRC32"]
                known[number] = part
            if not resp.get("IsTruncated"):
                break
            marker = int(resp.get("NextPartNumberMarker", 0))
        kept = len(known)
        if kept and not self._resumed:
            self._log.info(
                "resuming the upload of %s: %d of %d parts are already there",
                redact(self._uri),
                kept,
                len(self._offsets),
            )
        self._resumed = max(self._resumed, kept)
        self._parts = known

    def _send(self, item: tuple[int, int]) -> None:
        from s3transfer.utils import ReadFileChunk  # streamed like boto3's own transfers

        number, offset = item
        length = min(self._part_size, self._size - offset)
        body = ReadFileChunk.from_filename(str(self._path), offset, length, enable_callbacks=False)
        try:
            resp = self._call(
                "upload_part",
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
            )
        finally:
            body.close()
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if resp.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = resp["ChecksumCRC32"]
        self._parts[number] = part

    def _arrived(self) -> bool:
        try:
            head = self._call("head_object")
        except Exception:
            return False
        return int(head.get("ContentLength", -1)) == self._size

    def abort(self) -> None:
        """Best effort: drop the parts of an upload that will not be completed."""
        if self._upload_id is None:
            return
        try:
            self._client.abort_multipart_upload(
                Bucket=self._loc.bucket, Key=self._loc.key, UploadId=self._upload_id
            )
        except (
            Exception
        ):  # an unreachable endpoint keeps the parts until the bucket's lifecycle rule
            self._log.debug("could not abort the multipart upload of %s", redact(self._uri))


def _run(fn: Callable[[Any], None], items: list, threads: int, errors: list[BaseException]) -> None:
    """``fn`` over ``items`` on up to ``threads`` threads; the first errors stop the rest and are
    collected."""
    lock = threading.Lock()
    queue = list(items)

    def loop() -> None:
        while True:
            with lock:
                if errors or not queue:
                    return
                item = queue.pop(0)
            try:
                fn(item)
            except BaseException as err:  # handed back to the caller, which raises it
                with lock:
                    errors.append(err)

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(min(threads, len(items)))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


class DeadlineStorage(Storage):
    """A Storage made on first use whose puts retry (see :func:`put_until`) once
    :meth:`set_deadline` is called.

    Before that a put is one try, as the wrapped storage does it (periodic uploads retry at their
    next turn).
    """

    def __init__(
        self, make: Callable[[], Storage], *, log: logging.Logger, part_size: int = 16 * 1024 * 1024
    ) -> None:
        self._make = make
        self._inner: Storage | None = None
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._log = log
        self._part_size = part_size

    def set_deadline(self, deadline: float | None) -> None:
        self._deadline = deadline

    @property
    def inner(self) -> Storage:
        with self._lock:
            if self._inner is None:
                self._inner = self._make()
            return self._inner

    def list(self, uri: str) -> Iterator[ObjectInfo]:
        return self.inner.list(uri)

    def head(self, uri: str) -> ObjectInfo | None:
        return self.inner.head(uri)

    def open(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        return self.inner.open(uri, start, end)

    def put_file(self, path: Path, uri: str) -> None:
        if self._deadline is None:
            self.inner.put_file(path, uri)
        else:
            put_until(
                self.inner, path, uri, self._deadline, log=self._log, part_size=self._part_size
            )

    def put_bytes(self, data: bytes, uri: str) -> None:
        if self._deadline is None:
            self.inner.put_bytes(data, uri)
        else:
            _retry(
                lambda: self.inner.put_bytes(data, uri),
                lambda: "",
                uri,
                parse_uri(uri).key.rsplit("/", 1)[-1],
                self._deadline,
                self._log,
            )

    def delete(self, uri: str) -> None:
        self.inner.delete(uri)

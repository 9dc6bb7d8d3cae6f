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
from typing import IO

from agent.errors import UploadIncomplete
from agent.storage import (
    DEFAULT_READ,
    ONE_TRY,
    CheckedRead,
    ObjectInfo,
    ReadOptions,
    RetryPolicy,
    S3Storage,
    Storage,
    parse_uri,
    redact,
    with_retries,
)
from agent.storage.multipart import S3_MIN_PART, MultipartUpload

__all__ = ["S3_MIN_PART", "DeadlineStorage", "put_until"]

# Until the deadline: 0.25 s, doubling up to 4 s between attempts.
UPLOAD_POLICY = RetryPolicy(attempts=0, backoff=0.25, max_pause=4.0, jitter=False)


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
    if not isinstance(storage, S3Storage):  # file://: a local error does not heal by waiting
        storage.put_file(path, uri)
        return 1
    storage = storage.with_policy(ONE_TRY)  # the retries are this loop's
    if os.path.getsize(path) > max(part_size, S3_MIN_PART):
        job = MultipartUpload(storage, Path(path), uri, max(part_size, S3_MIN_PART), log=log)
        try:
            return _retry(job.attempt, job.describe, uri, what, deadline, log)
        finally:
            job.abort()  # only does anything when it did not complete
    return _retry(lambda: storage.put_file(path, uri), lambda: "", uri, what, deadline, log)


def _retry(
    attempt: Callable[[], None],
    describe: Callable[[], str],
    uri: str,
    what: str,
    deadline: float,
    log: logging.Logger,
) -> int:
    def on_retry(err: BaseException, attempts: int, pause: float) -> None:
        log.warning(
            "uploading %s to %s failed (%s); retrying in %.2g s (attempt %d, %.0f s left before "
            "the upload deadline)",
            what,
            redact(uri),
            err,
            pause,
            attempts,
            deadline - time.monotonic(),
        )

    def give_up(err: BaseException, attempts: int) -> BaseException:
        return UploadIncomplete(
            f"{what} was not uploaded to {redact(uri)}: the upload deadline passed after "
            f"{attempts} attempt(s){describe()}; last error: {err}; check the endpoint, or raise "
            "TORCHBAY_UPLOAD_TIMEOUT"
        )

    _, attempts = with_retries(
        attempt,
        UPLOAD_POLICY,
        what=redact(uri),
        deadline=deadline,
        on_retry=on_retry,
        give_up=give_up,
    )
    if attempts > 1:
        log.info("%s reached %s after %d attempts%s", what, redact(uri), attempts, describe())
    return attempts


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

    def list(self, uri: str, *, cancel: threading.Event | None = None) -> Iterator[ObjectInfo]:
        return self.inner.list(uri, cancel=cancel)

    def head(self, uri: str) -> ObjectInfo | None:
        return self.inner.head(uri)

    def open(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        return self.inner.open(uri, start, end)

    def get_checked(
        self,
        uri: str,
        *,
        size: int | None = None,
        byte_range: tuple[int, int] | None = None,
        options: ReadOptions = DEFAULT_READ,
    ) -> CheckedRead:
        return self.inner.get_checked(uri, size=size, byte_range=byte_range, options=options)

    def put_file(self, path: Path, uri: str) -> None:
        if self._deadline is None:
            self.inner.put_file(path, uri)
        else:
            put_until(
                self.inner, path, uri, self._deadline, log=self._log, part_size=self._part_size
            )

    def put_bytes(self, data: bytes, uri: str) -> None:
        inner = self.inner
        if self._deadline is None or not isinstance(inner, S3Storage):
            inner.put_bytes(data, uri)
        else:
            inner = inner.with_policy(ONE_TRY)
            _retry(
                lambda: inner.put_bytes(data, uri),
                lambda: "",
                uri,
                parse_uri(uri).key.rsplit("/", 1)[-1],
                self._deadline,
                self._log,
            )

    def delete(self, uri: str) -> None:
        self.inner.delete(uri)

"""One multipart upload of a file, checked: completed only when every part arrived (CRC32 per part)
and, when the caller asks, only when the file did not change while it was read.

:meth:`MultipartUpload.attempt` may be called again after a failure: the ``UploadId`` is kept, the
parts S3 already has are listed (``ListParts``) and only the missing ones are sent. A server that
lost the upload (``NoSuchUpload``) makes the next attempt start a new one. :meth:`abort` drops the
parts of an upload that will not be completed. The retrying itself is the caller's
(agent.storage.retry.with_retries).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import StorageError
from agent.storage.base import parse_uri, redact
from agent.storage.retry import TransientError, error_code

if TYPE_CHECKING:
    from agent.storage.s3 import S3Storage

__all__ = ["S3_MIN_PART", "FileChanged", "MultipartUpload", "run_parallel"]

S3_MIN_PART = 5 * 1024 * 1024
PART_THREADS = 4


class FileChanged(StorageError):
    """The file changed while it was being uploaded: nothing was completed (not retried here)."""


class _UploadLost(Exception):
    """The server no longer knows the multipart upload (NoSuchUpload)."""


class MultipartUpload:
    """A resumable multipart upload of ``path`` to ``uri`` in parts of ``part_size`` bytes.

    ``size`` is the byte count the file must have (default: its size now); ``unchanged()`` is
    asked once every part arrived, and a False raises FileChanged instead of completing.
    """

    def __init__(
        self,
        storage: S3Storage,
        path: Path,
        uri: str,
        part_size: int,
        *,
        size: int | None = None,
        unchanged: Callable[[], bool] | None = None,
        threads: int = PART_THREADS,
        log: logging.Logger | None = None,
    ) -> None:
        self._storage = storage
        self._client = storage.client
        self._loc = parse_uri(uri)
        self._uri = uri
        self._path = path
        self._log = log or logging.getLogger("torchbay.storage")
        self._size = os.path.getsize(path) if size is None else size
        self._part_size = max(part_size, S3_MIN_PART)
        self._offsets = list(range(0, self._size, self._part_size)) or [0]
        self._unchanged = unchanged
        self._threads = threads
        self._upload_id: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._resumed = 0
        self._completing = False
        self.completed = False

    def describe(self) -> str:
        """How far it got, for a message."""
        note = f"; {len(self._parts)} of {len(self._offsets)} parts arrived"
        if self._resumed:
            note += f", {self._resumed} of them kept from before the outage"
        return note

    def _call(self, name: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, name)(Bucket=self._loc.bucket, Key=self._loc.key, **kwargs)
        except Exception as err:  # botocore's exception classes are made at run time
            if error_code(err) == "NoSuchUpload":
                raise _UploadLost() from err
            raise self._storage.translate(err, self._uri) from err

    def attempt(self) -> None:
        """Send what is missing and complete the upload; raises on any failure (retry by calling
        again)."""
        try:
            self._attempt()
        except _UploadLost:
            if self._completing and self._arrived():
                self.completed = True
                return  # the completion went through; only its answer was lost
            self._log.warning(
                "the server no longer knows the multipart upload of %s; starting it again",
                redact(self._uri),
            )
            self._upload_id = None
            self._parts.clear()
            raise TransientError(
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
        run_parallel(self._send, missing, self._threads, errors)
        if errors:
            raise next((e for e in errors if isinstance(e, (FileChanged, _UploadLost))), errors[0])
        if self._unchanged is not None and not self._unchanged():
            raise FileChanged(f"{self._path} changed while it was uploaded to {redact(self._uri)}")
        self._completing = True
        self._call(
            "complete_multipart_upload",
            UploadId=self._upload_id,
            MultipartUpload={"Parts": [self._parts[n] for n in sorted(self._parts)]},
        )
        if not self._arrived():
            raise TransientError(
                f"{redact(self._uri)} is not the expected {self._size} bytes after the upload"
            )
        self.completed = True

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
            if len(body) != length:
                raise FileChanged(
                    f"{self._path} shrank while it was uploaded to {redact(self._uri)}"
                )
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
        with self._lock:
            self._parts[number] = part

    def _arrived(self) -> bool:
        try:
            head = self._call("head_object")
        except (StorageError, _UploadLost):
            return False
        return int(head.get("ContentLength", -1)) == self._size

    def abort(self) -> None:
        """Best effort: drop the parts of an upload that was not completed."""
        if self._upload_id is None or self.completed:
            return
        try:
            self._client.abort_multipart_upload(
                Bucket=self._loc.bucket, Key=self._loc.key, UploadId=self._upload_id
            )
        except Exception:  # an unreachable endpoint keeps the parts until the bucket's lifecycle
            self._log.debug("could not abort the multipart upload of %s", redact(self._uri))
        self._upload_id = None


def run_parallel(
    fn: Callable[[Any], None], items: list[Any], threads: int, errors: list[BaseException]
) -> None:
    """``fn`` over ``items`` on up to ``threads`` threads; the first errors stop the rest and are
    appended to ``errors``."""
    lock = threading.Lock()
    queue = list(reversed(items))

    def loop() -> None:
        while True:
            with lock:
                if errors or not queue:
                    return
                item = queue.pop()
            try:
                fn(item)
            except BaseException as err:  # handed back to the caller, which raises it
                with lock:
                    errors.append(err)

    if threads <= 1 or len(items) <= 1:
        loop()
        return
    pool = [threading.Thread(target=loop, daemon=True) for _ in range(min(threads, len(items)))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

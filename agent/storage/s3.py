"""The ``s3://`` backend: one boto3 client, every request through the one retry policy
(agent.storage.retry), verified reads (agent.storage.checked) with the lean GET
(agent.storage.lean) for whole objects, checked writes (single PUT, or a multipart upload that is
completed only when every part arrived: agent.storage.multipart).

boto3 is imported only when a client is made. botocore itself makes at most two attempts per
request (one quick retry of a stale keep-alive); the backoff is ours.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from agent.errors import EndpointUnreachable, ObjectMissing, StorageError
from agent.storage.base import DownloadStopped, Location, ObjectInfo, Storage, parse_uri, redact
from agent.storage.checked import DEFAULT_READ, CheckedRead, ReadOptions, plain_md5_etag
from agent.storage.client import make_s3_client, translate_s3_error
from agent.storage.multipart import MultipartUpload
from agent.storage.retry import (
    DEFAULT_POLICY,
    ONE_TRY,
    RetryPolicy,
    with_retries,
)

if TYPE_CHECKING:  # pragma: no cover
    from agent.storage.lean import LeanGetter

__all__ = ["MULTIPART_THRESHOLD", "S3Storage", "make_s3_client", "translate_s3_error"]

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
_LEAN_PUT_MAX = 8 * 1024 * 1024  # bodies up to this size are PUT by the lean path, in memory
T = TypeVar("T")


class _Translated:
    """A boto3 streaming body whose read errors come out as StorageErrors naming the URI."""

    __slots__ = ("_body", "_storage", "_uri")

    def __init__(self, body: Any, storage: S3Storage, uri: str) -> None:
        self._body, self._storage, self._uri = body, storage, uri

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._body.read(None if size < 0 else size)
        except Exception as err:  # botocore's and urllib3's exception classes
            raise self._storage.translate(err, self._uri) from err
        return data

    def close(self) -> None:
        self._body.close()


class _LeanBody:
    """A lean GET's body whose connection errors name the URI and the endpoint."""

    __slots__ = ("_resp", "_storage", "_uri")

    def __init__(self, resp: Any, storage: S3Storage, uri: str) -> None:
        self._resp, self._storage, self._uri = resp, storage, uri

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._resp.read(size)
        except EndpointUnreachable as err:
            raise self._storage.lost(err, self._uri) from err
        return data

    def readinto(self, buffer: bytearray) -> int:
        try:
            count: int = self._resp.readinto(buffer)
        except EndpointUnreachable as err:
            raise self._storage.lost(err, self._uri) from err
        return count

    def close(self) -> None:
        self._resp.close()


class S3Storage(Storage):
    """``s3://`` URIs on AWS or any S3-compatible endpoint.

    ``client`` is a boto3 S3 client (None: one is made with :func:`make_s3_client` on first use).
    Every request goes through ``policy`` (default: ``RetryPolicy()``, or ``ONE_TRY`` when a
    client was passed in, whose own botocore retries are then the policy); :meth:`with_policy`
    gives a view with another policy that shares the client and the lean getter (callers that
    retry on their own terms use ``ONE_TRY``).
    ``lean=False`` sends every request through boto3.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        endpoint_url: str | None = None,
        max_pool_connections: int = 32,
        policy: RetryPolicy | None = None,
        lean: bool = True,
    ) -> None:
        if policy is None:  # a client passed in brings its own (botocore) retries
            policy = DEFAULT_POLICY if client is None else ONE_TRY
        self.policy = policy
        self._shared = _Shared(client, endpoint_url, max_pool_connections, lean)

    def with_policy(self, policy: RetryPolicy) -> S3Storage:
        """The same client and lean getter under another retry policy."""
        view = S3Storage.__new__(S3Storage)
        view.policy, view._shared = policy, self._shared
        return view

    @property
    def client(self) -> Any:
        """The shared boto3 client (made, and boto3 imported, on first use)."""
        return self._shared.client()

    @property
    def where(self) -> str:
        """The endpoint, for error messages."""
        return self._shared.where()

    def translate(self, err: BaseException, uri: str) -> StorageError:
        return translate_s3_error(err, uri, self.where)

    def lost(self, err: EndpointUnreachable, uri: str) -> EndpointUnreachable:
        """A lean GET's connection error, naming the URI and the endpoint."""
        return EndpointUnreachable(
            f"cannot reach {self.where} for {uri} ({err}); check AWS_ENDPOINT_URL and that the "
            "server is up"
        )

    def lean(self) -> LeanGetter | None:
        """The lean getter for this client, made once (None when the client's setup is not one it
        handles)."""
        return self._shared.lean()

    def call(self, uri: str, fn: Callable[[], T], *, cancel: threading.Event | None = None) -> T:
        """``fn()`` (one S3 request) under this storage's policy; errors translated."""

        def once() -> T:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as err:  # botocore's exception classes are made at run time
                raise self.translate(err, uri) from err

        return with_retries(once, self.policy, what=uri, cancel=cancel)[0]

    def list(self, uri: str, *, cancel: threading.Event | None = None) -> Iterator[ObjectInfo]:
        loc = parse_uri(uri)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": loc.key}
            if token:
                kwargs["ContinuationToken"] = token
            lean = self.lean()
            if lean is not None:
                fast = self.call(
                    uri, functools.partial(self._lean, lean.list_page, uri, token), cancel=cancel
                )
                if fast is not None:
                    for key, size, etag, mtime in fast.items:
                        if not (key.endswith("/") and size == 0):
                            yield ObjectInfo(Location("s3", loc.bucket, key), size, etag, mtime)
                    token = fast.token
                    if not token:
                        return
                    continue
            page = self.call(
                uri, functools.partial(self.client.list_objects_v2, **kwargs), cancel=cancel
            )
            for item in page.get("Contents", ()):
                if item["Key"].endswith("/") and item["Size"] == 0:
                    continue  # a console-made "folder" marker
                yield ObjectInfo(
                    Location("s3", loc.bucket, item["Key"]),
                    int(item["Size"]),
                    item.get("ETag", "").strip('"') or None,
                    item["LastModified"].timestamp() if "LastModified" in item else None,
                )
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def _lean(self, method: Callable[..., T], uri: str, *args: Any) -> T:
        """``method(bucket, key-or-prefix, *args)`` of the lean getter; its connection errors name
        ``uri`` and the endpoint."""
        loc = parse_uri(uri)
        try:
            return method(loc.bucket, loc.key, *args)
        except EndpointUnreachable as err:
            raise self.lost(err, uri) from err

    def head(self, uri: str) -> ObjectInfo | None:
        loc = parse_uri(uri)
        lean = self.lean()
        if lean is not None:
            found = self.call(uri, functools.partial(self._lean, lean.head, uri))
            if found is False:
                return None
            if isinstance(found, tuple):
                return ObjectInfo(loc, found[0], found[1], found[2])
        try:
            resp = self.call(uri, lambda: self.client.head_object(Bucket=loc.bucket, Key=loc.key))
        except ObjectMissing:
            return None
        return ObjectInfo(
            loc,
            int(resp["ContentLength"]),
            resp.get("ETag", "").strip('"') or None,
            resp["LastModified"].timestamp() if "LastModified" in resp else None,
        )

    def _get_object(self, uri: str, byte_range: tuple[int, int] | None) -> dict[str, Any]:
        loc = parse_uri(uri)
        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
        if byte_range is not None:
            kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        try:
            resp: dict[str, Any] = self.client.get_object(**kwargs)
        except Exception as err:  # botocore's exception classes are made at run time
            raise self.translate(err, uri) from err
        return resp

    def open(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        loc = parse_uri(uri)
        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = self.call(uri, lambda: self.client.get_object(**kwargs))
        body: IO[bytes] = resp["Body"]
        return body

    def get_checked(
        self,
        uri: str,
        *,
        size: int | None = None,
        byte_range: tuple[int, int] | None = None,
        options: ReadOptions = DEFAULT_READ,
    ) -> CheckedRead:
        """One GET (no retry here: callers retry the whole read, see :meth:`read_checked`)."""
        want = size if byte_range is None else byte_range[1] - byte_range[0]
        if options.lean:
            lean = self.lean()
            if lean is not None:
                loc = parse_uri(uri)
                try:
                    resp = lean.open(loc.bucket, loc.key, byte_range)
                except EndpointUnreachable as err:
                    raise self.lost(err, uri) from err
                if resp is not None:
                    return CheckedRead(
                        uri,
                        _LeanBody(resp, self, uri),
                        resp.length,
                        resp.etag,
                        md5=resp.md5,
                        checksum=resp.checksum,
                        expected_size=want,
                        options=options,
                    )
        got = self._get_object(uri, byte_range)
        etag = (got.get("ETag") or "").strip('"') or None
        plain = byte_range is None and plain_md5_etag(
            etag, got.get("ServerSideEncryption"), got.get("SSECustomerAlgorithm")
        )
        return CheckedRead(
            uri,
            _Translated(got["Body"], self, uri),
            int(got["ContentLength"]),
            etag,
            md5=plain,
            expected_size=want,
            options=options,
        )

    def get_file(
        self,
        uri: str,
        dest: Path,
        expected_size: int | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> int:
        """As :meth:`Storage.get_file`, the whole download retried under this storage's policy;
        ``cancel`` also ends a pause between two tries (DownloadStopped)."""
        try:
            return with_retries(
                lambda: Storage.get_file(self, uri, dest, expected_size, cancel=cancel),
                self.policy,
                what=uri,
                cancel=cancel,
            )[0]
        except StorageError as err:
            if cancel is not None and cancel.is_set():  # retries ended by the stop, not spent
                raise DownloadStopped(f"the download of {uri} stopped on request") from err
            raise

    def read_checked(
        self,
        uri: str,
        *,
        size: int | None = None,
        options: ReadOptions = DEFAULT_READ,
        cancel: threading.Event | None = None,
    ) -> bytes:
        """The whole object, verified, retried under this storage's policy."""

        def once() -> bytes:
            return self.get_checked(uri, size=size, options=options).read_all()

        return with_retries(once, self.policy, what=uri, cancel=cancel)[0]

    def put_file(self, path: Path, uri: str) -> None:
        loc = parse_uri(uri)
        size = os.path.getsize(path)
        if size <= _LEAN_PUT_MAX and self.lean() is not None:
            with open(path, "rb") as handle:
                self.put_bytes(handle.read(), uri)
            return
        if size < MULTIPART_THRESHOLD:

            def put() -> None:
                with open(path, "rb") as body:
                    self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=body)

            self.call(uri, put)
            return
        upload = MultipartUpload(self, Path(path), uri, MULTIPART_CHUNKSIZE)
        try:
            with_retries(upload.attempt, self.policy, what=uri)
        finally:
            upload.abort()  # only does anything when the upload did not complete

    def put_bytes(self, data: bytes, uri: str) -> None:
        loc = parse_uri(uri)
        lean = self.lean() if len(data) <= _LEAN_PUT_MAX else None

        def put() -> None:
            if lean is None or not self._lean(lean.put, uri, data):
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)

        self.call(uri, put)

    def delete(self, uri: str) -> None:
        loc = parse_uri(uri)
        try:
            self.call(uri, lambda: self.client.delete_object(Bucket=loc.bucket, Key=loc.key))
        except ObjectMissing:
            pass


class _Shared:
    """What the views of one S3Storage share: the boto3 client and the lean getter, each made on
    first use. With an explicit endpoint and credentials in the environment the lean getter needs
    no client, so a job that only lists, reads and writes small objects never imports boto3."""

    def __init__(self, client: Any, endpoint_url: str | None, pool: int, lean: bool) -> None:
        self._lock = threading.Lock()
        self._client = client
        self._endpoint_url = endpoint_url
        self._pool = pool
        self._made_lean = not lean  # lean=False: every request through boto3
        self._lean: LeanGetter | None = None

    def client(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_s3_client(self._endpoint_url, self._pool)
                client = self._client
        return client

    def where(self) -> str:
        if self._client is None and self._endpoint_url:
            return redact(self._endpoint_url)
        return redact(str(getattr(self.client().meta, "endpoint_url", "the S3 endpoint")))

    def lean(self) -> LeanGetter | None:
        if self._made_lean:
            return self._lean
        # http.client, ssl and email (~25 ms): only once an s3:// URI is read, not at start-up
        from agent.storage.lean import LeanGetter

        lean = LeanGetter.from_endpoint(self._endpoint_url) if self._client is None else None
        if lean is None:
            lean = LeanGetter.from_client(self.client())
        with self._lock:
            if not self._made_lean:
                self._lean, self._made_lean = lean, True
        return self._lean


def one_try(storage: Storage) -> Storage:
    """``storage`` without retries of its own (for callers with their own deadline loop)."""
    return storage.with_policy(ONE_TRY) if isinstance(storage, S3Storage) else storage

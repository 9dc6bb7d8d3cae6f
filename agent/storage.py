"""One small interface over ``s3://`` and ``file://``: list, get (whole or a range), put, delete.

boto3 is imported only when an ``s3://`` URI is used. One client is made per
``S3Storage`` and shared by every thread that uses it; botocore's standard retry
mode retries throttling, 5xx and connection errors with backoff.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.errors import (
    BucketMissing,
    DiskFullError,
    EndpointUnreachable,
    ObjectMissing,
    StorageError,
)

__all__ = [
    "Location",
    "ObjectInfo",
    "Storage",
    "open_storage",
    "parse_uri",
    "redact",
    "write_text_atomically",
]

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
_COPY_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``s3`` or ``file``; for ``file`` the bucket is empty and key is
    an absolute path."""

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return "file://" + self.key

    def child(self, relative: str) -> Location:
        """The location of ``relative`` under this one, treated as a folder."""
        relative = relative.lstrip("/")
        if self.scheme == "s3":
            base = self.key if (not self.key or self.key.endswith("/")) else self.key + "/"
            return Location("s3", self.bucket, base + relative)
        return Location("file", "", os.path.join(self.key, relative))


@dataclass(frozen=True)
class ObjectInfo:
    """One object seen in a listing: its full ``key`` (a path for ``file://``), size in bytes and
    ETag if known."""

    location: Location
    size: int
    etag: str | None = None
    mtime: float | None = None

    @property
    def key(self) -> str:
        return self.location.key

    @property
    def uri(self) -> str:
        return self.location.uri


def parse_uri(uri: str) -> Location:
    """Parse ``s3://bucket/key``, ``file:///abs/path`` or a plain absolute path.

    Raises StorageError naming the URI when it is neither.
    """
    if uri.startswith("s3://"):
        rest = uri[5:]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"URI {uri!r} has no bucket; write it as s3://bucket/prefix")
        return Location("s3", bucket, key)
    if uri.startswith("file://"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(
                f"URI {uri!r} names host {parsed.netloc!r}; file URIs need three slashes: "
                "file:///abs/path"
            )
        return Location("file", "", urllib.parse.unquote(parsed.path) or "/")
    if uri.startswith("/"):
        return Location("file", "", uri)
    raise StorageError(f"URI {uri!r} is neither s3://bucket/prefix nor file:///path; fix the URI")


def redact(text: str) -> str:
    """Remove credentials that could ride in a URL (``scheme://user:secret@host``)."""
    out = []
    for word in text.split(" "):
        if "://" in word and "@" in word.split("://", 1)[1].split("/", 1)[0]:
            scheme, rest = word.split("://", 1)
            host_part, slash, tail = rest.partition("/")
            word = f"{scheme}://***@{host_part.rsplit('@', 1)[1]}{slash}{tail}"
        out.append(word)
    return " ".join(out)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path.tmp`` and rename it over ``path``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Storage(ABC):
    """Operations every backend offers. URIs passed in must be of this backend's scheme."""

    @abstractmethod
    def list(self, uri: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with the URI's key (S3 prefix semantics; folders recurse),
        in key order."""

    @abstractmethod
    def head(self, uri: str) -> ObjectInfo | None:
        """The object's info, or None when it does not exist."""

    @abstractmethod
    def open(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        """A readable stream of bytes ``start`` to ``end`` (exclusive; None = to the end)."""

    @abstractmethod
    def put_file(self, path: Path, uri: str) -> None:
        """Upload a local file; large files go multipart."""

    @abstractmethod
    def put_bytes(self, data: bytes, uri: str) -> None:
        """Write ``data`` as one object."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete an object; deleting a missing object is not an error."""

    def get_bytes(self, uri: str, start: int = 0, end: int | None = None) -> bytes:
        """The object's bytes (or a range of them)."""
        with self.open(uri, start, end) as stream:
            return stream.read()

    def get_file(self, uri: str, dest: Path, expected_size: int | None = None) -> int:
        """Download to ``dest`` via ``dest.part`` and an atomic rename; returns the byte count.

        A byte count different from ``expected_size`` raises StorageError and leaves no file behind.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        written = 0
        try:
            with self.open(uri) as stream, open(part, "wb") as out:
                while True:
                    chunk = stream.read(_COPY_BUFFER)
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
        except OSError as err:
            part.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"disk full while writing {dest} from {uri}; free space on {dest.parent} or use "
                    ""
                    ""
                    "a bigger volume"
                ) from err
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if expected_size is not None and written != expected_size:
            part.unlink(missing_ok=True)
            raise StorageError(
                f"short read: {uri} gave {written} bytes, the listing said {expected_size}; retry "
                "the download"
            )
        os.replace(part, dest)
        return written


class FileStorage(Storage):
    """``file://`` URIs: a local or mounted folder that looks like a bucket."""

    def list(self, uri: str) -> Iterator[ObjectInfo]:
        prefix = parse_uri(uri).key
        # A folder prefix lists the folder; otherwise match names that start with the prefix, like
        # S3.
        if os.path.isdir(prefix):
            root, name_prefix = prefix, ""
        else:
            root, name_prefix = os.path.dirname(prefix) or "/", os.path.basename(prefix)
        if not os.path.isdir(root):
            return iter(())
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel_to_root = os.path.relpath(full, root)
                if name_prefix and not rel_to_root.startswith(name_prefix):
                    continue
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                st = os.stat(full)
                found.append(ObjectInfo(Location("file", "", full), st.st_size, None, st.st_mtime))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def head(self, uri: str) -> ObjectInfo | None:
        path = parse_uri(uri).key
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if not os.path.isfile(path):
            return None
        return ObjectInfo(Location("file", "", path), st.st_size, None, st.st_mtime)

    def open(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        path = parse_uri(uri).key
        try:
            handle = open(path, "rb")
        except FileNotFoundError as err:
            raise ObjectMissing(f"{uri} does not exist; check the path") from err
        if start:
            handle.seek(start)
        if end is None:
            return handle
        return _Limited(handle, end - start)

    def put_file(self, path: Path, uri: str) -> None:
        self._write(uri, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, data: bytes, uri: str) -> None:
        self._write(uri, lambda tmp: Path(tmp).write_bytes(data))

    @staticmethod
    def _write(uri: str, fill: Callable[[str], object]) -> None:
        """Write ``dest.part`` with ``fill``, then rename it over ``dest``; errors name the URI."""
        dest = parse_uri(uri).key
        tmp = dest + ".part"
        try:
            os.makedirs(os.path.dirname(dest) or "/", exist_ok=True)
            fill(tmp)
            os.replace(tmp, dest)
        except OSError as err:
            _unlink_quiet(tmp)
            if err.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full while writing {dest}; free space there") from err
            raise StorageError(
                f"cannot write {uri}: {err.strerror}; check the path and permissions"
            ) from err

    def delete(self, uri: str) -> None:
        _unlink_quiet(parse_uri(uri).key)


class _Limited:
    """A file handle that stops after ``remaining`` bytes."""

    def __init__(self, handle: IO[bytes], remaining: int) -> None:
        self._handle = handle
        self._remaining = remaining

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        if size < 0 or size > self._remaining:
            size = self._remaining
        data = self._handle.read(size)
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class S3Storage(Storage):
    """``s3://`` URIs on AWS or any S3-compatible endpoint.

    ``client`` is a boto3 S3 client; when None one is made with :func:`make_s3_client`.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        endpoint_url: str | None = None,
        max_pool_connections: int = 32,
    ) -> None:
        self._client = (
            client if client is not None else make_s3_client(endpoint_url, max_pool_connections)
        )
        self._transfer_lock = threading.Lock()
        self._transfer_config: Any = None

    @property
    def client(self) -> Any:
        """The shared boto3 client."""
        return self._client

    def _where(self) -> str:
        return redact(str(getattr(self._client.meta, "endpoint_url", "the S3 endpoint")))

    def _translate(self, err: Exception, uri: str) -> StorageError:
        return translate_s3_error(err, uri, self._where())

    def list(self, uri: str) -> Iterator[ObjectInfo]:
        loc = parse_uri(uri)
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
                for item in page.get("Contents", ()):
                    if item["Key"].endswith("/") and item["Size"] == 0:
                        continue  # a console-made "folder" marker
                    yield ObjectInfo(
                        Location("s3", loc.bucket, item["Key"]),
                        int(item["Size"]),
                        item.get("ETag", "").strip('"') or None,
                        item["LastModified"].timestamp() if "LastModified" in item else None,
                    )
        except Exception as err:  # botocore's exception classes are made at run time
            raise self._translate(err, uri) from err

    def head(self, uri: str) -> ObjectInfo | None:
        loc = parse_uri(uri)
        try:
            resp = self._client.head_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as err:
            translated = self._translate(err, uri)
            if isinstance(translated, ObjectMissing):
                return None
            raise translated from err
        return ObjectInfo(
            loc,
            int(resp["ContentLength"]),
            resp.get("ETag", "").strip('"') or None,
            resp["LastModified"].timestamp() if "LastModified" in resp else None,
        )

    def open(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        loc = parse_uri(uri)
        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self._client.get_object(**kwargs)
        except Exception as err:
            raise self._translate(err, uri) from err
        return resp["Body"]

    def _transfer(self) -> Any:
        with self._transfer_lock:
            if self._transfer_config is None:
                from boto3.s3.transfer import TransferConfig

                self._transfer_config = TransferConfig(
                    multipart_threshold=MULTIPART_THRESHOLD,
                    multipart_chunksize=MULTIPART_CHUNKSIZE,
                    max_concurrency=8,
                )
            return self._transfer_config

    def put_file(self, path: Path, uri: str) -> None:
        loc = parse_uri(uri)
        try:
            if os.path.getsize(path) < MULTIPART_THRESHOLD:
                with open(path, "rb") as body:
                    self._client.put_object(Bucket=loc.bucket, Key=loc.key, Body=body)
            else:
                self._client.upload_file(str(path), loc.bucket, loc.key, Config=self._transfer())
        except FileNotFoundError:
            raise
        except Exception as err:
            raise self._translate(err, uri) from err

    def put_bytes(self, data: bytes, uri: str) -> None:
        loc = parse_uri(uri)
        try:
            self._client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as err:
            raise self._translate(err, uri) from err

    def delete(self, uri: str) -> None:
        loc = parse_uri(uri)
        try:
            self._client.delete_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as err:
            translated = self._translate(err, uri)
            if not isinstance(translated, ObjectMissing):
                raise translated from err


def translate_s3_error(err: Exception, uri: str, where: str = "the S3 endpoint") -> StorageError:
    """Turn a botocore exception into a StorageError that names the URI, the endpoint and the fix."""
    name = type(err).__name__
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ReadTimeoutError",
    ) or "Could not connect" in str(err):
        return EndpointUnreachable(
            f"cannot reach {where} for {uri}; check AWS_ENDPOINT_URL and that the server is up"
        )
    if code == "NoSuchBucket":
        bucket = parse_uri(uri).bucket if uri.startswith("s3://") else uri
        return BucketMissing(
            f"bucket {bucket!r} does not exist at {where} (for {uri}); create it or fix the URI"
        )
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectMissing(f"{uri} does not exist at {where}; check the key")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(
            f"access denied to {uri} at {where} ({code}); check the credentials and the bucket "
            "policy"
        )
    if name == "NoCredentialsError":
        return StorageError(
            f"no AWS credentials found for {uri}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a "
            "profile or a role"
        )
    return StorageError(
        f"S3 request for {uri} at {where} failed: {redact(code or name)}: {redact(str(err))[:300]}"
    )


def make_s3_client(
    endpoint_url: str | None = None,
    max_pool_connections: int = 32,
    *,
    max_attempts: int = 8,
    connect_timeout: float = 10,
) -> Any:
    """A boto3 S3 client with standard retries and a connection pool sized for threads.

    The endpoint comes from ``endpoint_url``, else the standard AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ENDPOINT_URL_S3``) that boto3 reads itself. Callers that retry on their own terms pass a
    small ``max_attempts``.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, config=config)


def open_storage(uri: str, *, s3_client: Any = None, endpoint_url: str | None = None) -> Storage:
    """The backend for ``uri``'s scheme. Pass ``s3_client`` to share one client across calls."""
    scheme = parse_uri(uri).scheme
    if scheme == "s3":
        return S3Storage(s3_client, endpoint_url=endpoint_url)
    return FileStorage()

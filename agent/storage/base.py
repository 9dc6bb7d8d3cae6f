"""The storage interface and its ``file://`` backend: list, head, verified whole or ranged reads,
writes, delete. The ``s3://`` backend is agent.storage.s3."""

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
from typing import IO, cast

from agent.errors import BucketMissing, DiskFullError, ObjectMissing, StoppedOnRequest, StorageError
from agent.storage.checked import DEFAULT_READ, CheckedRead, ReadOptions

__all__ = [
    "DownloadStopped",
    "FileStorage",
    "Location",
    "ObjectInfo",
    "Storage",
    "parse_uri",
    "redact",
    "write_text_atomically",
]

_COPY_BUFFER = 1024 * 1024


class DownloadStopped(StoppedOnRequest):
    """:meth:`Storage.get_file` ended early because its ``cancel`` event was set (a stop asked
    of the agent): neither the file nor its ``.part`` is left."""


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
    """Write ``text`` to ``path.tmp``, then rename it over ``path``: no reader sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Storage(ABC):
    """Operations every backend offers. URIs passed in must be of this backend's scheme."""

    @abstractmethod
    def list(self, uri: str, *, cancel: threading.Event | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with the URI's key (S3 prefix semantics; folders recurse),
        in key order. ``cancel`` set ends the retries of a failing page request."""

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

    @abstractmethod
    def get_checked(
        self,
        uri: str,
        *,
        size: int | None = None,
        byte_range: tuple[int, int] | None = None,
        options: ReadOptions = DEFAULT_READ,
    ) -> CheckedRead:
        """An open, verified body of the object (or of bytes ``byte_range[0]`` to
        ``byte_range[1]``, exclusive): its byte count is checked against ``size`` (the listing's)
        and its digest as :class:`~agent.storage.checked.CheckedRead` says."""

    def get_bytes(self, uri: str, start: int = 0, end: int | None = None) -> bytes:
        """The object's bytes (or a range of them), verified."""
        if start or end is not None:
            with self.open(uri, start, end) as stream:
                return stream.read()
        return self.get_checked(uri).read_all()

    def get_file(
        self,
        uri: str,
        dest: Path,
        expected_size: int | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> int:
        """Download to ``dest`` via ``dest.part`` and an atomic rename; returns the byte count.

        The bytes are verified (count, and a digest where S3 gives one); a byte count different
        from ``expected_size`` raises ShortRead (a StorageError) and leaves no file behind.
        ``cancel`` is looked at between two reads (1 MiB at most): once it is set the download
        ends with DownloadStopped, leaving no file behind.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        buffer = bytearray(_COPY_BUFFER)
        view = memoryview(buffer)
        try:
            with self.get_checked(uri, size=expected_size) as body, open(part, "wb") as out:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise DownloadStopped(f"the download of {uri} stopped on request")
                    count = body.readinto(buffer)
                    if not count:
                        break
                    out.write(view[:count])
                body.finish()
                written = body.length
        except OSError as err:
            part.unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"disk full while writing {dest} from {uri}; free space on {dest.parent} or "
                    "use a bigger volume"
                ) from err
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        return written


class FileStorage(Storage):
    """``file://`` URIs: a local or mounted folder that looks like a bucket."""

    def list(self, uri: str, *, cancel: threading.Event | None = None) -> Iterator[ObjectInfo]:
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
        # _Limited has the read/close/with of IO[bytes] that callers of open() use
        return cast(IO[bytes], _Limited(handle, end - start))

    def get_checked(
        self,
        uri: str,
        *,
        size: int | None = None,
        byte_range: tuple[int, int] | None = None,
        options: ReadOptions = DEFAULT_READ,
    ) -> CheckedRead:
        path = parse_uri(uri).key
        try:
            handle = open(path, "rb")
        except FileNotFoundError as err:
            raise ObjectMissing(f"{uri} does not exist; check the path") from err
        except IsADirectoryError as err:
            raise BucketMissing(f"{uri} is a folder, not an object; check the key") from err
        except OSError as err:
            raise StorageError(
                f"cannot read {uri}: {err.strerror}; check the path and permissions"
            ) from err
        length = os.fstat(handle.fileno()).st_size
        if byte_range is None:
            return CheckedRead(uri, handle, length, None, expected_size=size, options=options)
        start, end = byte_range[0], min(byte_range[1], length)
        handle.seek(start)
        body = _Limited(handle, max(0, end - start))
        return CheckedRead(uri, body, max(0, end - start), None, options=options)

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

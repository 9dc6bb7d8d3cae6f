"""Verified reads: a GET whose bytes are counted and digested as they are read.

:class:`CheckedRead` wraps any open body (the lean GET, boto3's stream, a local file). Its byte
count must equal the Content-Length and the size the listing gave; its digest is the full-object
CRC32/SHA S3 returned when it returned one (CRC32 costs a tenth of MD5), else the MD5 a plain ETag
is (:func:`plain_md5_etag`, the one copy of that rule), up to ``ReadOptions.md5_max_size`` bytes.
Any difference raises :class:`~agent.storage.retry.ShortRead`.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

from agent.storage.retry import ShortRead

__all__ = [
    "DEFAULT_READ",
    "BodyCheck",
    "CheckedRead",
    "ReadOptions",
    "checksum_of",
    "object_digests",
    "plain_md5_etag",
]

Buffer = bytearray | memoryview


class RawBody(Protocol):
    """What :class:`CheckedRead` reads from."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReadOptions:
    """How reads are made and checked: ``lean`` GETs (agent.storage.lean, boto3 for anything
    unusual), MD5 of plain ETags when ``verify_md5``, for bodies up to ``md5_max_size`` bytes."""

    lean: bool = True
    verify_md5: bool = True
    md5_max_size: int = 1024**3


DEFAULT_READ = ReadOptions()


def plain_md5_etag(etag: str | None, sse: str | None, sse_customer: str | None) -> bool:
    """Whether ``etag`` is the MD5 of the body: a single-part upload (no ``-N``) that is not
    encrypted with KMS or a customer key."""
    return (
        bool(etag)
        and etag is not None
        and len(etag) == 32
        and "-" not in etag
        and sse in (None, "AES256")
        and sse_customer is None
    )


# Full-object checksums S3 may return that the standard library can recompute: name -> header.
# (CRC32C and CRC64NVME are not in it: with only those, a plain-MD5 ETag is the check.)
_CHECKSUMS = {
    "crc32": "x-amz-checksum-crc32",
    "sha1": "x-amz-checksum-sha1",
    "sha256": "x-amz-checksum-sha256",
}


def checksum_of(headers: Any) -> tuple[str, bytes] | None:
    """(name, digest) of the full-object checksum a GET's response headers (anything with
    ``getheader``) carry, or None: no checksum, a composite one, or one this cannot recompute."""
    if (headers.getheader("x-amz-checksum-type") or "FULL_OBJECT").upper() != "FULL_OBJECT":
        return None  # a composite (per-part) checksum says nothing about the whole body
    for name, header in _CHECKSUMS.items():
        value = headers.getheader(header)
        if value and "-" not in value:
            try:
                return name, base64.b64decode(value, validate=True)
            except ValueError:
                return None
    return None


def object_digests(headers: Any) -> tuple[str | None, bool, tuple[str, bytes] | None]:
    """What a whole-object GET's response headers (anything with ``getheader``) give to check its
    body by: the unquoted ETag, whether that ETag is a plain MD5, and the full-object checksum."""
    etag = (headers.getheader("ETag") or "").strip('"') or None
    md5 = plain_md5_etag(
        etag,
        headers.getheader("x-amz-server-side-encryption"),
        headers.getheader("x-amz-server-side-encryption-customer-algorithm"),
    )
    return etag, md5, checksum_of(headers)


class BodyCheck:
    """The full-object CRC32/SHA-1/SHA-256 S3 returned, recomputed over the body as it is read;
    with no checksum it matches anything."""

    __slots__ = ("_crc", "_hash", "_name", "_want")

    def __init__(self, checksum: tuple[str, bytes] | None) -> None:
        self._name, self._want = checksum if checksum else ("", b"")
        self._crc = 0
        self._hash = hashlib.new(self._name) if self._name in ("sha1", "sha256") else None

    def update(self, data: bytes | Buffer) -> None:
        if self._name == "crc32":
            self._crc = zlib.crc32(data, self._crc)
        elif self._hash is not None:
            self._hash.update(data)

    def _got(self) -> bytes:
        if self._hash is not None:
            return self._hash.digest()
        return self._crc.to_bytes(4, "big") if self._name == "crc32" else b""

    def matches(self) -> bool:
        return not self._name or self._got() == self._want

    def mismatch(self) -> str:
        """What differs, for an error message."""
        return f"has {self._name.upper()} {self._got().hex()}, S3 says {self._want.hex()}"


class CheckedRead:
    """An open body of ``length`` bytes: read it with :meth:`read_all` or :meth:`readinto`, then
    :meth:`finish` (raises ShortRead on a wrong count or digest) and :meth:`close`.

    ``expected_size`` (the listing's) is checked against ``length`` at once. ``md5`` says the ETag
    is a plain MD5; ``checksum`` is (name, digest) of a full-object checksum S3 returned.
    """

    __slots__ = ("_body", "_check", "_md5", "_read", "etag", "length", "uri")

    def __init__(
        self,
        uri: str,
        body: RawBody,
        length: int,
        etag: str | None,
        *,
        md5: bool = False,
        checksum: tuple[str, bytes] | None = None,
        expected_size: int | None = None,
        options: ReadOptions = DEFAULT_READ,
    ) -> None:
        self.uri, self.length, self.etag = uri, length, etag
        self._body = body
        self._read = 0
        if expected_size is not None and length != expected_size:
            body.close()
            raise ShortRead(
                f"short read: {uri} is {length} bytes but the listing said {expected_size}; the "
                "object changed while it was read, or the server is misbehaving"
            )
        self._check = BodyCheck(checksum)
        self._md5 = (
            hashlib.md5()
            if checksum is None and md5 and options.verify_md5 and length <= options.md5_max_size
            else None
        )

    def _digest(self, data: bytes | Buffer) -> None:
        self._read += len(data)
        self._check.update(data)
        if self._md5 is not None:
            self._md5.update(data)

    def read_all(self) -> bytes:
        """The whole body, checked; closes it."""
        try:
            data = self._body.read()
            self._digest(data)
            self.finish()
        finally:
            self.close()
        return data

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (``b""`` at the end)."""
        data = self._body.read(size)
        self._digest(data)
        return data

    def readinto(self, buffer: bytearray) -> int:
        """Up to ``len(buffer)`` bytes into ``buffer``; 0 at the end."""
        readinto = getattr(self._body, "readinto", None)
        if readinto is not None:
            count = int(readinto(buffer))
        else:
            data = self._body.read(len(buffer))
            count = len(data)
            buffer[:count] = data
        if count:
            self._digest(memoryview(buffer)[:count])
        return count

    def finish(self) -> None:
        """Raise ShortRead unless every byte came and the digest matches."""
        if self._read != self.length:
            raise ShortRead(f"short read: {self.uri} gave {self._read} of {self.length} bytes")
        if not self._check.matches():
            raise ShortRead(f"checksum mismatch: {self.uri} {self._check.mismatch()}")
        if self._md5 is not None and self._md5.hexdigest() != self.etag:
            raise ShortRead(
                f"checksum mismatch: {self.uri} has MD5 {self._md5.hexdigest()}, its ETag says "
                f"{self.etag}"
            )

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> CheckedRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

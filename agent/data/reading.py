"""Reading whole objects into memory, checked: byte count against the listing and Content-Length,
MD5 against a
plain ETag, short reads and dropped connections retried with backoff. Shared by Pipe mode and the
dataset."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from typing import Any

from agent.data.leanget import BodyCheck, LeanNetError
from agent.data.listing import Entry
from agent.errors import (
    BucketMissing,
    EndpointUnreachable,
    ObjectMissing,
    StorageError,
    TorchBayError,
)
from agent.storage import parse_uri

__all__ = ["ObjectReader"]

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


class _Mismatch(StorageError):
    """Fewer or other bytes than promised: retried, never accepted."""


class ObjectReader:
    """``read(entry)`` gives the object's bytes. One boto3 client per reader, made on first use (so
    a reader
    can be pickled into DataLoader workers before it is used). With ``lean`` (the default) GETs go
    through
    agent.data.leanget (a fifth of botocore's CPU per GET), boto3 for anything unusual."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        attempts: int = 5,
        backoff: float = 0.5,
        verify_md5: bool = True,
        max_pool_connections: int = 16,
        lean: bool = True,
    ) -> None:
        self._endpoint_url = endpoint_url
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._verify_md5 = verify_md5
        self._pool = max_pool_connections
        self._use_lean = lean
        self._client: Any = None
        self._lean: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        state["_lean"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                from agent.storage import make_s3_client

                self._client = make_s3_client(self._endpoint_url, max_pool_connections=self._pool)
                if self._use_lean:
                    from agent.data.leanget import LeanGetter

                    self._lean = LeanGetter.from_client(self._client)
            return self._client

    def read(self, entry: Entry, stop: threading.Event | None = None) -> bytes:
        """The object's bytes; raises ObjectMissing/BucketMissing at once, StorageError after the
        last attempt."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._read_once(entry)
            except (_Mismatch, LeanNetError) as err:
                last: BaseException = err
            except TorchBayError:
                raise
            except Exception as err:
                response = getattr(err, "response", None)
                code = (
                    str(response.get("Error", {}).get("Code", ""))
                    if isinstance(response, dict)
                    else ""
                )
                if code in _NO_RETRY_CODES or isinstance(
                    err, (TypeError, ValueError, AttributeError)
                ):
                    raise self._translate(err, entry) from err
                last = err
            if attempt >= self._attempts or (stop is not None and stop.is_set()):
                raise self._translate(last, entry) from last
            delay = min(self._backoff * 2 ** (attempt - 1), 10.0) * (0.5 + random.random())
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)

    def _translate(self, err: BaseException, entry: Entry) -> TorchBayError:
        if isinstance(err, LeanNetError):
            where = str(getattr(self._s3().meta, "endpoint_url", "the S3 endpoint"))
            return EndpointUnreachable(
                f"cannot reach {where} for {entry.uri} ({err}); check AWS_ENDPOINT_URL and "
                "that the server is up"
            )
        if isinstance(err, TorchBayError):
            return err
        if entry.uri.startswith("s3://"):
            from agent.storage import translate_s3_error

            where = str(getattr(self._s3().meta, "endpoint_url", "the S3 endpoint"))
            return translate_s3_error(err, entry.uri, where)  # type: ignore[arg-type]
        return StorageError(
            f"reading {entry.uri} failed: {type(err).__name__}: {err}; check the source"
        )

    def _read_once(self, entry: Entry) -> bytes:
        loc = parse_uri(entry.uri)
        etag: str | None = None
        plain = False
        if loc.scheme == "s3":
            client = self._s3()
            if self._lean is not None:
                lean = self._lean.open(loc.bucket, loc.key)
                if lean is not None:
                    return self._check_lean(entry, lean)
            resp = client.get_object(Bucket=loc.bucket, Key=loc.key)
            length = int(resp["ContentLength"])
            etag = (resp.get("ETag") or "").strip('"') or None
            plain = (
                bool(etag)
                and "-" not in etag
                and len(etag) == 32
                and resp.get("ServerSideEncryption") in (None, "AES256")
                and "SSECustomerAlgorithm" not in resp
            )
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        else:
            try:
                with open(loc.key, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError as err:
                raise ObjectMissing(f"{entry.uri} does not exist; check the path") from err
            except IsADirectoryError as err:
                raise BucketMissing(
                    f"{entry.uri} is a folder, not an object; check the key"
                ) from err
            length = len(data)
        if entry.size is not None and length != entry.size:
            raise _Mismatch(f"{entry.uri} is {length} bytes but the listing said {entry.size}")
        if len(data) != length:
            raise _Mismatch(f"short read: {entry.uri} gave {len(data)} of {length} bytes")
        if plain and self._verify_md5 and hashlib.md5(data).hexdigest() != etag:
            raise _Mismatch(f"checksum mismatch: {entry.uri} does not match its ETag {etag}")
        return data

    def _check_lean(self, entry: Entry, resp: Any) -> bytes:
        try:
            if entry.size is not None and resp.length != entry.size:
                raise _Mismatch(
                    f"{entry.uri} is {resp.length} bytes but the listing said {entry.size}"
                )
            data = resp.read()
        finally:
            resp.close()
        if len(data) != resp.length:
            raise _Mismatch(f"short read: {entry.uri} gave {len(data)} of {resp.length} bytes")
        check = BodyCheck(resp.checksum)
        check.update(data)
        if not check.matches():
            raise _Mismatch(f"checksum mismatch: {entry.uri} {check.mismatch()}")
        if (
            resp.checksum is None
            and resp.md5
            and self._verify_md5
            and hashlib.md5(data).hexdigest() != resp.etag
        ):
            raise _Mismatch(f"checksum mismatch: {entry.uri} does not match its ETag {resp.etag}")
        return data

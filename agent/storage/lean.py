"""A lean S3 GET: SigV4-signed whole-object GETs over ``http.client``, one keep-alive connection per
thread.

botocore spends about 2 ms of CPU per GET building, signing and parsing each request; for small
objects that, not the network, bounds a Python stager. This path signs the request itself (the
SigV4 signing key is derived once per day and region; each request costs one SHA-256 and one HMAC)
and reads the body with no response pipeline, about a tenth of botocore's cost. Everything it needs
(endpoint, addressing style, region, credentials) is taken from a boto3 client, so it goes where
that client would. :meth:`LeanGetter.request_for` gives the same signed GET as bytes, for the
one-thread multiplexed GETs of agent.storage.multiget.

It is deliberately narrow: a 200 with a Content-Length is the only answer it handles. Anything else
(an error status, a redirect, a chunked body) is reported as ``None`` after draining, and the
caller uses its boto3 path for that object, which retries and translates errors as usual.
Connection-level failures raise :class:`EndpointUnreachable` (retryable). The caller checks byte
counts and digests: see :class:`LeanResponse`.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import ssl
import sys
import threading
import time
import urllib.parse
from typing import Any

from agent.errors import EndpointUnreachable
from agent.storage.botocore_private import signing_credentials, tls_verify
from agent.storage.checked import object_digests
from agent.storage.wire import (
    EMPTY_SHA256,
    EnvCredentials,
    ListPage,
    http_date,
    parse_list,
    quote,
    sign_get,
    sign_request,
)

__all__ = ["LeanGetter", "LeanResponse", "ListPage", "sign_get", "sign_request"]  # re-exported

_PROBE = "torchbay-lean-probe"  # a key only ever "fetched" locally: see _resolve
_WHOLE_OBJECT = {"x-amz-checksum-mode": "ENABLED"}  # a whole-object GET asks for its checksum


class _Target:
    __slots__ = ("base", "host", "host_header", "port", "region", "scheme")

    def __init__(
        self, scheme: str, host: str, port: int, host_header: str, base: str, region: str
    ) -> None:
        self.scheme, self.host, self.port, self.host_header = scheme, host, port, host_header
        self.base, self.region = base, region


class LeanResponse:
    """An open 200 response: ``length`` (Content-Length), ``etag`` (unquoted), ``md5`` (True when
    the ETag is a
    plain MD5 of the body), ``checksum`` ((name, expected digest bytes) or None). Read with
    ``read()`` or
    ``readinto()``, then ``close()``; a body read to its end leaves the connection open for the next
    GET."""

    __slots__ = ("_conn", "_resp", "checksum", "etag", "length", "md5")

    def __init__(
        self,
        resp: http.client.HTTPResponse,
        conn: http.client.HTTPConnection,
        length: int,
        etag: str | None,
        md5: bool,
        checksum: tuple[str, bytes] | None,
    ) -> None:
        self._resp, self._conn = resp, conn
        self.length, self.etag, self.md5, self.checksum = length, etag, md5, checksum

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (all of it when negative); raises EndpointUnreachable
        when the connection ends early."""
        try:
            return self._resp.read() if size < 0 else self._resp.read(size)
        except (OSError, http.client.HTTPException) as err:
            self._conn.close()
            raise EndpointUnreachable(
                f"connection ended before all {self.length} bytes came: {type(err).__name__}"
            ) from err

    def readinto(self, buffer: Any) -> int:
        """Up to ``len(buffer)`` bytes into ``buffer``; 0 at the end."""
        try:
            return self._resp.readinto(buffer)
        except (OSError, http.client.HTTPException) as err:
            self._conn.close()
            raise EndpointUnreachable(f"connection ended early: {type(err).__name__}") from err

    def close(self) -> None:
        if not self._resp.isclosed():  # not read to its end: the connection cannot be reused
            self._conn.close()
        self._resp.close()


class LeanGetter:
    """Signed GETs for one boto3 client's endpoint and credentials. Thread-safe: one connection per
    thread."""

    def __init__(self, credentials: Any, resolve: Any, timeout: float, ssl_context: Any) -> None:
        self._credentials = credentials
        self._resolve = resolve  # bucket -> _Target or None
        self.timeout = timeout  # seconds a connection may wait for the server
        self._ssl_context = ssl_context
        self._targets: dict[str, _Target | None] = {}
        self._keys: dict[tuple[str, str, str], bytes] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._date = (0, "")

    @classmethod
    def from_client(cls, client: Any, timeout: float = 60.0) -> LeanGetter | None:
        """A getter that goes where ``client`` goes, or None when that client's setup is not one it
        handles
        (no credentials, a proxy, an unsigned or non-SigV4 client)."""
        credentials = signing_credentials(client)
        if credentials is None or getattr(client.meta.config, "proxies", None):
            return None
        endpoint = urllib.parse.urlsplit(str(client.meta.endpoint_url))
        if endpoint.scheme not in ("http", "https") or _proxied(endpoint):
            return None
        context = None
        if endpoint.scheme == "https":
            context = _ssl_context(client)
            if context is None:
                return None

        def resolve(bucket: str) -> _Target | None:
            return _resolve(client, bucket)

        return cls(credentials, resolve, timeout, context)

    @classmethod
    def from_endpoint(cls, endpoint_url: str | None, timeout: float = 60.0) -> LeanGetter | None:
        """A getter for an explicit path-style ``endpoint_url`` with credentials in the environment
        (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``), made without
        boto3; None for any other setup (a profile, a role, a proxy, TLS, no endpoint): there the
        getter comes from a boto3 client (:meth:`from_client`)."""
        env = os.environ
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not endpoint_url or not key or not secret or env.get("AWS_PROFILE"):
            return None
        endpoint = urllib.parse.urlsplit(endpoint_url)
        if endpoint.scheme != "http" or not endpoint.hostname or _proxied(endpoint):
            return None
        if endpoint.path.strip("/") or endpoint.query or endpoint.username:
            return None
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"
        credentials = EnvCredentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
        host, port, netloc = endpoint.hostname, endpoint.port or 80, endpoint.netloc

        def resolve(bucket: str) -> _Target | None:
            return _Target("http", host, port, netloc, f"/{bucket}/", region)

        return cls(credentials, resolve, timeout, None)

    def _send(
        self,
        method: str,
        bucket: str,
        key: str,
        query: dict[str, str] | None = None,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection] | None:
        """One signed request; the response (headers read) and its connection, or None when this
        bucket is not one the lean path can reach."""
        target = self._target(bucket)
        if target is None:
            return None
        path = _path(target, key)
        canonical_query = "&".join(
            f"{quote(name)}={quote(value)}" for name, value in sorted((query or {}).items())
        )
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        signed = self._sign(target, method, path, canonical_query, payload, headers or {})
        url = path + ("?" + canonical_query if canonical_query else "")
        for fresh in (False, True):
            conn = self._connection(target, fresh)
            reused = getattr(conn, "_torchbay_used", False)
            try:
                conn.request(method, url, body=body or None, headers=signed)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
                conn.close()
                if reused and not fresh:
                    continue  # a stale keep-alive: once more on a new connection
                raise EndpointUnreachable(
                    f"connection to {target.host}:{target.port} dropped: {type(err).__name__}"
                ) from err
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                raise EndpointUnreachable(
                    f"cannot reach {target.host}:{target.port}: {type(err).__name__}: {err}"
                ) from err
            conn._torchbay_used = True  # type: ignore[attr-defined]  # a marker on our own object
            if resp.status in (301, 302, 307, 308, 400):
                with self._lock:  # wrong region or addressing: boto3 for this bucket from now on
                    self._targets[bucket] = None
            return resp, conn
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _drain(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> None:
        try:
            resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()

    def open(
        self, bucket: str, key: str, byte_range: tuple[int, int] | None = None
    ) -> LeanResponse | None:
        """GET ``key`` (or bytes ``byte_range[0]`` to ``byte_range[1]``, exclusive): an open 200
        (206 for a range) response, or None when the answer was anything else (use the boto3
        path). A range carries no checksum: the caller checks its byte count."""
        if byte_range is None:
            headers = _WHOLE_OBJECT
        else:
            headers = {"range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"}
        sent = self._send("GET", bucket, key, headers=headers)
        if sent is None:
            return None
        resp, conn = sent
        length = resp.getheader("Content-Length")
        if resp.status != (200 if byte_range is None else 206) or resp.chunked or length is None:
            self._drain(resp, conn)
            return None
        if byte_range is not None:
            etag = (resp.getheader("ETag") or "").strip('"') or None
            return LeanResponse(resp, conn, int(length), etag, False, None)
        etag, md5, checksum = object_digests(resp)
        return LeanResponse(resp, conn, int(length), etag, md5, checksum)

    def over_http(self, bucket: str) -> bool:
        """Whether the lean path reaches ``bucket`` over plain HTTP (what :meth:`request_for`
        needs)."""
        target = self._target(bucket)
        return target is not None and target.scheme == "http"

    def request_for(self, bucket: str, key: str) -> tuple[tuple[str, int], bytes] | None:
        """``open``'s whole-object GET of ``key`` as (host, port) and the request's bytes, for a
        plain-HTTP endpoint only (None: TLS, or a bucket the lean path cannot reach)."""
        target = self._target(bucket)
        if target is None or target.scheme != "http":
            return None
        path = _path(target, key)
        signed = self._sign(target, "GET", path, "", EMPTY_SHA256, _WHOLE_OBJECT)
        lines = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
        return (target.host, target.port), f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode()

    def head(self, bucket: str, key: str) -> tuple[int, str | None, float | None] | bool | None:
        """HEAD ``key``: (size, etag, mtime), False when it does not exist, None for any other
        answer (use boto3)."""
        sent = self._send("HEAD", bucket, key)
        if sent is None:
            return None
        resp, conn = sent
        self._drain(resp, conn)
        length = resp.getheader("Content-Length")
        if resp.status == 404:
            return False
        if resp.status != 200 or length is None:
            return None
        etag = (resp.getheader("ETag") or "").strip('"') or None
        return int(length), etag, http_date(resp.getheader("Last-Modified"))

    def put(self, bucket: str, key: str, data: bytes) -> bool:
        """PUT ``data`` as ``key``, sent with its MD5 for the server to check; False for any answer
        but 200 (use boto3)."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        sent = self._send("PUT", bucket, key, body=data, headers={"content-md5": md5})
        if sent is None:
            return False
        resp, conn = sent
        self._drain(resp, conn)
        return resp.status == 200

    def list_page(self, bucket: str, prefix: str, token: str | None) -> ListPage | None:
        """One ListObjectsV2 page, or None for any answer but a well-formed 200 (use boto3)."""
        query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if token:
            query["continuation-token"] = token
        sent = self._send("GET", bucket, "", query=query)
        if sent is None:
            return None
        resp, conn = sent
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise EndpointUnreachable(f"connection ended early: {type(err).__name__}") from err
        if resp.status != 200:
            return None
        return parse_list(raw)

    def _target(self, bucket: str) -> _Target | None:
        try:
            return self._targets[bucket]
        except KeyError:
            pass
        target = self._resolve(bucket)
        with self._lock:
            return self._targets.setdefault(bucket, target)

    def _connection(self, target: _Target, fresh: bool = False) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = None if fresh else conns.get((target.host, target.port))
        if conn is None:
            if target.scheme == "https":
                conn = http.client.HTTPSConnection(
                    target.host, target.port, timeout=self.timeout, context=self._ssl_context
                )
            else:
                conn = http.client.HTTPConnection(target.host, target.port, timeout=self.timeout)
            conns[(target.host, target.port)] = conn
        return conn

    def _sign(
        self,
        target: _Target,
        method: str,
        path: str,
        query: str,
        payload: str,
        extra: dict[str, str],
    ) -> dict[str, str]:
        frozen = self._credentials.get_frozen_credentials()
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))
        return sign_request(
            method,
            target.host_header,
            path,
            query,
            target.region,
            (frozen.access_key, frozen.secret_key, frozen.token),
            self._date[1],
            payload,
            extra,
            self._keys,
        )


def _path(target: _Target, key: str) -> str:
    """The URI-encoded request path of ``key`` at ``target``."""
    return urllib.parse.quote(target.base + key, safe="/~")


def _resolve(client: Any, bucket: str) -> _Target | None:
    """Where ``client`` would send a GET in ``bucket`` and the region it would sign for: one
    GetObject call that
    is stopped before it is sent (a ``before-send`` hook answers it locally), so endpoint rules,
    addressing
    style and the signing region are botocore's own."""
    from botocore.awsrequest import AWSResponse  # botocore: only once a client exists

    seen: dict[str, str] = {}
    probe = f"{_PROBE}-{threading.get_ident()}-{time.monotonic_ns()}"

    def capture(request: Any, **_: Any) -> Any:
        if not urllib.parse.unquote(urllib.parse.urlsplit(request.url).path).endswith("/" + probe):
            return None  # another thread's real request
        seen["url"] = request.url
        auth = request.headers.get("Authorization", b"")
        seen["auth"] = auth.decode("ascii", "replace") if isinstance(auth, bytes) else str(auth)
        return AWSResponse(request.url, 200, {"Content-Length": "0"}, _EmptyRaw())

    handler_id = f"torchbay-lean-{probe}"
    client.meta.events.register_first("before-send.s3.GetObject", capture, unique_id=handler_id)
    try:
        client.get_object(Bucket=bucket, Key=probe)
    except Exception:
        return None
    finally:
        client.meta.events.unregister("before-send.s3.GetObject", unique_id=handler_id)
    parts = urllib.parse.urlsplit(seen.get("url", ""))
    path = urllib.parse.unquote(parts.path)
    auth = seen.get("auth", "")
    if (
        not auth.startswith("AWS4-HMAC-SHA256 Credential=")
        or not path.endswith("/" + probe)
        or parts.query
        or parts.scheme not in ("http", "https")
        or not parts.hostname
    ):
        return None
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
    if len(scope) != 5 or scope[3] != "s3":
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _Target(parts.scheme, parts.hostname, port, parts.netloc, path[: -len(probe)], scope[2])


class _EmptyRaw:
    """The body of the locally answered probe."""

    def stream(self, **_: Any) -> Any:
        return iter(())

    def read(self, *_: Any) -> bytes:
        return b""


def _proxied(endpoint: urllib.parse.SplitResult) -> bool:
    if sys.platform == "linux" and not any(name.lower().endswith("_proxy") for name in os.environ):
        # getproxies() reads only the *_proxy variables on Linux: with none set there is no proxy,
        # and the channel listing's path skips urllib.request (~3 ms with tempfile)
        return False
    import urllib.request  # ~2 ms over http.client: only for an S3 endpoint with a proxy variable

    proxies = urllib.request.getproxies()
    return bool(proxies.get(endpoint.scheme)) and not urllib.request.proxy_bypass(
        endpoint.hostname or ""
    )


def _ssl_context(client: Any) -> ssl.SSLContext | None:
    """A TLS context that verifies as ``client`` does, or None (use boto3)."""
    from botocore.httpsession import get_cert_path  # botocore: only once a client exists

    verify = tls_verify(client)
    if verify is None:
        return None
    try:
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        cafile = verify if isinstance(verify, str) else get_cert_path(True)
        return ssl.create_default_context(cafile=cafile if isinstance(cafile, str) else None)
    except (OSError, ValueError, ssl.SSLError):
        return None

"""HTTP to the endpoint a transform job uses: one keep-alive connection per sending thread, retries
with backoff."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import EndpointUnreachable

__all__ = ["Endpoint", "Reply"]

_RETRIED = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    attempts: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def reason(self) -> str:
        """The server's message (the ``message`` of a JSON error body, else the body's start)."""
        try:
            doc = json.loads(self.body)
            if isinstance(doc, dict) and doc.get("message"):
                return str(doc["message"])[:300]
        except ValueError:
            pass
        return self.body[:300].decode("utf-8", errors="replace")


class Endpoint:
    """``http://host:port`` of a serving container; thread-safe (each thread keeps its own
    connection)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parsed = urllib.parse.urlparse(url if "://" in url else "http://" + url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise EndpointUnreachable(
                f"endpoint {url!r} is not http://host:port; give the URL of a running "
                "`torchbay serve`"
            )
        self.url = f"http://{parsed.netloc}"
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._base = parsed.path.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self._backoff, self._max_backoff, self._sleep = backoff, max_backoff, sleep
        self._local = threading.local()
        self.retries = 0  # requests sent again, over the whole job
        self._lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before (it may have been closed
        since)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            return conn, False
        return conn, True

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, str]:
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, self._base + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if (response.getheader("Connection") or "").lower() == "close":
                    self._drop()
                return response.status, data, response.getheader("Content-Type") or ""
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop()
                if (
                    not reused
                ):  # a kept-alive connection the server closed meanwhile: once more on a new one
                    raise
            except BaseException:
                self._drop()
                raise

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        retries: int | None = None,
    ) -> Reply:
        """One request, sent again with backoff on 408/429/5xx and dropped connections (``retries``
        times at most).

        Raises EndpointUnreachable when the last attempt could not connect at all.
        """
        allowed = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            attempt += 1
            try:
                status, data, content_type = self._once(method, path, body, dict(headers or {}))
                error: BaseException | None = None
            except (OSError, http.client.HTTPException) as err:
                status, data, content_type, error = 0, b"", "", err
            if error is None and status not in _RETRIED:
                return Reply(status, data, content_type, attempt)
            if attempt > allowed:
                if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
                    raise EndpointUnreachable(
                        f"{method} {self.url}{path} failed ({type(error).__name__}: {error}) "
                        f"after {attempt} attempts; check that the endpoint is up"
                    ) from error
                if isinstance(error, socket.timeout):
                    return Reply(
                        504,
                        json.dumps(
                            {
                                "message": f"no answer within {self.timeout:g} s "
                                "(InvocationsTimeoutInSeconds)"
                            }
                        ).encode(),
                        "application/json",
                        attempt,
                    )
                if (
                    error is not None
                ):  # the connection dropped mid-request: this request's failure (a record
                    # that kills the worker), not the endpoint's; a dead endpoint refuses the next
                    # one
                    return Reply(
                        502,
                        json.dumps(
                            {"message": f"the connection dropped ({type(error).__name__}: {error})"}
                        ).encode(),
                        "application/json",
                        attempt,
                    )
                return Reply(status, data, content_type, attempt)
            with self._lock:
                self.retries += 1
            delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            self._sleep(delay * (0.5 + random.random() / 2))

    def get_json(self, path: str) -> Any | None:
        """A JSON GET; None on 404 (or a body that is not JSON)."""
        reply = self.request("GET", path)
        if reply.status == 404 or not reply.ok:
            return None
        try:
            return json.loads(reply.body)
        except ValueError:
            return None

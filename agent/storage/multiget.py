"""Many small whole-object GETs on one thread: keep-alive connections multiplexed with selectors.

Staging thousands of small objects on a pool of threads spends its CPU on handing the GIL between
them (about 80 futex calls an object, measured on 2,000 x 64 KiB) more than on HTTP. One thread
driving ``connections`` non-blocking sockets makes the same GETs with none of that: each request is
the lean GET's (agent.storage.lean, :meth:`LeanGetter.request_for`: same signature, same checksum
request), each body is read whole into memory (callers send only small objects) and handed to
``deliver`` as a :class:`CheckedRead`, which checks its byte count and digest exactly as on the
threaded path.

Narrow on purpose, like the lean GET: plain-HTTP endpoints only, and a 200 with a Content-Length
the only answer it handles. Any other answer, a connection that fails or stalls for ``timeout``
seconds, a body of the wrong size or a spoiled one (``deliver`` raising ShortRead) puts the item on
the returned :class:`Missed`, for the caller's retrying path, which translates and retries errors
as usual; ``Missed.spent`` are those whose GET counts as a failed attempt (a dropped or stalled
connection, a wrong or spoiled body), ``Missed.other`` those that got another answer or none.
Any other exception from ``deliver`` (a full disk) closes every connection and propagates.
"""

from __future__ import annotations

import errno
import io
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from agent.storage.base import parse_uri
from agent.storage.checked import DEFAULT_READ, CheckedRead, ReadOptions, object_digests
from agent.storage.retry import ShortRead

if TYPE_CHECKING:  # pragma: no cover
    from agent.storage.lean import LeanGetter  # http.client and ssl: only once s3:// is read

__all__ = ["Missed", "get_many"]

T = TypeVar("T")
_MAX_HEAD = 64 * 1024  # a response head longer than this is not one the lean path handles
_RECV = 256 * 1024


@dataclass
class Missed(Generic[T]):
    """The items :func:`get_many` did not deliver: ``spent`` after a failed attempt, ``other``
    after another answer (an error status, a redirect, a chunked body), or none at all."""

    spent: list[T] = field(default_factory=list)
    other: list[T] = field(default_factory=list)


class _Headers:
    """A response head's headers by lower-case name, with ``getheader`` as http.client has it."""

    __slots__ = ("_map",)

    def __init__(self, lines: list[bytes]) -> None:
        self._map: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(b":")
            if sep:
                self._map[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")

    def getheader(self, name: str) -> str | None:
        return self._map.get(name.lower())


class _Conn(Generic[T]):
    """One connection and the GET it carries: ``head`` collects the response head, then
    ``body`` (pre-sized to the Content-Length) is filled straight from the socket."""

    __slots__ = (
        "body",
        "close_after",
        "connecting",
        "got",
        "head",
        "headers",
        "item",
        "last",
        "out",
        "request",
        "retried",
        "sock",
        "target",
        "uri",
        "used",
        "want",
    )

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.target: tuple[str, int] | None = None
        self.used = False  # answered a request before: a drop before any byte means stale
        self.item: T | None = None
        self.uri = ""
        self.want: int | None = None
        self.request = b""
        self.retried = False
        self.out = memoryview(b"")
        self.head = bytearray()
        self.headers: _Headers | None = None
        self.body: bytearray | None = None
        self.got = 0
        self.close_after = False
        self.connecting = False
        self.last = 0.0


def get_many(
    lean: LeanGetter,
    items: Iterable[tuple[str, int | None, T]],
    deliver: Callable[[T, CheckedRead], None],
    *,
    connections: int = 16,
    options: ReadOptions = DEFAULT_READ,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
) -> Missed[T]:
    """GET each ``(uri, expected size, item)``; ``deliver(item, body)`` for each 200. Returns the
    items it did not deliver (see the module docstring), in no particular order; on ``cancel`` the
    ones not yet delivered are ``other``. ``timeout``: seconds a connection may stall (None: the
    lean getter's)."""
    loop = _Loop(lean, iter(items), deliver, options, lean.timeout if timeout is None else timeout)
    try:
        return loop.run(max(1, connections), cancel or threading.Event(), tick)
    finally:
        loop.close()


class _Loop(Generic[T]):
    def __init__(
        self,
        lean: LeanGetter,
        items: Iterator[tuple[str, int | None, T]],
        deliver: Callable[[T, CheckedRead], None],
        options: ReadOptions,
        timeout: float,
    ) -> None:
        self._lean, self._items, self._deliver = lean, items, deliver
        self._options, self._timeout = options, timeout
        self._selector = selectors.DefaultSelector()
        self._missed: Missed[T] = Missed()
        self._conns: list[_Conn[T]] = []
        self._recv = bytearray(_RECV)

    def run(
        self, connections: int, cancel: threading.Event, tick: Callable[[], None] | None
    ) -> Missed[T]:
        self._conns = [_Conn() for _ in range(connections)]
        busy = sum(self._next(conn) for conn in self._conns)
        next_tick = time.monotonic() + 0.2
        while busy and not cancel.is_set():
            for key, _events in self._selector.select(0.2):
                conn: _Conn[T] = key.data
                if not self._step(conn):
                    busy -= 1 - self._next(conn)
            now = time.monotonic()
            if now < next_tick:
                continue
            next_tick = now + 0.2
            for conn in self._conns:
                if conn.item is not None and now - conn.last > self._timeout:
                    self._fail(conn, spent=True)  # stalled: the caller's path retries it
                    busy -= 1 - self._next(conn)
            if tick is not None:
                tick()
        if cancel.is_set():
            self._missed.other.extend(c.item for c in self._conns if c.item is not None)
            self._missed.other.extend(item for _uri, _size, item in self._items)
        return self._missed

    def close(self) -> None:
        for conn in self._conns:
            self._drop(conn)
        self._selector.close()

    # --- one connection ---------------------------------------------------------------------

    def _next(self, conn: _Conn[T]) -> int:
        """Start the next item on ``conn``: 1, or 0 when there is none left."""
        for uri, size, item in self._items:
            loc = parse_uri(uri)
            request = self._lean.request_for(loc.bucket, loc.key)
            if request is None:
                self._missed.other.append(item)
                continue
            target, conn.request = request
            conn.item, conn.uri, conn.want, conn.retried = item, uri, size, False
            if self._send(conn, target):
                return 1
            self._fail(conn, spent=True)  # no connection
        self._drop(conn)  # nothing left for it
        return 0

    def _send(self, conn: _Conn[T], target: tuple[str, int]) -> bool:
        if conn.sock is not None and conn.target != target:
            self._drop(conn)
        conn.head, conn.headers, conn.body, conn.got = bytearray(), None, None, 0
        conn.out, conn.last = memoryview(conn.request), time.monotonic()
        if conn.sock is None:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                return False
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                host = socket.gethostbyname(target[0])
                code = sock.connect_ex((host, target[1]))
            except OSError:
                sock.close()
                return False
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                return False
            conn.sock, conn.target, conn.used, conn.connecting = sock, target, False, True
            self._selector.register(sock, selectors.EVENT_WRITE, conn)
        else:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        return True

    def _step(self, conn: _Conn[T]) -> bool:
        """Act on a ready socket; False once its item is done (delivered or failed)."""
        sock = conn.sock
        assert sock is not None
        if conn.item is None:  # an idle kept-alive connection closed or spoke: not to be reused
            self._drop(conn)
            return True
        conn.last = time.monotonic()
        if conn.out:
            try:
                error = (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if conn.connecting else 0
                )
                conn.connecting = False
                sent = 0 if error else sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                error = 1
            if error:
                return self._lost(conn)
            conn.out = conn.out[sent:]
            if not conn.out:
                self._selector.modify(sock, selectors.EVENT_READ, conn)
            return True
        while True:
            try:
                if conn.body is not None:
                    count = sock.recv_into(memoryview(conn.body)[conn.got :])
                else:
                    count = sock.recv_into(self._recv)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return self._lost(conn)
            if not count:
                return self._lost(conn)
            if conn.body is not None:
                conn.got += count
            else:
                conn.head += memoryview(self._recv)[:count]
                if not self._parse_head(conn):
                    return False
            if conn.body is not None and conn.got == len(conn.body):
                return self._done(conn)

    def _parse_head(self, conn: _Conn[T]) -> bool:
        """Read the head once it is all here and size the body; False when the item failed."""
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.head) > _MAX_HEAD:
                return self._fail(conn, spent=False)
            return True
        lines = bytes(conn.head[:end]).split(b"\r\n")
        status = lines[0].split(None, 2)
        headers = _Headers(lines[1:])
        length = headers.getheader("content-length")
        if (
            len(status) < 2
            or status[1] != b"200"
            or headers.getheader("transfer-encoding")
            or length is None
            or not length.isdigit()
        ):
            return self._fail(conn, spent=False)  # any other answer: the caller's path reads it
        if conn.want is not None and int(length) != conn.want:
            return self._fail(conn, spent=True)  # not the object listed: a short read
        conn.headers = headers
        conn.close_after = (headers.getheader("connection") or "").lower() == "close"
        conn.body = bytearray(int(length))
        rest = memoryview(conn.head)[end + 4 :]
        if len(rest) > len(conn.body):
            return self._fail(conn, spent=True)  # more than its Content-Length: spoiled
        conn.body[: len(rest)] = rest
        conn.got = len(rest)
        return True

    def _done(self, conn: _Conn[T]) -> bool:
        headers, body, item = conn.headers, conn.body, conn.item
        assert headers is not None and body is not None and item is not None
        conn.item, conn.used = None, True
        if conn.close_after:
            self._drop(conn)
        etag, md5, checksum = object_digests(headers)
        checked = CheckedRead(
            conn.uri,
            io.BytesIO(body),
            len(body),
            etag,
            md5=md5,
            checksum=checksum,
            expected_size=conn.want,
            options=self._options,
        )
        try:
            self._deliver(item, checked)
        except ShortRead:
            self._missed.spent.append(item)
        return False

    def _lost(self, conn: _Conn[T]) -> bool:
        """The connection failed or closed: once more on a fresh one when a kept-alive connection
        dropped before answering (it went stale), else the item fails."""
        stale = conn.used and not conn.retried and not conn.head and conn.body is None
        target = conn.target
        self._drop(conn)
        if stale and target is not None:
            conn.retried = True
            if self._send(conn, target):
                return True
        return self._fail(conn, spent=True)

    def _fail(self, conn: _Conn[T], *, spent: bool) -> bool:
        if conn.item is not None:
            (self._missed.spent if spent else self._missed.other).append(conn.item)
            conn.item = None
        self._drop(conn)  # mid-answer: the connection cannot carry another request
        return False

    def _drop(self, conn: _Conn[T]) -> None:
        if conn.sock is not None:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None

"""The gunicorn worker: a request thread is only ever given a request that has fully arrived.

gunicorn's gthread worker hands a connection to a request thread as soon as it turns readable, and
the thread then blocks reading the rest of the headers and the body: eight clients that announce
a body and stall hold every thread of a worker, and the server stops answering. This worker reads
each request in its event loop instead, without blocking, into a buffer; only when the headers
and the whole body (Content-Length or chunked) are there does a thread get it, replayed from the
buffer. Meanwhile the client is held to deadlines:

- headers within ``header_timeout`` seconds of the connection (or of the first byte of a follow-up
  request on a kept-alive connection);
- the body within ``header_timeout + length / body_min_rate`` seconds of the headers;
- idle kept-alive connections closed after ``keepalive`` seconds (gunicorn's own keep-alive).

A client that misses its deadline after sending part of a request gets a 408 JSON answer and the
connection is closed; one that sent nothing is closed. Parser errors (414, 431, 400) are answered
with the same JSON body as every other error, and logged as one rate-limited line.

The loop also watches the model: a model call running longer than ``stuck_timeout`` marks this
worker stuck in the shared state (``/ping`` then answers 503 naming it) and the worker exits, so the
master replaces it. Connections spread evenly over workers (each accepts only while it holds no more
than one over the fewest any other holds), re-checked every 10 ms while it is not accepting; a
connection no worker takes within 10 ms is taken anyway.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from agent.serving.batching import set_torch_threads
from agent.serving.ratelog import RateLimitedLog

__all__ = ["EXIT_STUCK", "make_worker", "request_complete"]

EXIT_STUCK = 70  # a worker that gave up on a stuck model call (the master replaces it)

_MAX_HEAD = 64 * 1024  # headers longer than this go to gunicorn's parser, which answers 431
_BALANCE_TICK = 0.01  # seconds between re-checks while balancing keeps a worker from accepting
_READ_TICK = 0.1  # seconds between deadline checks while requests are being read
_ACCEPT_BATCH = 64  # most connections accepted per wake-up
_LINGER = 1.0  # seconds a stuck worker keeps answering (/ping: 503) before it exits


def request_complete(buf: bytes | bytearray, max_body: int) -> tuple[bool, int | None]:
    """(the request in ``buf`` has fully arrived, its body length once the headers are in: 0 when
    chunked).

    Also True when reading on would not help: a body over ``max_body`` (the app answers 413 without
    reading it), or a head too long or malformed (gunicorn's parser answers 431 or 400).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return len(buf) > _MAX_HEAD, None
    head = bytes(buf[:end]).decode("latin-1")
    length, chunked = 0, False
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return True, None  # the parser answers 400
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    start = end + 4
    if (
        chunked
    ):  # the body's length is unknown until it ends: its deadline is the header timeout again
        return _chunked_complete(buf, start, max_body), 0
    if length > max_body or length < 0:
        return True, length
    return len(buf) - start >= length, length


def _chunked_complete(buf: bytes | bytearray, i: int, max_body: int) -> bool:
    total = 0
    while True:
        line_end = buf.find(b"\r\n", i)
        if line_end < 0:
            return (
                len(buf) - i > 1024
            )  # a chunk-size line this long is malformed: the parser says so
        size_text = bytes(buf[i:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return True
        if size == 0:
            return (
                buf.find(b"\r\n\r\n", line_end) >= 0 or buf[line_end : line_end + 4] == b"\r\n\r\n"
            )
        total += size
        if total > max_body:
            return True
        i = line_end + 2 + size + 2
        if i > len(buf):
            return False


def _json_answer(status: int, phrase: str, message: str) -> bytes:
    body = json.dumps({"code": status, "error": phrase, "message": message}).encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: "
        f"{len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def _parser_error(exc: BaseException, cfg: Any) -> tuple[int, str, str]:
    """(status, phrase, message) for an error gunicorn's HTTP parser raised."""
    name = type(exc).__name__
    text = str(exc)[:200]
    if name == "LimitRequestLine":
        return (
            414,
            "URI Too Long",
            (
                f"the request line is longer than {cfg.limit_request_line} bytes ({text}); "
                "send a shorter URL"
            ),
        )
    if name == "LimitRequestHeaders":
        return (
            431,
            "Request Header Fields Too Large",
            (
                f"the request headers are over the limits ({text}: at most "
                f"{cfg.limit_request_fields} fields of "
                f"{cfg.limit_request_field_size} bytes); send fewer or shorter headers"
            ),
        )
    if name == "UnsupportedTransferCoding":
        return 501, "Not Implemented", f"{text}; send Content-Length or chunked"
    if name == "ExpectationFailed":
        return 417, "Expectation Failed", text
    if name == "ForbiddenProxyRequest":
        return 403, "Forbidden", "proxy requests are not allowed here"
    if name in (
        "InvalidRequestLine",
        "InvalidRequestMethod",
        "InvalidHTTPVersion",
        "InvalidHeader",
        "InvalidHeaderName",
        "ObsoleteFolding",
        "InvalidChunkSize",
        "ChunkMissingTerminator",
        "InvalidChunkExtension",
        "InvalidProxyLine",
        "InvalidSchemeHeaders",
        "NoMoreData",
    ):
        return 400, "Bad Request", f"malformed HTTP request ({name}: {text})"
    return (
        500,
        "Internal Server Error",
        f"internal error while reading the request ({name}); see the server log",
    )


def make_worker(serving: Any) -> type:
    """gunicorn's gthread worker class for ``serving`` (an agent.serving.app.Serving)."""
    config, state = serving.config, serving.state
    log = logging.getLogger("torchbay.serve")

    class TorchBayWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no types
        _slot: int | None = None
        _limit = 1000

        # --- balancing --------------------------------------------------------------------
        @property
        def worker_connections(self) -> int:  # read by gunicorn's loop before each wait for events
            if self._slot is None:
                self._slot = state.worker_slot(os.getpid())
            if self._slot is None:
                return self._limit
            state.set_connections(self._slot, self.nr_conns)
            fewest = state.fewest_connections(self._slot)
            return self._limit if fewest is None else min(self._limit, fewest + 1)

        @worker_connections.setter
        def worker_connections(self, value: int) -> None:
            self._limit = value

        def get_thread_pool(self) -> Any:
            # request threads run input_fn/output_fn (user code may call torch): each gets the
            # worker's torch thread count, as the inference thread does (see set_torch_threads)
            return ThreadPoolExecutor(
                max_workers=self.cfg.threads,
                initializer=set_torch_threads,
                initargs=(config.torch_threads,),
            )

        # --- reading requests in the loop -------------------------------------------------
        def init_process(self) -> None:
            self._reading: dict[
                Any, None
            ] = {}  # connections whose request is being read, oldest first
            self._client_log = RateLimitedLog(log)
            self._stuck_at: float | None = None
            self._checked = 0.0
            self._listen_probe: selectors.BaseSelector | None = None
            self._unclaimed_since: float | None = None
            super().init_process()

        def accept(self, listener: Any, room: int | None = None) -> None:
            # Every waiting connection up to the balance limit, not one per turn of the loop: a
            # burst of
            # 300 sockets otherwise queues a new client behind 300 turns (~1 s on a loaded machine).
            if room is None:
                room = _ACCEPT_BATCH
            for n in range(room):
                if (
                    n and self.nr_conns >= self.worker_connections
                ):  # re-read: the others' counts move too
                    return
                try:
                    client, address = listener.accept()
                except OSError as err:
                    if err.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                        return
                    raise
                self.nr_conns += 1
                if self._slot is not None:  # published at once, so the others' limits follow
                    state.set_connections(self._slot, self.nr_conns)
                conn = TConn(self.cfg, client, address, listener.getsockname())  # non-blocking
                self._start_reading(conn, b"")

        def on_client_socket_readable(
            self, conn: Any, client: Any
        ) -> None:  # a kept-alive connection
            # The hot path under keep-alive load: the registration stays (one epoll call, as
            # gunicorn's own)
            # and the request is read here; only a request that is not all there yet waits in
            # _reading.
            self.keepalived_conns.remove(conn)
            self._reset(conn, b"")
            self._reading[conn] = None
            self.poller.modify(client, selectors.EVENT_READ, partial(self._on_readable, conn))
            self._on_readable(conn, client)

        def enqueue_req(self, conn: Any) -> None:
            if getattr(conn, "tb_request", None) is None and conn.parser is not None:
                # gunicorn re-queues a connection whose next request was read ahead with the last
                # one's
                # body: that may be only part of a request, so it is read on here first.
                ahead = conn.parser.unreader.take_buffered()
                if ahead:
                    conn.sock.setblocking(False)
                    self._start_reading(conn, ahead)
                    return
            super().enqueue_req(conn)

        @staticmethod
        def _reset(conn: Any, data: bytes) -> None:
            conn.tb_buf = bytearray(data)
            conn.tb_request = None
            conn.tb_deadline = time.monotonic() + config.header_timeout
            conn.tb_body_set = False

        def _start_reading(self, conn: Any, data: bytes) -> None:
            self._reset(conn, data)
            if self._maybe_dispatch(conn):
                return
            self._reading[conn] = None
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

        def _on_readable(self, conn: Any, client: Any) -> None:
            try:
                chunk = conn.sock.recv(65536)  # under malloc's mmap threshold: no mmap per read
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            if not chunk:  # the client closed the connection
                self._drop(conn)
                return
            conn.tb_buf += chunk
            if self._maybe_dispatch(conn):
                self._reading.pop(conn, None)
                try:
                    self.poller.unregister(conn.sock)
                except (KeyError, ValueError):
                    pass

        def _maybe_dispatch(self, conn: Any) -> bool:
            """Hand the connection to a request thread when its request is all there; True when
            handed."""
            done, length = request_complete(conn.tb_buf, config.max_payload_bytes)
            if not done:
                if (
                    length is not None and not conn.tb_body_set
                ):  # headers are in: the body's deadline
                    conn.tb_body_set = True
                    conn.tb_deadline = (
                        time.monotonic() + config.header_timeout + length / config.body_min_rate
                    )
                    if (
                        b"100-continue"
                        in bytes(conn.tb_buf[: conn.tb_buf.find(b"\r\n\r\n")]).lower()
                    ):
                        try:
                            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                        except OSError:
                            pass
                return False
            conn.tb_request = bytes(conn.tb_buf)
            conn.tb_buf = bytearray()
            super().enqueue_req(conn)
            return True

        def handle(self, conn: Any) -> Any:
            data = getattr(conn, "tb_request", None)
            if data is not None:
                conn.tb_request = None
                conn.sock.setblocking(True)
                conn.init()
                conn.parser.unreader.unread(data)
                conn.data_ready = True
            try:
                return super().handle(conn)
            except (
                SystemExit
            ) as stop:  # model code called sys.exit outside the app's guard: this request only
                log.error(
                    "sys.exit(%r) during a request; the connection is closed, the worker lives on",
                    stop.code,
                )
                return False

        def _drop(self, conn: Any, answer: bytes | None = None) -> None:
            self._reading.pop(conn, None)
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            if answer is not None:
                try:
                    conn.sock.send(answer)
                except OSError:
                    pass
            self.nr_conns -= 1
            conn.close()

        def _expire_reading(self) -> None:
            now = time.monotonic()
            for conn in [c for c in self._reading if c.tb_deadline <= now]:
                if conn.tb_buf:
                    what = "body" if conn.tb_body_set else "headers"
                    self._client_log.warning(
                        "408 from %s: the request %s did not arrive in time", conn.client, what
                    )
                    limit = (
                        f"{config.header_timeout:g} s plus the body at {config.body_min_rate:g} "
                        "bytes/s "
                        "(TORCHBAY_SERVE_HEADER_TIMEOUT, TORCHBAY_SERVE_BODY_MIN_RATE)"
                        if conn.tb_body_set
                        else f"{config.header_timeout:g} s (TORCHBAY_SERVE_HEADER_TIMEOUT)"
                    )
                    self._drop(
                        conn,
                        _json_answer(
                            408,
                            "Request Timeout",
                            f"the request {what} did not arrive within {limit}; send the "
                            "whole request without pausing",
                        ),
                    )
                    state.record_request("other", 408, 0.0)
                else:
                    self._drop(conn)

        # --- the loop ---------------------------------------------------------------------
        def wait_for_and_dispatch_events(self, timeout: float) -> None:
            if not self._accepting and self.alive and self._stuck_at is None:
                timeout = min(timeout, _BALANCE_TICK)
                self._take_unclaimed()
            if self._reading:
                timeout = min(timeout, _READ_TICK)
            super().wait_for_and_dispatch_events(timeout)
            now = time.monotonic()
            if (
                now - self._checked >= _READ_TICK
            ):  # deadlines and the model, ten times a second at most
                self._checked = now
                if self._reading:
                    self._expire_reading()
                self._watch_model()

        def _take_unclaimed(self) -> None:
            """Accept anyway when a connection has waited ``_BALANCE_TICK`` with no worker taking
            it.

            Balancing keeps this worker out while it holds more than the fewest + 1, but the others
            learn of
            its count only on their next turn: in a burst both can stand aside, leapfrogging one
            connection per turn (gunicorn's turn is up to 1 s: the 0.9 s p99 seen at c=32).
            """
            if self._listen_probe is None:
                self._listen_probe = selectors.DefaultSelector()
                for listener in self.sockets:
                    self._listen_probe.register(listener, selectors.EVENT_READ)
            ready = self._listen_probe.select(0)
            now = time.monotonic()
            if not ready:
                self._unclaimed_since = None
                return
            if self._unclaimed_since is None:
                self._unclaimed_since = now
                return
            if now - self._unclaimed_since >= _BALANCE_TICK:
                self._unclaimed_since = None
                for key, _ in ready:  # one: taking many here would unbalance the workers for good
                    self.accept(key.fileobj, 1)

        def _watch_model(self) -> None:
            if self._stuck_at is not None:
                if time.monotonic() - self._stuck_at >= _LINGER:
                    log.error("worker %d exits so that a fresh one replaces it", os.getpid())
                    logging.shutdown()
                    os._exit(EXIT_STUCK)
                return
            since = serving.busy_since
            if since is None or time.monotonic() - since <= config.stuck_timeout:
                return
            self._stuck_at = time.monotonic()
            log.error(
                "worker %d: a model call has run for %.0f s, over TORCHBAY_SERVE_STUCK_TIMEOUT (%g "
                "s); "
                "the worker is replaced",
                os.getpid(),
                time.monotonic() - since,
                config.stuck_timeout,
            )
            state.worker_stuck(os.getpid(), since)
            self.set_accept_enabled(False)
            self._limit = 0  # accept nothing more

        # --- errors -----------------------------------------------------------------------
        def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
            status, phrase, message = _parser_error(exc, self.cfg)
            if status >= 500:
                log.error("error while handling a request: %s", message, exc_info=exc)
            else:
                self._client_log.warning("%d from %s: %s", status, addr, message)
            state.record_request("other", status, 0.0)
            try:
                client.sendall(_json_answer(status, phrase, message))
            except OSError:
                pass

    return TorchBayWorker

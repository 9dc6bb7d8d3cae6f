"""Hostile clients against a real ``torchbay serve`` (2 workers, gunicorn) on 127.0.0.1.

Each probe checks the status, how long the answer took, and that the workers' memory stays under a
stated bound while new clients keep being answered within 1 s.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from tests.serving.conftest import Server, Servers, make_mlp

ROW = json.dumps([[0.1, 0.2, 0.3, 0.4]]).encode()
HEADER_TIMEOUT = 2.0
MIN_RATE = 1000.0  # bytes/s: a 1,000-byte body must arrive within 2 + 1 s
RSS_BOUND = 150 * 1024 * 1024  # no probe may grow a worker by more than this


@pytest.fixture(scope="module")
def server(serve_module: Servers) -> Iterator[Server]:
    make_mlp(serve_module.root / "model" / "model.pt")
    yield serve_module(
        env={
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
            "TORCHBAY_SERVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
            "TORCHBAY_SERVE_BODY_MIN_RATE": str(MIN_RATE),
            "TORCHBAY_SERVE_KEEPALIVE": "2",
        }
    )


def _workers(server: Server) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children()


def _rss(server: Server) -> int:
    return max(worker.memory_info().rss for worker in _workers(server))


def _timed(
    server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, float, bytes]:
    started = time.monotonic()
    status, _, payload = server.request(
        method,
        path,
        body,
        headers or ({"Content-Type": "application/json"} if body else {}),
        timeout=5,
    )
    return status, time.monotonic() - started, payload


def _answered_quickly(server: Server) -> None:
    """A new client's /ping and /invocations are both answered 200 within 1 s."""
    status, took, _ = _timed(server, "GET", "/ping")
    assert status == 200 and took < 1.0, (status, took)
    status, took, _ = _timed(server, "POST", "/invocations", ROW)
    assert status == 200 and took < 1.0, (status, took)


def _connect(server: Server, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds from now)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        return out, float("inf")
    except ConnectionResetError:
        pass
    return out, time.monotonic() - started


def _json_error(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
    assert b"application/json" in head.lower(), head
    return json.loads(body)


def test_lying_content_length_holds_nothing(server: Server) -> None:
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    held = [
        _connect(server, head + b"[[0.1, 0.2") for _ in range(16)
    ]  # 16 > 2 workers x 4 request threads
    try:
        time.sleep(0.3)
        for _ in range(3):
            _answered_quickly(server)
        bound = HEADER_TIMEOUT + 1000 / MIN_RATE + 1.5
        for sock in held:
            answer, closed = _read_all(sock, bound)
            assert closed < bound, "a stalled body kept its connection past the deadline"
            body = _json_error(answer, 408)
            assert "TORCHBAY_SERVE_BODY_MIN_RATE" in body["message"]
    finally:
        for sock in held:
            sock.close()


def test_connect_only_and_half_header_sockets_hold_nothing(server: Server) -> None:
    silent = [_connect(server) for _ in range(150)]
    half = [
        _connect(server, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Le") for _ in range(150)
    ]
    try:
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT - 0.5:
            _answered_quickly(server)
            time.sleep(0.2)
        bound = HEADER_TIMEOUT + 1.5
        for sock in silent:
            answer, closed = _read_all(sock, bound)
            assert answer == b"" and closed < bound
        for sock in half:
            answer, closed = _read_all(sock, bound)
            assert closed < bound
            assert "TORCHBAY_SERVE_HEADER_TIMEOUT" in _json_error(answer, 408)["message"]
    finally:
        for sock in silent + half:
            sock.close()
    _answered_quickly(server)


def test_idle_keepalive_connection_is_closed(server: Server) -> None:
    sock = _connect(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        answer, closed = _read_all(sock, 6)
        assert answer.startswith(b"HTTP/1.1 200") and closed < 2 + 1.5  # TORCHBAY_SERVE_KEEPALIVE=2
    finally:
        sock.close()


def _zip_bomb(members: int = 2, rows: int = 32 * 1024, columns: int = 1024) -> bytes:
    """An NPZ of valid-shaped zero rows: ~1 MB that inflates to members x rows x columns x 4
    bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for m in range(members):
            with archive.open(f"arr_{m}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "<f4", "fortran_order": False, "shape": (rows, columns)}
                )
                zeros = bytes(columns * 4 * 256)
                for _ in range(rows // 256):
                    member.write(zeros)
    return out.getvalue()


def test_npz_zip_bomb_is_refused_before_inflating(server: Server) -> None:
    bomb = _zip_bomb()
    assert len(bomb) < 2 * 1024 * 1024
    before = _rss(server)
    status, took, body = _timed(
        server, "POST", "/invocations", bomb, {"Content-Type": "application/x-npz"}
    )
    assert status == 413 and took < 2.0, (status, took, body)
    assert "TORCHBAY_SERVE_MAX_DECODED_MB" in json.loads(body)["message"]
    assert _rss(server) - before < RSS_BOUND
    small = io.BytesIO()
    np.savez(small, np.ones((1, 4), dtype=np.float32))
    status, _, _ = _timed(
        server, "POST", "/invocations", small.getvalue(), {"Content-Type": "application/x-npz"}
    )
    assert status == 200


def _png(width: int, height: int) -> bytes:
    """A real black RGB PNG (compressed rows of zeros)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    compressor = zlib.compressobj(9)
    row = bytes(1 + width * 3)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def test_9000x9000_png_is_refused_from_its_header(server: Server) -> None:
    image = _png(9000, 9000)
    assert len(image) < 512 * 1024
    before = _rss(server)
    status, took, body = _timed(
        server, "POST", "/invocations", image, {"Content-Type": "image/png"}
    )
    assert status == 413 and took < 2.0, (status, took, body)
    message = json.loads(body)["message"]
    assert "9000x9000" in message and "TORCHBAY_SERVE_MAX_IMAGE_PIXELS" in message
    assert _rss(server) - before < RSS_BOUND


def test_npy_header_declaring_10_12_elements(server: Server) -> None:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    out.write(bytes(64))
    before = _rss(server)
    status, took, body = _timed(
        server, "POST", "/invocations", out.getvalue(), {"Content-Type": "application/x-npy"}
    )
    assert status == 413 and took < 2.0, (status, took, body)
    assert "TORCHBAY_SERVE_MAX_DECODED_MB" in json.loads(body)["message"]
    assert _rss(server) - before < RSS_BOUND


def test_json_nested_100k_deep(server: Server) -> None:
    deep = b"[" * 100_000 + b"1" + b"]" * 100_000
    before = _rss(server)
    status, took, body = _timed(server, "POST", "/invocations", deep)
    assert status == 400 and took < 2.0, (status, took, body)
    assert "TORCHBAY_SERVE_MAX_JSON_DEPTH" in json.loads(body)["message"]
    assert _rss(server) - before < RSS_BOUND


def test_parser_errors_are_json(server: Server) -> None:
    sock = _connect(server, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert "request line" in _json_error(_read_all(sock, 5)[0], 414)["message"]
    finally:
        sock.close()
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    sock = _connect(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    try:
        assert "headers" in _json_error(_read_all(sock, 5)[0], 431)["message"]
    finally:
        sock.close()
    _answered_quickly(server)


def test_chunked_body_and_expect_continue(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(
            "POST",
            "/invocations",
            body=iter([ROW[:5], ROW[5:]]),
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()
    sock = _connect(
        server,
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(ROW),
    )
    try:
        sock.settimeout(2)
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(ROW)
        answer, _ = _read_all(sock, 5)
        assert b"200 OK" in answer
    finally:
        sock.close()


def test_client_errors_are_one_line_each(server: Server) -> None:
    before = len(server.output().splitlines())
    for _ in range(3):
        assert _timed(server, "POST", "/invocations", b"{not json")[0] == 400
    new = server.log.read_text(errors="replace").splitlines()[before:]
    assert not any("Traceback" in line for line in new)

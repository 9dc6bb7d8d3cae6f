"""A mixed soak against a real ``torchbay serve``: good clients never see an error while hostile
ones
stall, lie, flood and send bombs, and the workers' memory stays flat.

TORCHBAY_SOAK_SECONDS sets the length (default 180, the issue's 3 minutes).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from tests.serving.conftest import Server, Servers, make_mlp
from tests.serving.test_hostile import _png, _zip_bomb

SECONDS = float(os.environ.get("TORCHBAY_SOAK_SECONDS", "180"))
ROW = json.dumps([[0.1, 0.2, 0.3, 0.4]]).encode()


@pytest.fixture
def server(serve: Servers) -> Iterator[Server]:
    make_mlp(serve.root / "model" / "model.pt")
    yield serve(
        env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    )  # default deadlines: 10 s headers, 5 s keep-alive


def _npy_bomb() -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    return out.getvalue() + bytes(64)


def test_mixed_soak(server: Server) -> None:
    stop = threading.Event()
    good = {"ok": 0, "errors": [], "slowest": 0.0}
    hostile = {"sent": 0}
    lock = threading.Lock()

    def good_client(keepalive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        while not stop.is_set():
            try:
                if not keepalive:
                    conn.close()
                sent = time.monotonic()
                conn.request(
                    "POST", "/invocations", body=ROW, headers={"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                body = response.read()
                with lock:
                    good["slowest"] = max(good["slowest"], time.monotonic() - sent)
                    if response.status == 200:
                        good["ok"] += 1
                    else:
                        good["errors"].append((response.status, body[:200]))
            except (OSError, http.client.HTTPException) as err:
                with lock:
                    good["errors"].append(("exception", repr(err)))
                conn.close()
            time.sleep(0.005)
        conn.close()

    bodies = [
        (b"[" * 50_000 + b"]" * 50_000, "application/json"),
        (_npy_bomb(), "application/x-npy"),
        (_zip_bomb(), "application/x-npz"),
        (_png(9000, 9000), "image/png"),
        (b"{nope", "application/json"),
    ]

    def hostile_client() -> None:
        held: list[tuple[float, socket.socket]] = []
        i = 0
        while not stop.is_set():
            i += 1
            try:
                kind = i % 4
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                if kind == 0:  # a body that stalls after 10 bytes
                    sock.sendall(
                        b"POST /invocations HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n[[0.1, 0.2"
                    )
                elif kind == 1:  # half a header
                    sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Le")
                elif kind == 2:  # a bomb or a bad body, then read the answer
                    body, kind_type = bodies[i % len(bodies)]
                    sock.sendall(
                        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"%s\r\nContent-Length: %d"
                        b"\r\nConnection: close\r\n\r\n" % (kind_type.encode(), len(body)) + body
                    )
                    sock.settimeout(10)
                    while sock.recv(65536):
                        pass
                    sock.close()
                    sock = None
                else:  # headers over the limits
                    sock.sendall(
                        b"GET /ping HTTP/1.1\r\n"
                        + b"".join(b"X-%d: %s\r\n" % (n, b"v" * 200) for n in range(150))
                        + b"\r\n"
                    )
                if sock is not None:
                    held.append((time.monotonic(), sock))
                hostile["sent"] += 1
            except OSError:
                pass
            now = time.monotonic()
            for _opened, sock in [h for h in held if now - h[0] > 5]:
                sock.close()
            held = [h for h in held if now - h[0] <= 5]
            time.sleep(0.02)
        for _, sock in held:
            sock.close()

    workers = psutil.Process(server.proc.pid).children()
    pids = sorted(worker.pid for worker in workers)
    threads = [threading.Thread(target=good_client, args=(n % 2 == 0,)) for n in range(4)]
    threads += [threading.Thread(target=hostile_client) for _ in range(2)]
    for thread in threads:
        thread.start()
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < SECONDS:
            time.sleep(2)
            samples.append(
                (time.monotonic() - started, sum(worker.memory_info().rss for worker in workers))
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not good["errors"], (
        len(good["errors"]),
        good["ok"],
        good["errors"][:3],
        server.output()[-3000:],
    )
    print(
        f"soak {SECONDS:g} s: {good['ok']} good requests (slowest {good['slowest']:.2f} s), "
        f"{hostile['sent']} "
        f"hostile, load {os.getloadavg()[0]:.1f}"
    )
    assert good["ok"] > SECONDS * 2 and hostile["sent"] > SECONDS, (good["ok"], hostile["sent"])
    assert (
        sorted(worker.pid for worker in psutil.Process(server.proc.pid).children()) == pids
    )  # none died
    warm = [rss for t, rss in samples if SECONDS * 0.2 <= t < SECONDS * 0.4]
    end = [rss for t, rss in samples if t >= SECONDS * 0.8]
    assert max(end) <= 1.10 * max(warm), (max(warm), max(end))  # RSS flat within 10 %
    log = server.output()
    assert "Traceback" not in log

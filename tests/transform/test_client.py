"""agent/transform/client.py: retries with backoff, dropped connections, a refused endpoint."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from agent.errors import EndpointUnreachable
from agent.transform.client import Endpoint
from tests.conftest import free_port


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: ClassVar[list] = []  # what to do for each request in turn: a status, or "drop"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        action = self.script.pop(0) if self.script else 200
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        body = b'{"message": "busy"}' if action != 200 else b"ok"
        self.send_response(action)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_5xx_and_429_are_retried_with_growing_backoff(server) -> None:
    _Handler.script = [503, 429, 500]
    sleeps: list[float] = []
    endpoint = Endpoint(
        f"http://127.0.0.1:{server.server_port}", max_retries=3, sleep=sleeps.append
    )
    reply = endpoint.request("POST", "/invocations", b"x")
    assert (reply.status, reply.body, reply.attempts, endpoint.retries) == (200, b"ok", 4, 3)
    assert sleeps[0] < sleeps[1] < sleeps[2] and sleeps[0] <= 0.2


def test_retries_run_out_and_4xx_is_not_retried(server) -> None:
    _Handler.script = [503] * 5
    endpoint = Endpoint(
        f"http://127.0.0.1:{server.server_port}", max_retries=2, sleep=lambda s: None
    )
    reply = endpoint.request("POST", "/invocations", b"x")
    assert (reply.status, reply.attempts, reply.reason()) == (503, 3, "busy")
    _Handler.script = [400]
    assert endpoint.request("POST", "/invocations", b"x").attempts == 1


def test_a_dropped_connection_fails_the_request_and_a_refused_one_the_endpoint(server) -> None:
    _Handler.script = ["drop", "drop"]
    endpoint = Endpoint(
        f"http://127.0.0.1:{server.server_port}", max_retries=1, sleep=lambda s: None
    )
    reply = endpoint.request("POST", "/invocations", b"x")
    assert reply.status == 502 and "connection dropped" in reply.reason()
    dead = Endpoint(f"http://127.0.0.1:{free_port()}", max_retries=1, sleep=lambda s: None)
    with pytest.raises(EndpointUnreachable, match="check that the endpoint is up"):
        dead.request("POST", "/invocations", b"x")

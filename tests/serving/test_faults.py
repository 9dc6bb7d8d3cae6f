"""Faulty models against a real ``torchbay serve``: a call that hangs, model code that exits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.serving.conftest import Server, make_mlp

ROW = json.dumps([[0.1, 0.2, 0.3, 0.4]]).encode()
HANG = json.dumps([[777.0, 0.2, 0.3, 0.4]]).encode()

FAULTY = """
import os, sys, time
def predict_fn(data, model):
    first = float(data[0, 0])
    if first == 777:
        time.sleep(3600)
    if first == 103:
        sys.exit(3)
    if first == 104:
        os._exit(4)
    if first == 113:
        os._exit(3)
    return model(data)
"""


def _faulty(serve, root: Path, **env: str) -> Server:
    make_mlp(root / "model" / "model.pt")
    (root / "model" / "code").mkdir(parents=True, exist_ok=True)
    (root / "model" / "code" / "inference.py").write_text(FAULTY)
    return serve(
        env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "TORCHBAY_SERVE_CRASH_WINDOW": "3", **env}
    )


def _row(first: float) -> bytes:
    return json.dumps([[first, 0.2, 0.3, 0.4]]).encode()


def _wait_ping(server: Server, want: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, body = server.request("GET", "/ping", timeout=2)
        except OSError:
            status, body = None, b""
        if status == want:
            return body.decode()
        time.sleep(0.1)
    raise AssertionError(f"/ping never answered {want} within {timeout} s:\n{server.output()}")


def _metric(server: Server, name: str) -> float:
    text = server.request("GET", "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_hung_call_per_worker_is_answered_504_and_the_workers_replaced(
    serve, tmp_path: Path
) -> None:
    server = _faulty(
        serve, tmp_path, SAGEMAKER_MODEL_SERVER_TIMEOUT="1", TORCHBAY_SERVE_STUCK_TIMEOUT="3"
    )
    answers: list[tuple[int, float]] = []

    def hang() -> None:
        started = time.monotonic()
        status = server.post(HANG, timeout=10)[0]
        answers.append((status, time.monotonic() - started))

    threads = [
        threading.Thread(target=hang) for _ in range(2)
    ]  # one per worker (connections are balanced)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert [status for status, _ in answers] == [504, 504] and all(
        took < 3 for _, took in answers
    ), answers
    reason = _wait_ping(server, 503, 6)
    assert "stuck" in reason and "worker" in reason, reason
    _wait_ping(server, 200, 30)
    assert server.post(ROW, timeout=5)[0] == 200
    assert _metric(server, "torchbay_serve_timeouts_total") >= 2
    assert _metric(server, 'torchbay_serve_worker_replacements_total{reason="stuck"}') >= 1
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    "first", [103.0, 104.0, 113.0], ids=["sys.exit(3)", "os._exit(4)", "os._exit(3)"]
)
def test_model_code_that_exits_does_not_stop_the_server(
    serve, tmp_path: Path, first: float
) -> None:
    server = _faulty(serve, tmp_path)
    for _ in range(2):  # twice: both workers may take one
        try:
            status = server.post(_row(first), timeout=10)[0]
        except (ConnectionError, OSError):
            status = None  # the worker died under the request: the connection is cut
        assert status in (500, None)
        if first == 103.0:
            assert status == 500
    if first != 103.0:  # a worker died: /ping says so until the crash window is over
        assert "died unexpectedly" in _wait_ping(server, 503, 3)
    _wait_ping(server, 200, 30)
    assert server.post(ROW, timeout=5)[0] == 200
    assert server.proc.poll() is None, server.output()

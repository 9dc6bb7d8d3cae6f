"""Dynamic batching: each caller gets its own rows, a lone request waits for nothing."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from agent.serving.batching import Runner
from tests.serving.conftest import make_mlp


def _rowwise(batches: list) -> Runner:
    def run_one(data):
        batches.append(1)
        return [row * 10 for row in data]

    def run_batch(items):
        batches.append(len(items))
        joined = [row for item in items for row in item]
        out = [row * 10 for row in joined]
        result, start = [], 0
        for item in items:
            result.append(out[start:start + len(item)])
            start += len(item)
        return result

    return Runner(run_one, run_batch, max_batch=8, max_delay=0.5)


def test_concurrent_callers_are_batched_and_get_their_own_rows() -> None:
    batches: list = []
    runner = _rowwise(batches)
    runner.start()
    barrier = threading.Barrier(8)

    def caller(i: int):
        rows = [i * 100 + r for r in range(i % 3 + 1)]  # callers send 1 to 3 rows
        with runner.arriving():
            barrier.wait()
            time.sleep(0.01 * (i % 2))
            future = runner.submit(rows, key="same-shape")
        return rows, future.result(30)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(caller, range(8)))
    runner.stop()
    for rows, got in results:
        assert got == [row * 10 for row in rows]
    assert max(batches) > 1 and sum(batches) == 8


def test_a_lone_request_is_not_delayed() -> None:
    batches: list = []
    runner = _rowwise(batches)  # max_delay 0.5 s
    runner.start()
    started = time.monotonic()
    for i in range(5):
        with runner.arriving():
            future = runner.submit([i], key="k")
        assert future.result(30) == [i * 10]
    runner.stop()
    assert time.monotonic() - started < 2.0  # 5 x 0.5 s if it had waited
    assert batches == [1] * 5


def test_unsplittable_or_failing_batches_fall_back_to_one_by_one() -> None:
    calls: list = []

    def run_one(data):
        calls.append(data)
        if data == "bad":
            raise ValueError("bad input")
        return data.upper()

    runner = Runner(run_one, lambda items: None, max_batch=4, max_delay=0.2)
    runner.start()
    with runner.arriving(), runner.arriving():
        good, bad = runner.submit("good", key=1), runner.submit("bad", key=1)
    assert good.result(30) == "GOOD"
    try:
        bad.result(30)
        raise AssertionError("the bad input should have failed")
    except ValueError:
        pass
    runner.stop()


def test_server_batches_concurrent_requests(serve, tmp_path: Path) -> None:
    import torch

    make_mlp(tmp_path / "model" / "model.pt")
    model = torch.jit.load(str(tmp_path / "model" / "model.pt"))
    server = serve(env={"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "TORCHBAY_SERVE_BATCH_SIZE": "8",
                        "TORCHBAY_SERVE_BATCH_DELAY_MS": "50", "TORCHBAY_SERVE_HTTP_THREADS": "16"})
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(i % 3 + 1, 4)).astype(np.float32) for i in range(48)]

    def call(rows: np.ndarray):
        status, _, body = server.post(json.dumps(rows.tolist()).encode())
        assert status == 200, body
        return np.asarray(json.loads(body), dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(call, inputs))
    for rows, got in zip(inputs, outputs):
        with torch.no_grad():
            want = model(torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    metrics = server.request("GET", "/metrics")[2].decode()
    count = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("torchbay_serve_batch_size_count")))
    assert count < 48, "no request was batched with another"

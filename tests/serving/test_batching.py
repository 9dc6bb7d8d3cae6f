"""Dynamic batching: each caller gets its own rows, a lone request waits for nothing."""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

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
            result.append(out[start : start + len(item)])
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


def _closed_loop(runner: Runner, clients: int, rounds: int) -> None:
    """``clients`` threads that each send a request, wait for it, and send the next after a short
    round trip (started a few ms apart, which used to split them into groups that alternate in
    small batches)."""

    def client(i: int) -> None:
        time.sleep(0.007 * i)
        rnd = random.Random(i)
        for n in range(rounds):
            with runner.arriving():
                time.sleep(0.001)  # decoding
                future = runner.submit([i, n], key="same-shape")
            assert future.result(30) == [i * 10, n * 10]
            time.sleep(
                rnd.uniform(0, 0.004)
            )  # the response's way back and the next request's way in

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def _slow_rowwise(sizes: list, max_batch: int, max_delay: float) -> Runner:
    def run_batch(items):
        time.sleep(0.03)  # a forward() that takes a while, as a CNN's does
        return [[value * 10 for value in item] for item in items]

    return Runner(
        lambda item: run_batch([item])[0],
        run_batch,
        max_batch=max_batch,
        max_delay=max_delay,
        on_batch=sizes.append,
    )


@pytest.mark.parametrize("clients, max_batch", [(16, 8), (6, 8)])
def test_closed_loop_clients_form_large_batches(clients: int, max_batch: int) -> None:
    sizes: list = []
    runner = _slow_rowwise(sizes, max_batch, max_delay=0.5)
    runner.start()
    _closed_loop(runner, clients, rounds=10)
    runner.stop()
    assert sum(sizes) == clients * 10
    full = min(clients, max_batch)
    # generous: waiting for the clients that come straight back gives ~0.9 of full (6 clients: 5.3,
    # where
    # starting a batch as soon as anything waits gave 2.9, a third of them single requests)
    assert statistics.mean(sizes) >= 0.6 * full, sizes


def test_a_lone_request_after_a_burst_is_not_delayed() -> None:
    sizes: list = []
    runner = _slow_rowwise(sizes, max_batch=8, max_delay=2.0)
    runner.start()
    _closed_loop(runner, 8, rounds=4)
    time.sleep(2.2)  # a quiet spell longer than the delay: the next request is alone
    for n in range(3):
        started = time.monotonic()
        with runner.arriving():
            future = runner.submit([n], key="same-shape")
        assert future.result(30) == [n * 10]
        assert time.monotonic() - started < 1.5, (
            "a lone request waited for a batch"
        )  # 2 s if it had
    runner.stop()
    assert sizes[-3:] == [1, 1, 1]


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
    model = torch.export.load(open(tmp_path / "model" / "model.pt", "rb")).module()
    server = serve(
        env={
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
            "TORCHBAY_SERVE_BATCH_SIZE": "8",
            "TORCHBAY_SERVE_BATCH_DELAY_MS": "50",
            "TORCHBAY_SERVE_HTTP_THREADS": "16",
        }
    )
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(i % 3 + 1, 4)).astype(np.float32) for i in range(48)]

    def call(rows: np.ndarray):
        status, _, body = server.post(json.dumps(rows.tolist()).encode())
        assert status == 200, body
        return np.asarray(json.loads(body), dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(call, inputs))
    for rows, got in zip(inputs, outputs, strict=False):
        with torch.no_grad():
            want = model(torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    metrics = server.request("GET", "/metrics")[2].decode()
    count = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("torchbay_serve_batch_size_count")
        )
    )
    assert count < 48, "no request was batched with another"


SLOW_PREDICT = """
import time
def predict_fn(data, model):
    time.sleep(0.05)  # a forward() that takes a while, as a CNN's does
    return model(data)
"""


def _batch_stats(server) -> tuple[float, float]:
    metrics = server.request("GET", "/metrics")[2].decode()
    values = {
        line.split()[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("torchbay_serve_batch_size_")
    }
    return values["torchbay_serve_batch_size_count"], values["torchbay_serve_batch_size_sum"]


def test_server_forms_large_batches_at_twice_the_batch_size_and_runs_a_lone_request_at_once(
    serve, tmp_path: Path
) -> None:
    make_mlp(tmp_path / "model" / "model.pt")
    (tmp_path / "model" / "code").mkdir()
    (tmp_path / "model" / "code" / "inference.py").write_text(SLOW_PREDICT)
    server = serve(
        env={
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
            "TORCHBAY_SERVE_BATCH_SIZE": "4",
            "TORCHBAY_SERVE_BATCH_DELAY_MS": "3000",
            "TORCHBAY_SERVE_HTTP_THREADS": "16",
        }
    )
    row = json.dumps([[0.1, 0.2, 0.3, 0.4]]).encode()
    for _ in range(
        3
    ):  # concurrency 1: each request runs at once (3 s each if it waited for a batch)
        started = time.monotonic()
        status, _, body = server.post(row)
        assert status == 200, body
        assert time.monotonic() - started < 2.0, "a lone request waited for a batch"
    count0, total0 = _batch_stats(server)

    def client(i: int) -> None:
        for _ in range(8):
            status, _, body = server.post(row)
            assert status == 200, body

    with ThreadPoolExecutor(8) as pool:  # concurrency 8, twice the batch size, closed loop
        list(pool.map(client, range(8)))
    count, total = _batch_stats(server)
    assert total - total0 == 64
    mean = (total - total0) / (count - count0)
    assert mean >= 2.5, f"mean batch {mean:.2f} of at most 4"  # generous: full batches give ~4


_OPENMP_PROBE = """
import ctypes, json, sys
import torch

sys.path.insert(0, sys.argv[1])
from agent.serving.batching import Runner, set_torch_threads

torch.set_num_threads(1)  # as the master and each worker's main thread do
torch.mm(torch.rand(64, 64), torch.rand(64, 64))  # OpenMP is loaded by now
gomp = [line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line]
if not gomp:
    print(json.dumps(None))  # torch built without GNU OpenMP: nothing to check
    sys.exit(0)
openmp = ctypes.CDLL(gomp[0])


def run_one(_):
    return openmp.omp_get_max_threads()  # the team the thread's next parallel region gets


counts = {}
for name, init in (("fixed", lambda: set_torch_threads(1)), ("bare", None)):
    runner = Runner(run_one, thread_init=init)
    runner.start()
    counts[name] = runner.call(None, None, 60)
    runner.stop()
print(json.dumps(counts))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="OpenMP's default team is 1 thread")
def test_inference_thread_runs_the_model_on_the_workers_torch_threads() -> None:
    """torch.set_num_threads holds for the calling thread only: a thread started later ran the
    model with OpenMP's default team (one thread per core), and on a loaded 2-core machine that
    cost 6x the CPU per MLP forward() and the server 5x its throughput. The runner's thread_init
    (set_torch_threads) gives the inference thread the worker's count; the bare runner shows the
    probe can tell (its thread would get a team of one per core)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _OPENMP_PROBE, str(Path(__file__).resolve().parents[2])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    if counts is None:
        pytest.skip("torch is not built with GNU OpenMP here")
    assert counts["fixed"] == 1, counts  # the worker's torch thread count (1 here)
    assert counts["bare"] == len(os.sched_getaffinity(0)), counts  # the bug the fix removes

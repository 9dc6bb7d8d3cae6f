"""Loading a TorchScript model and a warm-up forward() before fork keep working in the children (torch 2.13)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from tests.serving.conftest import make_mlp


def _child(path: str, queue) -> None:
    import torch

    torch.set_num_threads(2)  # more threads than the parent used: a fresh pool after the fork
    model = _MODEL["m"]
    with torch.inference_mode():
        out = model(torch.ones(64, 4))
    queue.put((os.getpid(), out.sum().item()))


_MODEL: dict = {}


def test_load_and_warm_up_before_fork(tmp_path: Path) -> None:
    import torch

    make_mlp(tmp_path / "model.pt")
    torch.set_num_threads(1)
    model = torch.jit.load(str(tmp_path / "model.pt")).eval()
    with torch.inference_mode():
        for _ in range(3):  # the profiling executor optimises during the first calls
            want = model(torch.ones(64, 4)).sum().item()
    _MODEL["m"] = model
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert all(abs(value - want) < 1e-4 for _, value in results)

"""Loading a model (each format) and a warm-up forward() before fork keep working in the children
(torch 2.13).

The parent is a fresh interpreter, as the serve master is: the pytest process has run other tests
whose
OpenMP pools would not survive a fork, which says nothing about the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.serving.conftest import make_mlp

_SCRIPT = r"""
import multiprocessing, os, sys
import torch
from pathlib import Path
from agent.serving.formats import detect_format, load_model_file

def child(queue):
    torch.set_num_threads(2)  # more threads than the parent used: a fresh pool after the fork
    with torch.inference_mode():
        out = MODEL(torch.ones(64, 4))
    queue.put((os.getpid(), out.sum().item()))

torch.set_num_threads(1)  # what the serve master does before the fork
MODEL = load_model_file(Path(sys.argv[1]), detect_format(Path(sys.argv[1])), "cpu").model
with torch.inference_mode():
    for _ in range(3):  # the profiling executor optimises during the first calls
        want = MODEL(torch.ones(64, 4)).sum().item()
ctx = multiprocessing.get_context("fork")
queue = ctx.Queue()
children = [ctx.Process(target=child, args=(queue,)) for _ in range(2)]
for c in children:
    c.start()
results = [queue.get(timeout=120) for _ in children]
for c in children:
    c.join(60)
    assert c.exitcode == 0, c.exitcode
assert all(abs(value - want) < 1e-4 for _, value in results), (results, want)
assert len({pid for pid, _ in results}) == 2
print("FORK_OK", want)
"""


def _run(model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(model)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FORK_OK" in proc.stdout


def test_torchscript_load_and_warm_up_before_fork(tmp_path: Path) -> None:
    # TorchScript is deprecated but still served (models saved before torch.export): its profiling
    # executor
    # must keep working in forked workers.
    make_mlp(tmp_path / "model.pt", fmt="torchscript")
    _run(tmp_path / "model.pt")


@pytest.mark.timeout(900)  # `exported_mlp` may compile an AOTInductor package first
@pytest.mark.parametrize("name", ["model.pt2", "model.aoti.pt2"])
def test_export_and_aoti_load_and_warm_up_before_fork(exported_mlp: Path, name: str) -> None:
    _run(exported_mlp / name)

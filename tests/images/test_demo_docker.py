"""``scripts/demo --docker IMAGE``: the demo's train and serve steps through ``docker run`` of the
CPU images the session built (a short run: 1 epoch, 128 images)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.images.conftest import TAG, Engine

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_demo_trains_and_serves_with_docker_run(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    proc = subprocess.run(
        [
            str(REPO / "scripts" / "demo"),
            "--docker",
            TAG,
            "--epochs",
            "1",
            "--images",
            "128",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(REPO),
        env=dict(os.environ, DOCKER=engine.cli),
        check=False,
    )
    told = f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, told
    assert "demo: done in" in proc.stdout and "generated images" in proc.stdout, told
    train_log = (out / "logs" / "train.log").read_text()
    # In the container: the agent's root is the image's /opt/ml (a local run would name the host
    # folder).
    assert "root /opt/ml" in train_log and "rank 0/2" in train_log and "rank 1/2" in train_log, (
        train_log[-3000:]
    )
    assert (out / "ml" / "model" / "model.pt2").read_bytes()[
        :2
    ] == b"PK"  # the generator as torch.export
    assert list((out / "ml" / "output" / "data" / "samples").glob("*.png")), "no sample grid"
    images = np.load(out / "generated" / "images.npy", allow_pickle=False)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert "serving on CPU" in (out / "logs" / "serve.log").read_text()
    left = engine("ps", "-aq", "--filter", "name=torchbay-demo-").stdout.split()
    assert not left, f"the demo left containers behind: {left}"

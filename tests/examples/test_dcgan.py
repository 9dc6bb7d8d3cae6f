"""The DCGAN example run as a user would: 2 processes under torchrun (DDP over Gloo), then its
outputs."""

from __future__ import annotations

import builtins
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DCGAN = Path(__file__).resolve().parents[2] / "examples" / "dcgan"


def _module(name: str):
    sys.path.insert(0, str(DCGAN))
    try:
        spec = importlib.util.spec_from_file_location(f"dcgan_{name}", DCGAN / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(DCGAN))


@pytest.mark.slow
def test_two_process_ddp_run_writes_model_grids_and_tensorboard(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, str(DCGAN / "make_data.py"), str(data), "--count", "128", "--shards", "2"],
        check=True,
        timeout=120,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(DCGAN / "train.py"),
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--ngf",
            "8",
            "--ndf",
            "8",
            "--batch-size",
            "16",
            "--data-dir",
            str(data),
            "--model-dir",
            str(tmp_path / "model"),
            "--output-data-dir",
            str(tmp_path / "out"),
            "--tensorboard-dir",
            str(tmp_path / "tb"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1/2" in proc.stderr and "loss_D=" in proc.stderr
    grids = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["fake_samples_epoch_001.png", "fake_samples_epoch_002.png"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "model" / "code" / "inference.py").is_file()
    generator = torch.export.load(str(tmp_path / "model" / "model.pt2")).module()
    with torch.no_grad():
        images = generator(torch.randn(4, 100, 1, 1))
    assert images.shape == (4, 3, 32, 32) and float(images.abs().max()) <= 1.0
    # The serving hooks turn that output into uint8 images.
    inference = _module("inference")
    noise = inference.input_fn('{"count": 2, "seed": 3}', "application/json")
    with torch.no_grad():
        body, content_type = inference.output_fn(generator(noise), "application/x-npy")
    import io

    pixels = np.load(io.BytesIO(body))
    assert (
        content_type == "application/x-npy"
        and pixels.shape == (2, 32, 32, 3)
        and pixels.dtype == np.uint8
    )


def test_grid_without_torchvision_or_pillow_is_a_valid_png(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    train = _module("train")
    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name.startswith(("torchvision", "PIL")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    path = tmp_path / "grid.png"
    train.save_grid(torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4), str(path), nrow=4)
    monkeypatch.undo()
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (4 * 6 + 2, 2 * 6 + 2) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (0, 0, 0)  # the border
        assert (
            image.getpixel((2, 2))[0] == 0 and image.getpixel((2, 2 + 6))[0] > 200
        )  # images 1 and 5

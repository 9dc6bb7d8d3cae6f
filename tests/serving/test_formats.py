"""Every model format through a real server: AOTInductor, torch.export, TorchScript and an eager
model_fn.

Predictions are checked against the eager forward() of the same weights with an absolute tolerance
of
1e-5 (float32; AOTInductor's fused kernels may reorder sums).
"""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelLoadError
from agent.serving.formats import (
    AOTI,
    EXPORT,
    TORCHSCRIPT,
    BatchRange,
    choose_model_file,
    detect_format,
    load_model_file,
)
from tests.serving.conftest import make_mlp, mlp_forward

TOLERANCE = 1e-5
# The first test to use `exported_mlp` compiles an AOTInductor package (up to minutes on 2 loaded
# cores).
pytestmark = pytest.mark.timeout(900)
EAGER_HOOKS = """
import torch

def model_fn(model_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.train()  # the server puts it in eval mode
    return model
"""


def _model_dir(root: Path, exported: Path, fmt: str) -> None:
    model = root / "model"
    model.mkdir(parents=True, exist_ok=True)
    if fmt == AOTI:
        shutil.copy(exported / "model.aoti.pt2", model / "model.aoti.pt2")
    elif fmt == EXPORT:
        shutil.copy(exported / "model.pt2", model / "model.pt2")
    elif fmt == TORCHSCRIPT:  # deprecated but still served: checks the legacy format keeps working
        make_mlp(model / "model.pt", fmt="torchscript")
    else:
        (model / "code").mkdir()
        (model / "code" / "inference.py").write_text(EAGER_HOOKS)


def _predict_concurrently(server, count: int = 32) -> None:
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(i % 3 + 1, 4)).astype(np.float32) for i in range(count)]

    def call(rows: np.ndarray) -> np.ndarray:
        status, _, body = server.post(json.dumps(rows.tolist()).encode())
        assert status == 200, body
        return np.asarray(json.loads(body), dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(call, inputs))
    for rows, out in zip(inputs, outputs, strict=False):
        np.testing.assert_allclose(out, mlp_forward(rows), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("batch", ["1", "8"])
@pytest.mark.parametrize("fmt", [AOTI, EXPORT, TORCHSCRIPT, "eager"])
def test_each_format_served_equal_to_eager(
    serve, tmp_path: Path, exported_mlp: Path, fmt: str, batch: str
) -> None:
    _model_dir(tmp_path, exported_mlp, fmt)
    server = serve(
        env={
            "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
            "TORCHBAY_SERVE_BATCH_SIZE": batch,
            "TORCHBAY_SERVE_BATCH_DELAY_MS": "20",
        }
    )
    _predict_concurrently(server)
    status, _, body = server.post(json.dumps([[1.0, 2.0, 3.0]]).encode())  # 3 features, not 4
    assert status == 400 and "the model rejected the input" in json.loads(body)["message"]
    assert server.post(json.dumps([[0.0] * 4]).encode())[0] == 200  # the worker lives on
    log = server.output()
    if fmt != "eager":
        assert {
            "aoti": "AOTInductor package",
            "export": "torch.export program",
            "torchscript": "TorchScript model",
        }[fmt] in log
    if fmt in (AOTI, EXPORT):
        assert "dynamic batch 1..64" in log and "warm-up: " in log
    metrics = server.request("GET", "/metrics")[2].decode()
    calls = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("torchbay_serve_batch_size_count")
    )
    assert (
        calls == 34 if batch == "1" else calls < 34
    )  # 34 requests: joined into fewer calls when batching


def test_static_batch_of_one_under_batching_runs_request_by_request(serve, tmp_path: Path) -> None:
    import torch

    from tests.serving.conftest import mlp

    (tmp_path / "model").mkdir()
    program = torch.export.export(
        mlp(), (torch.zeros(1, 4),)
    )  # no dynamic_shapes: batch fixed at 1
    torch.export.save(program, str(tmp_path / "model" / "model.pt2"))
    server = serve(
        env={
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
            "TORCHBAY_SERVE_BATCH_SIZE": "8",
            "TORCHBAY_SERVE_BATCH_DELAY_MS": "50",
        }
    )
    rows = np.random.default_rng(2).normal(size=(24, 1, 4)).astype(np.float32)

    def call(row: np.ndarray) -> np.ndarray:
        status, _, body = server.post(json.dumps(row.tolist()).encode())
        assert status == 200, body
        return np.asarray(json.loads(body), dtype=np.float32)

    with ThreadPoolExecutor(12) as pool:
        outputs = list(pool.map(call, rows))
    for row, out in zip(rows, outputs, strict=False):
        np.testing.assert_allclose(out, mlp_forward(row), atol=TOLERANCE, rtol=0)
    status, _, body = server.post(
        json.dumps([[0.0] * 4, [1.0] * 4]).encode()
    )  # two rows: the program takes one
    assert status == 400 and "rejected the input" in json.loads(body)["message"]
    log = server.output()
    assert "static batch of 1 only: dynamic batching (batch size 8) is off" in log
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'torchbay_serve_batch_size_bucket{le="1.0"} 25.0' in metrics  # every call a batch of one


def test_batch_beyond_the_declared_maximum_runs_request_by_request(
    tmp_path: Path, exported_mlp: Path
) -> None:
    import torch

    from agent.serving.model import ModelHandler

    _model_dir(tmp_path, exported_mlp, EXPORT)
    handler = ModelHandler(
        tmp_path / "model",
        tmp_path / "model" / "code",
        "inference.py",
        default_accept="application/json",
        batch_size=8,
    )
    handler.load()
    assert handler.batch == BatchRange(1, 64) and handler.batchable
    inputs = [torch.randn(40, 4), torch.randn(40, 4)]  # 80 rows joined: over the program's 64
    outputs = handler.predict_batch(inputs)
    assert outputs is not None and [tuple(o.shape) for o in outputs] == [(40, 3), (40, 3)]
    for item, out in zip(inputs, outputs, strict=False):
        np.testing.assert_allclose(out.numpy(), mlp_forward(item.numpy()), atol=TOLERANCE, rtol=0)


def test_format_is_read_from_the_contents_not_the_name(tmp_path: Path, exported_mlp: Path) -> None:
    shutil.copy(exported_mlp / "model.aoti.pt2", tmp_path / "a.pt")
    shutil.copy(exported_mlp / "model.pt2", tmp_path / "b.pth")
    make_mlp(tmp_path / "c.pt2", fmt="torchscript")
    assert [detect_format(tmp_path / n) for n in ("a.pt", "b.pth", "c.pt2")] == [
        AOTI,
        EXPORT,
        TORCHSCRIPT,
    ]


def test_corrupt_and_foreign_files_say_what_to_do(
    serve, tmp_path: Path, exported_mlp: Path
) -> None:
    import torch

    data = (exported_mlp / "model.pt2").read_bytes()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.pt2").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(ModelLoadError, match="is not a model archive .* copy it again"):
        choose_model_file(tmp_path / "model")
    server = serve(wait=False)
    assert server.proc.wait(120) == 3
    assert "model.pt2 is not a model archive" in server.output() and server.ping() is None
    torch.save({"weight": torch.zeros(2)}, str(tmp_path / "weights.pt"))
    with pytest.raises(ModelLoadError, match="is a torch.save file .* export the module"):
        detect_format(tmp_path / "weights.pt")
    damaged = tmp_path / "damaged.pt2"  # a valid zip whose program JSON is garbage
    with zipfile.ZipFile(exported_mlp / "model.pt2") as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            dst.writestr(
                item,
                b"{not json" if item.filename.endswith("models/model.json") else src.read(item),
            )
    with pytest.raises(ModelLoadError, match="looks like a torch.export program but does not load"):
        load_model_file(damaged, detect_format(damaged), "cpu")


def _claim_device(package: Path, out: Path, device: str) -> None:
    """A copy of the AOTI package whose metadata says it was compiled for ``device`` (no GPU
    compiler here)."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_metadata.json"):
                meta = json.loads(data)
                meta["AOTI_DEVICE_KEY"] = device
                data = json.dumps(meta).encode()
            dst.writestr(item, data)


def test_aoti_package_for_another_device_fails_at_load_naming_both(
    serve, tmp_path: Path, exported_mlp: Path
) -> None:
    (tmp_path / "model").mkdir()
    _claim_device(exported_mlp / "model.aoti.pt2", tmp_path / "model" / "model.aoti.pt2", "cuda")
    server = serve(wait=False)
    assert server.proc.wait(120) == 3
    assert "compiled for cuda, but this server runs on cpu (no GPU found)" in server.output()
    with pytest.raises(ModelLoadError, match="compiled for cpu, but this server runs on cuda:0"):
        load_model_file(exported_mlp / "model.aoti.pt2", AOTI, "cuda:0")


def test_two_candidates_default_and_setting(serve, tmp_path: Path, exported_mlp: Path) -> None:
    model = tmp_path / "model"
    _model_dir(tmp_path, exported_mlp, AOTI)
    _model_dir(tmp_path, exported_mlp, EXPORT)
    make_mlp(model / "model.pt", fmt="torchscript")
    assert choose_model_file(model) == (model / "model.aoti.pt2", AOTI)
    assert choose_model_file(model, "export") == (model / "model.pt2", EXPORT)
    assert choose_model_file(model, "model.pt") == (model / "model.pt", TORCHSCRIPT)
    with pytest.raises(ModelLoadError, match="no such file .* model.aoti.pt2, model.pt, model.pt2"):
        choose_model_file(model, "missing.pt2")
    make_mlp(model / "other.pt", fmt="torchscript")
    make_mlp(model / "other2.pt", fmt="torchscript")
    (model / "model.pt").unlink()
    with pytest.raises(
        ModelLoadError, match="several TorchScript models .* TORCHBAY_SERVE_MODEL_FILE"
    ):
        choose_model_file(model, "torchscript")
    server = serve(
        env={"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "TORCHBAY_SERVE_MODEL_FILE": "export"}
    )
    _predict_concurrently(server, 4)
    assert "serving model.pt2 (export" in server.output()


def test_torchbay_export_command_writes_a_servable_program(tmp_path: Path) -> None:
    import torch

    from agent.cli import main

    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, "
        "3))\n"
    )
    assert (
        main(
            [
                "export",
                f"{tmp_path / 'net.py'}:build",
                "--example-shape",
                "1,4",
                "--max-batch",
                "16",
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    loaded = load_model_file(tmp_path / "model" / "model.pt2", EXPORT, "cpu")
    assert loaded.batch == BatchRange(1, 16)
    rows = np.ones((5, 4), dtype=np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(
            loaded.model(torch.from_numpy(rows)).numpy(), mlp_forward(rows), atol=TOLERANCE
        )
    assert main(["export", f"{tmp_path / 'net.py'}:nothing", "--example-shape", "1,4"]) == 65
    assert main(["export", f"{tmp_path / 'net.py'}:build", "--example-shape", "1,x"]) == 65


def test_compile_setting_compiles_before_the_fork(
    serve, tmp_path: Path, exported_mlp: Path
) -> None:
    _model_dir(tmp_path, exported_mlp, EXPORT)
    with warnings.catch_warnings():
        server = serve(
            env={
                "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
                "TORCHBAY_SERVE_COMPILE": "true",
                "TORCHBAY_SERVE_BATCH_SIZE": "4",
            }
        )
    _predict_concurrently(server, 8)
    log = server.output()
    assert "compiling the torch.export program with torch.compile" in log
    assert "compile and warm-up: 2 forward()" in log

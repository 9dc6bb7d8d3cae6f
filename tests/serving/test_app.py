"""Every endpoint, content type and error status of a real server (gunicorn, real HTTP)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.serving.conftest import as_json, make_mlp

ROWS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    import torch

    path = Path("/tmp") / f"torchbay-expected-{id(object())}.pt"
    make_mlp(path)
    model = torch.export.load(open(path, "rb")).module()
    path.unlink()
    with torch.no_grad():
        return model(torch.tensor(ROWS, dtype=torch.float32)).numpy()


@pytest.fixture(scope="module")
def server(serve_module):
    make_mlp(serve_module.root / "model" / "model.pt")
    return serve_module(
        env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}
    )


def test_ping_execution_parameters_and_metrics(server) -> None:
    status, _headers, body = server.request("GET", "/ping")
    assert status == 200 and as_json(body) == {"status": "Healthy"}
    status, _, body = server.request("GET", "/execution-parameters")
    assert status == 200
    assert as_json(body) == {
        "MaxConcurrentTransforms": 2 * 4,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 1,
    }
    before = _metrics(server)
    for _ in range(6):  # spread over both workers by the kernel; the counts must add up
        assert server.post(json.dumps(ROWS).encode())[0] == 200
    assert server.post(b"not json")[0] == 400
    after = _metrics(server)
    assert (
        after['torchbay_serve_requests_total{code="200",endpoint="invocations"}']
        - before.get('torchbay_serve_requests_total{code="200",endpoint="invocations"}', 0)
        == 6
    )
    assert (
        after['torchbay_serve_requests_total{code="400",endpoint="invocations"}']
        - before.get('torchbay_serve_requests_total{code="400",endpoint="invocations"}', 0)
        == 1
    )
    assert (
        after['torchbay_serve_request_duration_seconds_count{endpoint="invocations"}']
        - before.get('torchbay_serve_request_duration_seconds_count{endpoint="invocations"}', 0)
        == 7
    )
    assert (
        after["torchbay_serve_batch_size_count"] - before.get("torchbay_serve_batch_size_count", 0)
        == 6
    )
    assert after["torchbay_serve_workers_ready"] == 2


def _metrics(server) -> dict[str, float]:
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/csv", "application/x-npy", "application/x-npz"]
)
@pytest.mark.parametrize("accept", ["application/json", "text/csv", "application/x-npy"])
def test_each_content_type_both_ways(server, expected, content_type: str, accept: str) -> None:
    rows = np.asarray(ROWS, dtype=np.float32)
    body = {
        "application/json": json.dumps(ROWS).encode(),
        "text/csv": b"0.1,0.2,0.3,0.4\n1.0,-1.0,0.5,2.0\n",
        "application/x-npy": _npy(rows),
        "application/x-npz": _npz(x=rows),
    }[content_type]
    status, headers, out = server.post(body, content_type, accept)
    assert status == 200, out
    assert headers["content-type"] == accept
    if accept == "application/json":
        got = np.asarray(json.loads(out))
    elif accept == "text/csv":
        got = np.loadtxt(io.StringIO(out.decode()), delimiter=",", ndmin=2)
    else:
        got = np.load(io.BytesIO(out), allow_pickle=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


class _ChannelMean:
    """An exported model of images: (N, 3, H, W) -> the mean of each channel, (N, 3)."""

    @staticmethod
    def save(path: Path) -> None:
        import torch

        class Mean(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x.mean(dim=(2, 3))

        dims = {
            0: torch.export.Dim("n", min=1),
            2: torch.export.Dim("h", min=2),
            3: torch.export.Dim("w", min=2),
        }
        program = torch.export.export(Mean(), (torch.zeros(2, 3, 5, 6),), dynamic_shapes=(dims,))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))


def test_image_in(serve, tmp_path: Path) -> None:
    from PIL import Image

    _ChannelMean.save(tmp_path / "model" / "model.pt2")
    server = serve(env={"SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
    out = io.BytesIO()
    Image.new("RGB", (4, 2), (255, 0, 0)).save(out, format="PNG")
    status, _, body = server.post(out.getvalue(), "image/png")
    # a 1x3x2x4 float image in 0..1 reaches the model
    assert status == 200, body
    np.testing.assert_allclose(np.asarray(json.loads(body)), [[1.0, 0.0, 0.0]], atol=1e-6)


def test_accept_q_values_and_default(server) -> None:
    body = json.dumps(ROWS).encode()
    assert (
        server.post(body, accept="text/csv;q=0.5, application/x-npy")[1]["content-type"]
        == "application/x-npy"
    )
    assert (
        server.post(body, accept="application/x-npy;q=0.1, text/csv;q=0.9")[1]["content-type"]
        == "text/csv"
    )
    assert server.post(body, accept="*/*")[1]["content-type"] == "application/json"
    assert server.post(body)[1]["content-type"] == "application/json"
    assert server.post(body, accept="text/*")[1]["content-type"] == "text/csv"


def _reason(body: bytes, status: int) -> str:
    data = as_json(body)
    assert data["code"] == status and data["message"], data
    assert "Traceback" not in data["message"]
    return data["message"]


def test_error_statuses(server) -> None:
    rows = json.dumps(ROWS).encode()
    status, _, body = server.post(rows, "text/xml")
    assert status == 415 and "text/xml" in _reason(body, 415)
    status, _, body = server.post(rows, accept="application/xml")
    assert status == 406 and "application/xml" in _reason(body, 406)
    status, _, body = server.post(b"x" * (1024 * 1024 + 1))
    assert status == 413 and "SAGEMAKER_MAX_PAYLOAD_IN_MB" in _reason(body, 413)
    status, _, body = server.post(b"[[1, 2,")
    assert status == 400 and "JSON" in _reason(body, 400)
    status, _, body = server.post(b"[[1, 2], [3]]")
    assert status == 400 and "rectangular" in _reason(body, 400)
    status, _, body = server.post(
        json.dumps([[1.0, 2.0]]).encode()
    )  # 2 features, the model takes 4
    assert status == 400 and "shape" in _reason(body, 400)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    status, _, body = server.post(pickled.getvalue(), "application/x-npy")
    assert status == 400 and "unpickling" in _reason(body, 400)
    status, _, body = server.request("GET", "/nowhere")
    assert status == 404 and _reason(body, 404)
    status, _, body = server.request("GET", "/invocations")
    assert status == 405 and _reason(body, 405)
    # none of that hurt the workers
    assert server.post(rows)[0] == 200 and server.ping() == 200

"""Multi-model mode on a real gunicorn: the SageMaker /models contract, in-flight unloads, the
budget, LRU."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

from tests.serving.conftest import as_json, make_mlp

ROW = json.dumps([[0.1, 0.2, 0.3, 0.4]]).encode()
SLOW = json.dumps([[777.0, 0.2, 0.3, 0.4]]).encode()
HOOKS_A = """
import json
def output_fn(prediction, accept):
    return json.dumps({"model": "a", "rows": prediction.tolist()}), "application/json"
"""
HOOKS_B = """
import json, time
def predict_fn(data, model):
    if float(data[0, 0]) == 777:
        time.sleep(1.5)
    return model(data) * 2
def output_fn(prediction, accept):
    return json.dumps({"model": "b", "rows": prediction.tolist()}), "application/json"
"""
SLOW_LOAD = """
import os, time, torch
def model_fn(model_dir):
    time.sleep(3)
    # make_mlp writes torch.export
    return torch.export.load(os.path.join(model_dir, "model.pt")).module()
"""
MME = {"SAGEMAKER_MULTI_MODEL": "true", "TORCHBAY_SERVE_HTTP_THREADS": "16"}


def _model(folder: Path, hooks: str = "", pad: int = 0) -> Path:
    make_mlp(folder / "model.pt")
    if hooks:
        (folder / "code").mkdir(parents=True, exist_ok=True)
        (folder / "code" / "inference.py").write_text(hooks)
    if pad:
        (folder / "pad.bin").write_bytes(b"\0" * pad)
    return folder


def _post_json(server, path: str, doc: object):
    return server.request(
        "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
    )


def _invoke(server, name: str, body: bytes = ROW, header: bool = False):
    if header:
        return server.request(
            "POST",
            "/invocations",
            body,
            {"Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": name},
        )
    return server.request(
        "POST", f"/models/{name}/invoke", body, {"Content-Type": "application/json"}
    )


def test_two_models_loaded_listed_invoked_and_unloaded_under_load(serve, tmp_path: Path) -> None:
    a = _model(tmp_path / "models" / "a" / "model", HOOKS_A)
    b = _model(tmp_path / "models" / "b" / "model", HOOKS_B)
    server = serve(env=MME)
    assert as_json(server.request("GET", "/models")[2]) == {"models": []}
    assert _post_json(server, "/models", {"model_name": "a", "url": str(a)})[0] == 200
    status, _, body = _post_json(server, "/models", {"model_name": "a", "url": str(a)})
    assert status == 409 and "already ready" in as_json(body)["message"]
    assert _post_json(server, "/models", {"model_name": "b", "url": "file://" + str(b)})[0] == 200

    first = as_json(server.request("GET", "/models?limit=1")[2])
    assert first["models"] == [{"modelName": "a", "modelUrl": str(a)}] and first["nextPageToken"]
    second = as_json(
        server.request("GET", f"/models?limit=1&next_page_token={first['nextPageToken']}")[2]
    )
    assert [m["modelName"] for m in second["models"]] == ["b"] and "nextPageToken" not in second
    described = as_json(server.request("GET", "/models/b")[2])
    assert described[0]["modelName"] == "b" and described[0]["status"] == "ready"

    status, _, body = _invoke(server, "a")
    assert status == 200 and as_json(body)["model"] == "a"
    ra = as_json(body)["rows"]
    status, _, body = _invoke(server, "b", header=True)
    assert status == 200 and as_json(body)["model"] == "b"
    assert abs(as_json(body)["rows"][0][0] - 2 * ra[0][0]) < 1e-6  # each model its own hooks
    assert (
        server.request("POST", "/invocations", ROW, {"Content-Type": "application/json"})[0] == 400
    )
    status, _, body = _invoke(server, "nope")
    assert status == 404 and "not loaded" in as_json(body)["message"]
    assert server.request("GET", "/models/nope")[0] == 404
    assert server.request("DELETE", "/models/nope")[0] == 404
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'torchbay_serve_model_requests_total{code="200",model="a"} 1.0' in metrics
    assert "torchbay_serve_models_loaded 2.0" in metrics

    # Unload b while three slow requests are in flight: every one of them is answered 200.
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(_invoke(server, "b", SLOW)[0]))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, _, body = server.request("DELETE", "/models/b")
    waited = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    assert status == 200 and as_json(body)["waitedFor"] >= 1 and waited > 1.0
    assert results == [200, 200, 200]
    assert _invoke(server, "b")[0] == 404
    assert _invoke(server, "a")[0] == 200  # the other model never stopped
    assert [m["modelName"] for m in as_json(server.request("GET", "/models")[2])["models"]] == ["a"]


def test_bad_loads_are_refused_with_their_reason(serve, tmp_path: Path) -> None:
    _model(tmp_path / "models" / "small" / "model")
    _model(tmp_path / "models" / "big" / "model", pad=2 * 1024 * 1024)
    outside = _model(tmp_path / "elsewhere")
    server = serve(env=dict(MME, TORCHBAY_MME_MEMORY_MB="1"))
    status, _, body = _post_json(
        server, "/models", {"model_name": "big", "url": str(tmp_path / "models/big/model")}
    )
    assert status == 507 and "TORCHBAY_MME_MEMORY_MB" in as_json(body)["message"]
    assert (
        _post_json(
            server, "/models", {"model_name": "small", "url": str(tmp_path / "models/small/model")}
        )[0]
        == 200
    )
    assert _post_json(server, "/models", {"model_name": "x", "url": str(outside)})[0] == 403
    assert _post_json(server, "/models", {"model_name": "../x", "url": str(outside)})[0] == 400
    assert (
        _post_json(server, "/models", {"model_name": "y", "url": str(tmp_path / "models/none")})[0]
        == 404
    )
    assert server.request("POST", "/models", b"{", {"Content-Type": "application/json"})[0] == 400
    assert _invoke(server, "small")[0] == 200
    assert server.ping() == 200

    # A slow load (model_fn takes 3 s) never holds up another model's requests.
    slow = _model(tmp_path / "models" / "slow" / "model", SLOW_LOAD)
    loading = threading.Thread(
        target=lambda: _post_json(server, "/models", {"model_name": "slow", "url": str(slow)})
    )
    loading.start()
    time.sleep(0.5)
    started = time.monotonic()
    for _ in range(5):
        assert _invoke(server, "small")[0] == 200
    assert time.monotonic() - started < 2.0
    assert as_json(server.request("GET", "/models/slow")[2])[0]["status"] == "loading"
    loading.join(30)
    assert _invoke(server, "slow")[0] == 200


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


def test_models_load_on_first_use_from_s3_with_lru_eviction(
    serve, tmp_path: Path, bucket, s3, s3_env
) -> None:
    for name in ("m1", "m2", "m3"):
        folder = _model(
            tmp_path / "build" / name, HOOKS_A.replace('"a"', repr(name)), pad=400 * 1024
        )
        s3.put_object(Bucket=bucket, Key=f"models/{name}/model.tar.gz", Body=_archive(folder))
    server = serve(
        env=dict(
            MME,
            **s3_env,
            TORCHBAY_MME_MEMORY_MB="1",
            TORCHBAY_MME_MODEL_PREFIX=f"s3://{bucket}/models/",
        )
    )
    for name in ("m1", "m2", "m1"):
        status, _, body = _invoke(server, name, header=True)
        assert status == 200 and as_json(body)["model"] == name

    def listed():
        return [m["modelName"] for m in as_json(server.request("GET", "/models")[2])["models"]]

    assert listed() == ["m1", "m2"]
    status, _, body = _invoke(server, "m3")  # needs room: m2 is the least recently used
    assert status == 200 and as_json(body)["model"] == "m3"
    assert listed() == ["m1", "m3"]
    assert _invoke(server, "m2")[0] == 200  # fetched again (from the unpacked copy) after m1 goes
    assert listed() == ["m2", "m3"]
    assert _invoke(server, "m9")[0] == 404
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'torchbay_serve_model_unloads_total{reason="evicted"} 2.0' in metrics

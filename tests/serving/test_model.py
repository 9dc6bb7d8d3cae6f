"""The user's inference.py hooks, called as the SageMaker PyTorch toolkit calls them, through a real
server."""

from __future__ import annotations

import json
from pathlib import Path

from tests.serving.conftest import as_json, make_mlp

HOOKS = """
import json, os, torch

def model_fn(model_dir, context):
    assert context.system_properties["model_dir"] == model_dir
    return torch.export.load(open(os.path.join(model_dir, "model.pt"), "rb")).module()

def model_warmup_fn(model_dir, model):
    model(torch.zeros(1, 4))            # a forward() in the master, before the workers fork
    open(os.path.join(model_dir, "warmed"), "w").close()

def input_fn(input_data, content_type):
    assert isinstance(input_data, str)  # JSON arrives decoded, as in SageMaker
    if content_type != "application/json":
        raise ValueError("only JSON here")
    return torch.tensor(json.loads(input_data)["rows"], dtype=torch.float32)

def predict_fn(data, model, context):
    return model(data) * 0 + context.batch_size

def output_fn(prediction, accept):
    body = json.dumps({"scores": prediction.tolist(), "accept": accept})
    return body, "application/vnd.test+json"
"""

TRANSFORM = """
class Rejected(Exception):
    status_code = 422

def model_fn(model_dir):
    return "the model"

def transform_fn(model, input_data, content_type, accept):
    if input_data == b"reject":
        raise Rejected("no thanks")
    if input_data == b"boom":
        raise KeyError("boom")
    return b"%s:%s:%s:%s" % (model.encode(), input_data, content_type.encode(), accept.encode())
"""


def _write(root: Path, source: str, program: str = "inference.py") -> None:
    code = root / "model" / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / program).write_text(source)


def test_hooks_with_context_and_warmup(serve, tmp_path: Path) -> None:
    make_mlp(tmp_path / "model" / "model.pt")
    _write(tmp_path, HOOKS)
    server = serve(env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2"})
    assert (tmp_path / "model" / "warmed").exists()
    status, headers, body = server.post(
        json.dumps({"rows": [[1, 2, 3, 4], [5, 6, 7, 8]]}).encode(), accept="application/x-anything"
    )
    assert status == 200, body
    assert headers["content-type"] == "application/vnd.test+json"
    assert as_json(body) == {"scores": [[1.0] * 3, [1.0] * 3], "accept": "application/x-anything"}
    status, _, body = server.post(b"1,2", "text/csv")  # input_fn's ValueError is the client's error
    assert status == 400 and "only JSON here" in as_json(body)["message"]
    status, _, body = server.post(
        b'{"rows": "\xff\xfe"}'
    )  # JSON that is not UTF-8 never reaches input_fn
    assert status == 400 and "not UTF-8" in as_json(body)["message"]
    assert server.post(json.dumps({"rows": [[1, 2, 3, 4]]}).encode())[0] == 200


def test_transform_fn_and_user_status(serve, tmp_path: Path) -> None:
    _write(tmp_path, TRANSFORM, "handler.py")
    server = serve(env={"SAGEMAKER_PROGRAM": "handler.py", "SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
    status, _headers, body = server.post(b"abc", "application/octet-stream")
    assert status == 200 and body == b"the model:abc:application/octet-stream:application/json"
    status, _, body = server.post(b"reject", "application/octet-stream")
    assert status == 422 and "no thanks" in as_json(body)["message"]
    status, _, body = server.post(b"boom", "application/octet-stream")
    assert status == 400 and "boom" in as_json(body)["message"]


def test_transform_fn_with_predict_fn_refuses_to_start(serve, tmp_path: Path) -> None:
    _write(tmp_path, TRANSFORM + "\ndef predict_fn(data, model):\n    return data\n")
    server = serve(wait=False)
    assert server.proc.wait(120) == 3
    assert "transform_fn and also" in server.output()

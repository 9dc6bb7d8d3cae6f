"""A real `torchbay serve` whose hooks make a transform job's behaviour visible: counts, failures, echoes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.serving.conftest import Servers

# transform_fn over CSV rows, JSON Lines and PNG images. Every request is logged (records per request);
# a record holding 666 fails for good (400); FLAKY_DIR makes the first attempt of every request fail with
# a 503, so the client must retry.
HOOKS = r'''
import hashlib, io, json, os

class Unavailable(Exception):
    status_code = 503

def model_fn(model_dir):
    return "echo"

def _log(kind, count):
    with open(os.environ["REQUEST_LOG"], "a") as f:
        f.write("%s %d\n" % (kind, count))

def _flaky(body):
    folder = os.environ.get("FLAKY_DIR")
    if not folder:
        return
    mark = os.path.join(folder, hashlib.sha256(body if isinstance(body, bytes) else body.encode()).hexdigest())
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise Unavailable("warming up; retry")

def transform_fn(model, data, content_type, accept):
    _flaky(data)
    if os.environ.get("SLOW"):
        import time
        time.sleep(float(os.environ["SLOW"]))
    kind = content_type.split(";")[0]
    if kind == "text/csv":
        lines = data.split("\n")
        _log("csv", len(lines))
        out = []
        for line in lines:
            values = [float(v) for v in line.split(",")]
            if 666 in values:
                raise ValueError("poisoned record %r" % line)
            out.append("%r,%d" % (sum(values), len(values)))
        return "\n".join(out), "text/csv"
    if kind == "application/jsonlines":
        lines = data.decode().split("\n")
        _log("jsonl", len(lines))
        out = []
        for line in lines:
            doc = json.loads(line)
            features = doc["features"] if isinstance(doc, dict) else doc
            out.append(json.dumps({"score": sum(features)}))
        return "\n".join(out), "application/jsonlines"
    if kind == "image/png":
        from PIL import Image
        _log("png", 1)
        image = Image.open(io.BytesIO(data))
        return json.dumps({"size": list(image.size), "mode": image.mode}), "application/json"
    raise ValueError("unsupported " + kind)
'''


def write_hooks(root: Path) -> None:
    code = root / "model" / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "inference.py").write_text(HOOKS)


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator:
    """start(env) -> a started echo server; its request log is tmp_path/requests.log."""
    servers = Servers(tmp_path)
    write_hooks(tmp_path)

    def start(**env: str):
        env = {"REQUEST_LOG": str(tmp_path / "requests.log"), "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
               "TORCHBAY_SERVE_HTTP_THREADS": "4", **env}
        return servers(env=env)

    yield start
    servers.stop_all()


def requests_logged(tmp_path: Path) -> list[tuple[str, int]]:
    path = tmp_path / "requests.log"
    if not path.exists():
        return []
    return [(line.split()[0], int(line.split()[1])) for line in path.read_text().splitlines()]

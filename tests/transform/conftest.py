"""A real `torchbay serve` whose hooks make a transform job's behaviour visible: counts, failures,
echoes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.conftest import Servers

# transform_fn over CSV rows, JSON Lines and PNG images. Every request is logged (records per
# request);
# a record holding 666 fails for good (400). Switched on at run time through files in CONTROL_DIR:
# flaky/
# makes the first attempt of every request fail with a 503 (so the client must retry), slow holds
# the
# seconds each request sleeps.
HOOKS = r"""
import hashlib, io, json, os

class Unavailable(Exception):
    status_code = 503

def model_fn(model_dir):
    return "echo"

def _log(kind, count):
    with open(os.environ["REQUEST_LOG"], "a") as f:
        f.write("%s %d\n" % (kind, count))

def _flaky(body):
    folder = os.path.join(os.environ["CONTROL_DIR"], "flaky")
    if not os.path.isdir(folder):
        return
    data = body if isinstance(body, bytes) else body.encode()
    mark = os.path.join(folder, hashlib.sha256(data).hexdigest())
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise Unavailable("warming up; retry")

def transform_fn(model, data, content_type, accept):
    _flaky(data)
    slow = os.path.join(os.environ["CONTROL_DIR"], "slow")
    if os.path.exists(slow):
        import time
        time.sleep(float(open(slow).read()))
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
"""


def write_hooks(root: Path) -> None:
    code = root / "model" / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "inference.py").write_text(HOOKS)


class EchoServer:
    """One server per test module; ``reset()`` clears its request log and switches,
    ``flaky()``/``slow(s)`` set them."""

    def __init__(self, server, folder: Path) -> None:
        self.server = server
        self.port = server.port
        self.folder = folder

    def reset(self) -> None:
        (self.folder / "requests.log").write_text("")
        for name in ("flaky", "slow"):
            path = self.folder / "control" / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def flaky(self) -> None:
        (self.folder / "control" / "flaky").mkdir()

    def slow(self, seconds: float) -> None:
        (self.folder / "control" / "slow").write_text(str(seconds))

    def requests(self) -> list[tuple[str, int]]:
        return [
            (line.split()[0], int(line.split()[1]))
            for line in (self.folder / "requests.log").read_text().splitlines()
        ]


@pytest.fixture(scope="module")
def echo_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    folder = tmp_path_factory.mktemp("echo")
    (folder / "control").mkdir()
    servers = Servers(folder)
    write_hooks(folder)
    server = servers(
        env={
            "REQUEST_LOG": str(folder / "requests.log"),
            "CONTROL_DIR": str(folder / "control"),
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
            "TORCHBAY_SERVE_HTTP_THREADS": "4",
        }
    )
    yield EchoServer(server, folder)
    servers.stop_all()


@pytest.fixture
def echo(echo_module: EchoServer) -> EchoServer:
    """The module's echo server, with an empty request log and every switch off."""
    echo_module.reset()
    return echo_module

"""A real ``torchbay serve`` (gunicorn + flask) in its own process group, on a free port on
127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import REPO, free_port

if TYPE_CHECKING:
    import numpy as np


def mlp(inputs: int = 4, outputs: int = 3):
    """The eager MLP every serving test serves (fixed weights, so answers can be checked), in eval
    mode."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, 8), torch.nn.ReLU(), torch.nn.Linear(8, outputs)
    ).eval()


# (inputs, outputs, fmt) -> the file's bytes: torch.export takes a second or more per call
_MADE: dict = {}


def make_mlp(path: Path, inputs: int = 4, outputs: int = 3, fmt: str = "export") -> None:
    """:func:`mlp` saved at ``path`` as a torch.export program with a dynamic batch (whatever the
    file's name:
    the server reads the format from the contents), or with ``fmt="torchscript"`` as TorchScript
    (only for the
    tests that check the deprecated format is still served)."""
    import warnings

    import torch

    key = (inputs, outputs, fmt)
    if key not in _MADE:
        scratch = Path(f"/tmp/torchbay-mlp-{os.getpid()}-{inputs}-{outputs}-{fmt}.pt")
        model = mlp(inputs, outputs)
        if fmt == "export":
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(
                model, (torch.zeros(2, inputs),), dynamic_shapes=({0: batch},)
            )
            with open(
                scratch, "wb"
            ) as stream:  # a stream: torch warns about names not ending in .pt2
                torch.export.save(program, stream)
        else:
            with warnings.catch_warnings():  # deprecated on purpose: the legacy format stays served
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(torch.jit.script(model), str(scratch))
        _MADE[key] = scratch.read_bytes()
        scratch.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_MADE[key])


def mlp_forward(rows) -> np.ndarray:
    """The eager forward() of :func:`mlp` (4 inputs, 3 outputs) on ``rows``."""
    import torch

    with torch.no_grad():
        return mlp()(torch.as_tensor(rows, dtype=torch.float32)).numpy()


class Server:
    """One serve process; ``request()`` does a real HTTP request on a fresh connection."""

    def __init__(self, root: Path, env: Mapping[str, str], args: list[str], log: Path) -> None:
        self.root = root
        self.port = free_port()
        self.log = log
        child_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "TORCHBAY_"))
        }
        child_env.update(
            {"TORCHBAY_ROOT": str(root), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        )
        child_env.update(env)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *args,
            ],
            cwd=str(REPO),
            env=child_env,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()

    def post(
        self,
        body: bytes,
        content_type: str = "application/json",
        accept: str | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": content_type}
        if accept is not None:
            headers["Accept"] = accept
        return self.request("POST", "/invocations", body, headers, timeout)

    def ping(self) -> int | None:
        try:
            return self.request("GET", "/ping", timeout=10)[0]
        except OSError:
            return None

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping() == 200:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"/ping not 200 within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # nothing of ours may outlive the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode


class Servers:
    """Starts servers under one root and stops them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._servers: list[Server] = []

    def __call__(
        self,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        wait: bool = True,
    ) -> Server:
        server = Server(
            self.root, env or {}, list(args or []), self.root / f"serve-{len(self._servers)}.log"
        )
        self._servers.append(server)
        if wait:
            server.wait_healthy()
        return server

    def stop_all(self) -> None:
        for server in self._servers:
            server.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Servers]:
    """``serve(env=..., args=...)`` starts a server with tmp_path as its root."""
    servers = Servers(tmp_path)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Like ``serve``, shared by a module's tests."""
    servers = Servers(tmp_path_factory.mktemp("serve"))
    yield servers
    servers.stop_all()


def as_json(body: bytes) -> object:
    return json.loads(body)


@pytest.fixture(scope="session")
def exported_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with :func:`mlp` as ``model.pt2`` (torch.export, dynamic batch 1..64) and
    ``model.aoti.pt2``
    (AOTInductor, compiled once per session: about 30-100 s on 2 cores), written by
    ``export_model``.

    With ``TORCHBAY_TEST_ARTIFACTS`` set, the folder lives there (per torch version) and is reused
    across runs.
    """
    import torch

    from agent.export import export_model

    cache = os.environ.get("TORCHBAY_TEST_ARTIFACTS")
    if cache:
        out = Path(cache) / f"exported-mlp-torch-{torch.__version__}"
        if (out / "model.aoti.pt2").is_file() and (out / "model.pt2").is_file():
            return out
    else:
        out = tmp_path_factory.mktemp("exported-mlp")
    export_model(mlp(), torch.zeros(1, 4), out, aoti=True, max_batch=64)
    return out

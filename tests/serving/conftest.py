"""A real ``torchbay serve`` (gunicorn + flask) in its own process group, on a free port on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional

import pytest

from tests.conftest import REPO, free_port


def make_mlp(path: Path, inputs: int = 4, outputs: int = 3) -> None:
    """A TorchScript MLP with fixed weights, so answers can be checked."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(inputs, 8), torch.nn.ReLU(), torch.nn.Linear(8, outputs))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(path))


class Server:
    """One serve process; ``request()`` does a real HTTP request on a fresh connection."""

    def __init__(self, root: Path, env: Mapping[str, str], args: list[str], log: Path) -> None:
        self.root = root
        self.port = free_port()
        self.log = log
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "TORCHBAY_"))}
        child_env.update({"TORCHBAY_ROOT": str(root), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
        child_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=str(REPO), env=child_env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Mapping[str, str]] = None, timeout: float = 60.0) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post(self, body: bytes, content_type: str = "application/json", accept: Optional[str] = None,
             timeout: float = 60.0) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": content_type}
        if accept is not None:
            headers["Accept"] = accept
        return self.request("POST", "/invocations", body, headers, timeout)

    def ping(self) -> Optional[int]:
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

    def __call__(self, env: Optional[Mapping[str, str]] = None, args: Optional[list[str]] = None,
                 wait: bool = True) -> Server:
        server = Server(self.root, env or {}, list(args or []), self.root / f"serve-{len(self._servers)}.log")
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

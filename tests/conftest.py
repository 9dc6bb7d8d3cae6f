"""Shared fixtures: a real S3 server (moto's standalone server) over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import pytest

REPO = Path(__file__).resolve().parent.parent
DUMMY_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto_server in its own process group; ``stop()``/``start()`` simulate an outage on the same port.

    ``host`` is the address it binds (127.0.0.1, or a test-host address in a network namespace set-up);
    ``env`` the server's whole environment (default: this process's plus the dummy credentials).
    """

    def __init__(self, port: int, log: Path, *, host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 ready_timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.endpoint = f"http://{host}:{port}"
        self._log = log
        self._env = dict(env) if env is not None else None
        self._ready_timeout = ready_timeout
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
        env = self._env if self._env is not None else dict(os.environ, **DUMMY_CREDS)
        with open(self._log, "ab") as out:
            self._proc = subprocess.Popen([moto, "-H", self.host, "-p", str(self.port)], stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited early; see {self._log}")
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not listen on {self.endpoint} within {self._ready_timeout:.0f} s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def env(self) -> dict[str, str]:
        """The environment a process needs to reach this server."""
        return dict(DUMMY_CREDS, AWS_ENDPOINT_URL=self.endpoint)

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=DUMMY_CREDS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_CREDS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto server for the whole session."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test process (and children given os.environ) at the session's S3 server."""
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def bucket(s3_server: S3Server, s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(s3_server: S3Server):
    """A boto3 client for the session's S3 server (for arranging and checking, not for the code under test)."""
    return s3_server.client()

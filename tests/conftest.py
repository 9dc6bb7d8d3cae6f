"""Shared fixtures: a real S3 server (moto's standalone server) over HTTP on 127.0.0.1, and the real
SageMaker toolkits (tests/shims/reference.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

# The real SageMaker toolkits, for the differential tests of tests/shims and tests/e2e.
from tests.shims.reference import reference_toolkit  # noqa: F401  (a fixture, used by name)

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
    """moto_server in its own process group; ``stop()``/``start()`` simulate an outage on the same
    port.

    ``host`` is the address it binds (127.0.0.1, or a test-host address in a network namespace
    set-up); ``env`` the server's whole environment (default: this process's plus the dummy
    credentials).
    """

    def __init__(
        self,
        port: int,
        log: Path,
        *,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
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
            self._proc = subprocess.Popen(
                [moto, "-H", self.host, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited early; see {self._log}") from None
                time.sleep(0.1)
        raise RuntimeError(
            f"moto_server did not listen on {self.endpoint} within {self._ready_timeout:.0f} s"
        )

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

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=DUMMY_CREDS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_CREDS["AWS_SECRET_ACCESS_KEY"],
        )


class OutageProxy:
    """A TCP relay in front of an S3 server that can go down and come back on the same port.

    moto forgets every bucket, object and multipart upload when its process restarts, which a real
    S3 outage does not: the relay drops the network path instead. ``stop()`` closes the listening
    socket and resets every open connection (clients see "connection refused" / "connection reset");
    ``start()`` listens again. ``outage_after(nbytes, seconds)`` takes it down once ``nbytes`` more
    bytes went upstream (e.g. two parts into a multipart upload), and back up ``seconds`` later
    (``None``: stays down). ``sent`` counts upstream bytes. ``rate`` (bytes/s, None: as fast as
    it goes) caps what comes back from the server, all connections together: a slow S3.
    ``peak`` is the most client connections that were open at once.
    """

    def __init__(self, upstream: str, port: int | None = None) -> None:
        host, _, port_text = upstream.rsplit("/", 1)[-1].partition(":")
        self._upstream = (host, int(port_text))
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.sent = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._trigger: tuple[int, float | None] | None = None
        self.outages: list[float] = []
        self.rate: float | None = None
        self.peak = 0
        self._open = 0
        self._free_at = 0.0  # when the capped downstream path is free again

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:
            # shutdown wakes a pump blocked in recv (close alone would not), then RST like a dead
            # server
            try:
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def outage_after(self, nbytes: int, seconds: float | None) -> None:
        with self._lock:
            self._trigger = (self.sent + nbytes, seconds)

    def env(self) -> dict[str, str]:
        return dict(DUMMY_CREDS, AWS_ENDPOINT_URL=self.endpoint)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self._open += 1
                self.peak = max(self.peak, self._open)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if counted:
                    self._count(len(data))
                elif self.rate:
                    self._throttle(len(data))
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if counted:  # the client's side of the pair ended: one connection fewer open
                with self._lock:
                    self._open -= 1

    def _throttle(self, n: int) -> None:
        """Hold this connection until ``n`` bytes fit under ``rate``, shared by all connections."""
        rate = self.rate or 0.0
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + n / rate
            wait = self._free_at - now
        time.sleep(wait)

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n
            trigger = self._trigger
            if trigger is None or self.sent < trigger[0]:
                return
            self._trigger = None
        self.outages.append(time.monotonic())
        self.stop()
        if trigger[1] is not None:
            timer = threading.Timer(trigger[1], self.start)
            timer.daemon = True
            timer.start()


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[OutageProxy]:
    """An OutageProxy in front of the session's S3 server (its own port for each test)."""
    proxy = OutageProxy(s3_server.endpoint)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto server for the whole session."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def dummy_creds(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials in this test process's environment for a test with no S3 server of the
    session's (a closed port, a raw-socket server): requests get signed and sent."""
    for key, value in DUMMY_CREDS.items():
        monkeypatch.setenv(key, value)
    return DUMMY_CREDS


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
    """A boto3 client for the session's S3 server (for arranging and checking, not for the code
    under test)."""
    return s3_server.client()

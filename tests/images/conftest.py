"""The image tests' engine, images and network, made once per session and removed at its end.

In CI (``CI=true``) the tests must run: the engine is installed and started when missing, and any
failure to do so fails the session. Elsewhere they are skipped, with the reason, when no engine can
be started (not root, no apt, no kernel support). The CPU image is built from a locally made
debootstrap base (scripts/build-images --local-base), so no registry is needed; the CUDA image from
the same base, with the CPU torch wheel standing in for the CUDA one (``--torch-standin``), on
demand.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import S3Server, free_port

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "scripts" / "docker-engine"
LABEL = "torchbay-test"
TAG = "torchbay-test/pytorch:cpu"
SERVE_TAG = TAG + "-serve"
CUDA_TAG = "torchbay-test/pytorch:cuda-standin"
CUDA_SERVE_TAG = CUDA_TAG + "-serve"
LOCK = Path("/tmp/torchbay-image-tests.lock")
TORCH_VERSION = "2.13.0"

pytestmark = pytest.mark.docker


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"image tests must run in CI, but: {reason}")
    print(f"\n*** image tests SKIPPED: {reason} ***", file=sys.stderr)
    pytest.skip(f"image tests skipped: {reason}")


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


@dataclass(frozen=True)
class Engine:
    """A Docker engine the session may use: the CLI path, and whether this session started it."""

    cli: str
    ours: bool
    canary: str  # a line put in the CA bundle given to the build; must appear in no layer
    ca_bundle: str = ""  # the bundle itself (given to every build of the session)
    sources: str = ""  # the session's snapshot of what the builds read (see _snapshot)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        proc = _run([self.cli, *args], timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def inspect(self, kind: str, name: str) -> dict:
        return json.loads(self(kind, "inspect", name).stdout)[0]


def _torch_wheel() -> str | None:
    """A local torch wheel of the pinned version (where the torch index is out of reach)."""
    named = os.environ.get("TORCHBAY_TORCH_WHEEL")
    if named:
        return named
    found = sorted(glob.glob(f"/opt/wheels/torch-{TORCH_VERSION}+cpu-cp311-*.whl"))
    return found[0] if found else None


def _canary_bundle(path: Path) -> str:
    """A CA bundle for the build (the one pip uses here, or certifi's) with a unique marker line."""
    canary = f"torchbay-ca-canary-{uuid.uuid4().hex}"
    source = os.environ.get("PIP_CERT") or ""
    if not os.path.isfile(source):
        import certifi  # pip's dependency tree always has it (botocore needs it)

        source = certifi.where()
    path.write_text(Path(source).read_text() + f"\n# {canary}\n")
    return canary


def _cleanup(engine: Engine, started: bool) -> None:
    for kind in ("container", "network"):
        listing = engine(
            kind,
            "ls",
            "-aq" if kind == "container" else "-q",
            "--filter",
            f"label={LABEL}",
            check=False,
        )
        ids = listing.stdout.split()
        if ids:
            engine(
                kind, "rm", *(["-f"] if kind == "container" else []), *ids, check=False, timeout=120
            )
    engine("rmi", "-f", TAG, SERVE_TAG, CUDA_TAG, CUDA_SERVE_TAG, check=False)
    if started:
        engine("rmi", "-f", "torchbay/base:bookworm", check=False)
        engine("builder", "prune", "-af", check=False, timeout=300)
        engine("image", "prune", "-f", check=False, timeout=120)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The engine with the CPU images built (TAG for training, SERVE_TAG for serving)."""
    if os.geteuid() != 0:
        _unavailable("not root, so no Docker engine can be started")
    LOCK.touch()
    lock = open(LOCK, "w")
    deadline = time.monotonic() + 1200
    while True:  # one image-test session at a time on this machine (they share the engine)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                _unavailable(f"another session held {LOCK} for 20 minutes")
            time.sleep(2)
    started = False
    cli = ""
    try:
        proc = _run([str(ENGINE), "start"], 900)
        if proc.returncode != 0:
            _unavailable(
                f"scripts/docker-engine start failed ({proc.returncode}): "
                f"{proc.stderr.strip()[-600:]}"
            )
        started = proc.stdout.strip().endswith("ours")
        cli = _run([str(ENGINE), "docker"], 30).stdout.strip()
        tmp = tmp_path_factory.mktemp("image-build")
        canary = _canary_bundle(tmp / "ca-bundle.crt")
        eng = Engine(
            cli, started, canary, str(tmp / "ca-bundle.crt"), str(_snapshot(tmp / "sources"))
        )
        _build_images(eng, tmp / "build.log", "--tag", TAG)
        yield eng
    finally:
        if cli:
            _cleanup(Engine(cli, started, ""), started)
        if started:
            _run([str(ENGINE), "stop"], 180)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _snapshot(dest: Path) -> Path:
    """A copy of what the builds read, taken once: every image of the session is built from the same
    sources (and so shares layers) even while the working tree is being edited."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("agent", "entrypoints", "dockerfiles", "scripts"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _build_images(engine: Engine, log: Path, *args: str) -> None:
    """scripts/build-images (of the snapshot) from the local base with the session's CA bundle and
    the local torch wheel."""
    sources = Path(engine.sources)
    build = [
        str(sources / "scripts" / "build-images"),
        "--local-base",
        "--ca-bundle",
        engine.ca_bundle,
        *args,
    ]
    wheel = _torch_wheel()
    if wheel:
        build += ["--torch-wheel", wheel]
    with open(
        log, "w"
    ) as out:  # GIT_DIR: the revision label names the commit the snapshot was taken at
        done = subprocess.run(
            build,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1500,
            cwd=str(sources),
            env=dict(os.environ, DOCKER=engine.cli, GIT_DIR=str(REPO / ".git")),
            check=False,
        )
    if done.returncode != 0:
        pytest.fail(
            f"scripts/build-images {' '.join(args)} exited {done.returncode}; the end of {log}:\n"
            + "\n".join(log.read_text().splitlines()[-40:])
        )


@pytest.fixture(scope="session")
def cuda_images(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """The CUDA Dockerfile's train and serve targets (CUDA_TAG, CUDA_SERVE_TAG), no GPU needed to
    build.

    Same local base as the CPU images, and the CPU torch wheel standing in for the CUDA build
    (``--torch-standin``, TORCH_VARIANT=cpu): every layer up to the CUDA-specific part comes from
    the CPU build's cache. Removed at the end (the engine's cleanup removes them too).
    """
    started = time.monotonic()
    log = tmp_path_factory.mktemp("cuda-build") / "build.log"
    try:
        _build_images(engine, log, "--flavor", "cuda", "--torch-standin", "--tag", CUDA_TAG)
        print(
            f"\nCUDA images (CPU torch stand-in) built in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        yield CUDA_TAG, CUDA_SERVE_TAG
    finally:
        engine("rmi", "-f", CUDA_TAG, CUDA_SERVE_TAG, check=False)


class BridgeS3(S3Server):
    """moto_server bound to a Docker network's gateway address (never 0.0.0.0), for the containers;
    started."""

    def __init__(self, host: str, log: Path) -> None:
        super().__init__(free_port(), log, host=host, ready_timeout=60)
        try:
            self.start()
        except RuntimeError:
            self.stop()
            raise

    def env_args(self) -> list[str]:
        """``docker run -e`` arguments that point a container at this server."""
        return [arg for key, value in self.env().items() for arg in ("-e", f"{key}={value}")]


@dataclass(frozen=True)
class Net:
    name: str
    gateway: str
    s3: BridgeS3


@pytest.fixture(scope="session")
def net(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """A user-defined network with an explicit subnet in 198.18.0.0/15 and an S3 server on its
    gateway."""
    name = f"tbtest-{uuid.uuid4().hex[:8]}"
    last = ""
    for octet in range(224, 240):
        proc = engine(
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            f"198.19.{octet}.0/24",
            "--gateway",
            f"198.19.{octet}.1",
            "--label",
            LABEL,
            name,
            check=False,
        )
        if proc.returncode == 0:
            gateway = f"198.19.{octet}.1"
            break
        last = proc.stderr
    else:
        pytest.fail(f"no free /24 in 198.19.224.0/20 for a test network: {last}")
    s3 = BridgeS3(gateway, tmp_path_factory.mktemp("bridge-moto") / "moto.log")
    try:
        yield Net(name, gateway, s3)
    finally:
        s3.stop()
        engine("network", "rm", name, check=False)


OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
)


def assert_oci_labels(labels: dict) -> None:
    """Every OCI label an image of ours must carry is there and not empty."""
    for key in OCI_LABELS:
        assert labels.get(key) not in (None, "", "unknown"), (
            f"label {key} missing or empty: {labels}"
        )

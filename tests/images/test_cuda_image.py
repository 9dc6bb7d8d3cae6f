"""The CUDA images, built without a GPU: what can be checked short of CUDA itself.

The CUDA Dockerfile's targets are built from the same local debootstrap base as the CPU images, with
the pinned CPU torch wheel standing in for the CUDA build (``scripts/build-images --torch-standin``,
build argument TORCH_VARIANT=cpu; no registry or CUDA wheel here, and a multi-GB CUDA torch would
not fit a CI run anyway). Checked: the images build and reuse the CPU image's layers; labels and the
NVIDIA environment; ``train``/``serve`` on PATH and runnable; serving non-root with a HEALTHCHECK;
the serving process, finding no GPU, says so once and serves a TorchScript model on CPU; and without
the declared stand-in a CPU torch fails the build.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.images.conftest import LABEL, TAG, Engine, Net, assert_oci_labels

pytestmark = [pytest.mark.docker, pytest.mark.slow]
# the diff ID of an empty tar
_EMPTY_LAYER = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


def test_cuda_images_labels_environment_and_shared_layers(
    engine: Engine, cuda_images: tuple[str, str]
) -> None:
    _train_tag, _serve_tag = cuda_images
    train, serve = (engine.inspect("image", tag) for tag in cuda_images)
    for image in (train, serve):
        config = image["Config"]
        labels = config["Labels"]
        assert_oci_labels(labels)
        assert labels["org.opencontainers.image.title"] == "torchbay-pytorch-cuda"
        assert labels["ai.torchbay.device"] == "cuda"
        assert labels["ai.torchbay.cuda_version"] == "12.8"
        assert labels["ai.torchbay.framework"] == "pytorch"
        assert labels["ai.torchbay.framework_version"] == "2.13.0"
        assert labels["ai.torchbay.toolkit_version"]
        assert labels["ai.torchbay.python_version"] == "3.11"  # the bookworm base's python3
        assert labels["ai.torchbay.torch_variant"] == "cpu", "a stand-in build must say so"
        env = dict(item.split("=", 1) for item in config["Env"])
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
        assert env["PYTHONUNBUFFERED"] == "1" and env["LANG"] == "C.UTF-8"
        assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert train["Config"]["Cmd"] == ["train"] and serve["Config"]["Cmd"] == ["serve"]
    assert train["Config"]["Labels"]["ai.torchbay.container_type"] == "training"
    assert serve["Config"]["Labels"]["ai.torchbay.container_type"] == "inference"
    user = serve["Config"]["User"].split(":")[0]
    assert user.isdigit() and user != "0", (
        f"serving must run as a numeric non-root user, not {user!r}"
    )
    check = serve["Config"]["Healthcheck"]
    assert check["Test"][0] == "CMD" and "/ping" in " ".join(check["Test"])
    # The CPU image's layers are the CUDA image's first layers: the build reused them (what keeps it
    # cheap).
    # (Less the CPU image's final empty layer, from its WORKDIR, which the CUDA image has later.)
    cpu_layers = [
        layer for layer in engine.inspect("image", TAG)["RootFS"]["Layers"] if layer != _EMPTY_LAYER
    ]
    assert len(cpu_layers) >= 4, cpu_layers
    assert train["RootFS"]["Layers"][: len(cpu_layers)] == cpu_layers, (
        "CUDA image does not share the CPU layers"
    )


def test_cuda_images_commands_run_without_a_gpu(
    engine: Engine, cuda_images: tuple[str, str]
) -> None:
    train_tag, serve_tag = cuda_images
    out = engine(
        "run",
        "--rm",
        "--label",
        LABEL,
        serve_tag,
        "sh",
        "-c",
        "id -u; command -v train; command -v serve; cat /proc/1/comm; train --help >/dev/null && "
        "echo help-ok; "
        "python -c 'import agent, torch; print(torch.__version__, torch.cuda.is_available())'",
        timeout=180,
    ).stdout.split()
    assert out[0] != "0", f"serving runs as root: {out}"
    assert out[1:3] == ["/usr/local/bin/train", "/usr/local/bin/serve"]
    assert out[3] == "tini" and "help-ok" in out, out
    assert out[-2].startswith("2.13.0") and out[-1] == "False", out
    # The train target as SageMaker runs it (`docker run IMAGE train`), through tini.
    proc = engine("run", "--rm", "--label", LABEL, train_tag, "train", "--help", timeout=180)
    assert "usage" in proc.stdout.lower(), proc.stdout + proc.stderr


def _tiny_model() -> bytes:
    """model.tar.gz holding a TorchScript model.pt computing 2x + 1."""
    import torch

    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    script = io.BytesIO()  # a torch.export program (TorchScript is deprecated), any batch size
    program = torch.export.export(
        Affine(), (torch.zeros(2, 2),), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    torch.export.save(program, script)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        info = tarfile.TarInfo("model.pt2")
        info.size = len(script.getvalue())
        archive.addfile(info, io.BytesIO(script.getvalue()))
    return buf.getvalue()


def test_cuda_serve_without_gpu_degrades_to_cpu_with_one_log_line(
    engine: Engine, net: Net, cuda_images: tuple[str, str]
) -> None:
    s3 = net.s3.client()
    bucket = f"cuda-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="model/model.tar.gz", Body=_tiny_model())
    name = f"tbtest-cuda-serve-{uuid.uuid4().hex[:6]}"
    try:
        engine(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net.name,
            "--label",
            LABEL,
            *net.s3.env_args(),
            "-e",
            f"TORCHBAY_MODEL_URI=s3://{bucket}/model/model.tar.gz",
            "-e",
            "SAGEMAKER_MODEL_SERVER_WORKERS=1",
            cuda_images[1],
        )
        address = engine.inspect("container", name)["NetworkSettings"]["Networks"][net.name][
            "IPAddress"
        ]
        deadline = time.monotonic() + 240
        ready = False
        while not ready and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{address}:8080/ping", timeout=5) as response:
                    ready = response.status == 200
            except (OSError, urllib.error.URLError):
                if not engine.inspect("container", name)["State"]["Running"]:
                    break
                time.sleep(1)
        logs = engine("logs", name, check=False)
        log = logs.stdout + logs.stderr
        assert ready, f"the CUDA serve image never answered /ping; its log:\n{log[-4000:]}"
        request = urllib.request.Request(
            f"http://{address}:8080/invocations",
            data=b"[[1.0, 2.0], [0.5, -1.0]]",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            assert json.loads(response.read()) == [[3.0, 5.0], [2.0, -1.0]]
        logs = engine("logs", name)
        log = logs.stdout + logs.stderr
        lines = [line for line in log.splitlines() if "no GPU found" in line]
        assert len(lines) == 1 and "serving on CPU" in lines[0], (
            f"want one 'no GPU found ... serving on CPU' line:\n{log}"
        )
    finally:
        engine("rm", "-f", name, check=False)


def test_cuda_variant_refuses_a_cpu_torch(engine: Engine, cuda_images: tuple[str, str]) -> None:
    """Without the declared stand-in, a CPU torch (the wheel in .whl/, no CUDA index) fails the
    build."""
    sources = Path(engine.sources)  # build-images left the wheel in the snapshot's .whl/
    proc = subprocess.run(
        [
            engine.cli,
            "build",
            "--target",
            "train",
            "--build-arg",
            "BASE_IMAGE=torchbay/base:bookworm",
            "--build-arg",
            "TORCH_INDEX_URL=",
            "--build-arg",
            "PYTHON_VERSION=3.11",
            "--secret",
            f"id=cabundle,src={engine.ca_bundle}",
            "--progress",
            "plain",
            "-f",
            str(sources / "dockerfiles" / "Dockerfile.cuda"),
            str(sources),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, DOCKER_BUILDKIT="1"),
        check=False,
    )
    told = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, f"a CUDA build with a CPU torch succeeded:\n{told}"
    assert "TORCH_VARIANT=cuda but torch is built for CUDA none" in told, told

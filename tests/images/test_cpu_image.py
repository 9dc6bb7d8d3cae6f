"""The CPU images, built from a local debootstrap base, run as a user would run them.

A 2-container training job (the DCGAN example with DDP over Gloo) on a user-defined network against
a moto S3 server on the network's gateway; the serving image reaching ``healthy``, answering
/invocations with the trained generator and stopping on ``docker stop``; labels, users, and no
credentials or CA bundle in any layer.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DUMMY_CREDS
from tests.images.conftest import LABEL, SERVE_TAG, TAG, Engine, Net, assert_oci_labels

REPO = Path(__file__).resolve().parents[2]
DCGAN = REPO / "examples" / "dcgan"
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _sourcedir() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name in ("train.py", "model.py", "inference.py", "requirements.txt"):
            archive.add(DCGAN / name, arcname=name)
    return buf.getvalue()


def _images(count: int) -> bytes:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", DCGAN / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buf = io.BytesIO()
    np.save(buf, module.make_images(count, 32, seed=1))
    return buf.getvalue()


@pytest.fixture(scope="session")
def trained(engine: Engine, net: Net) -> Iterator[dict]:
    """Run the DCGAN job on two containers (one process each, torch.distributed.run); what it
    left."""
    s3 = net.s3.client()
    bucket = f"images-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="src/sourcedir.tar.gz", Body=_sourcedir())
    s3.put_object(Bucket=bucket, Key="data/training/images-000.npy", Body=_images(64))
    s3.put_object(Bucket=bucket, Key="data/training/images-001.npy", Body=_images(64))
    spec = {
        "TrainingJobName": "dcgan-in-containers",
        "HyperParameters": {
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": json.dumps(f"s3://{bucket}/src/sourcedir.tar.gz"),
            "sagemaker_torch_distributed_enabled": "true",
            "epochs": "1",
            "image-size": "32",
            "ngf": "8",
            "ndf": "8",
            "batch-size": "16",
            "log-interval": "2",
        },
        "InputDataConfig": [
            {
                "ChannelName": "training",
                "DataSource": {"S3DataSource": {"S3Uri": f"s3://{bucket}/data/training/"}},
            }
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "ResourceConfig": {"InstanceCount": 2},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }
    prefix = f"tbtest-{uuid.uuid4().hex[:6]}"
    names = []
    try:
        for host in ("algo-1", "algo-2"):
            name = f"{prefix}-{host}"
            engine(
                "run",
                "-d",
                "--name",
                name,
                "--hostname",
                host,
                "--network",
                net.name,
                "--network-alias",
                host,
                "--label",
                LABEL,
                *net.s3.env_args(),
                "-e",
                f"TORCHBAY_JOB={json.dumps(spec)}",
                "-e",
                f"TORCHBAY_CURRENT_HOST={host}",
                "-e",
                "TORCHBAY_HOST_WAIT_TIMEOUT=120",
                TAG,
                "train",
            )
            names.append(name)
        codes = {}
        for name in names:
            codes[name] = int(engine("wait", name, timeout=480).stdout.strip())
        logs = {}
        for name in names:
            proc = engine("logs", name, check=False)
            logs[name] = proc.stdout + proc.stderr
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        yield {"bucket": bucket, "codes": codes, "logs": logs, "keys": keys, "s3": s3}
    finally:
        if names:
            engine("rm", "-f", *names, check=False)


def _members(s3, bucket: str, key: str) -> dict[str, bytes]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        return {
            m.name.lstrip("./"): archive.extractfile(m).read()
            for m in archive.getmembers()
            if m.isfile()
        }


def test_two_container_training_job_puts_model_and_outputs_in_s3(trained: dict) -> None:
    failed = [name for name, code in trained["codes"].items() if code != 0]
    # A host stopped because another failed says so; the one that failed first is shown first.
    failed.sort(key=lambda name: "stopped because of it" in trained["logs"][name])
    assert not failed, "\n\n".join(
        f"{name} exited {trained['codes'][name]}; its log:\n{trained['logs'][name][-6000:]}"
        for name in failed
    )
    every_log = "\n".join(trained["logs"].values())
    assert "rank 0/2" in every_log and "rank 1/2" in every_log, every_log[-4000:]
    models = [k for k in trained["keys"] if k.endswith("model.tar.gz")]
    outputs = [k for k in trained["keys"] if k.endswith("output.tar.gz")]
    assert models and outputs, f"no model.tar.gz/output.tar.gz in S3: {trained['keys']}"
    found = {}
    for key in models:
        found.update(_members(trained["s3"], trained["bucket"], key))
    assert "model.pt2" in found and found["model.pt2"][:2] == b"PK", (
        f"no torch.export model.pt2 in {models}"
    )
    assert "code/inference.py" in found
    samples = {}
    for key in outputs:
        samples.update(_members(trained["s3"], trained["bucket"], key))
    grids = [n for n in samples if n.startswith("samples/") and n.endswith(".png")]
    assert grids and samples[grids[0]][:8] == b"\x89PNG\r\n\x1a\n", (
        f"no sample grid in {outputs}: {list(samples)}"
    )


def _wait_healthy(engine: Engine, name: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        state = engine.inspect("container", name)["State"]
        status = state.get("Health", {}).get("Status", "")
        if status == "healthy" or not state["Running"]:
            return status
        time.sleep(1)
    return status


def test_serve_image_healthy_answers_and_stops_on_sigterm(
    engine: Engine, net: Net, trained: dict
) -> None:
    model = next(
        (
            k
            for k in trained["keys"]
            if k.endswith("model.tar.gz")
            and "model.pt2" in _members(trained["s3"], trained["bucket"], k)
        ),
        None,
    )
    assert model, f"the training job left no model to serve: {trained['keys']}"
    name = f"tbtest-serve-{uuid.uuid4().hex[:6]}"
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
            f"TORCHBAY_MODEL_URI=s3://{trained['bucket']}/{model}",
            "-e",
            "SAGEMAKER_MODEL_SERVER_WORKERS=1",
            SERVE_TAG,
        )
        status = _wait_healthy(engine, name)
        info = engine.inspect("container", name)
        logs = engine("logs", name, check=False)
        assert status == "healthy", (
            f"health {status!r}; log:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        )
        address = info["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        request = urllib.request.Request(
            f"http://{address}:8080/invocations",
            data=json.dumps({"count": 3, "seed": 7}).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/x-npy"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            images = np.load(io.BytesIO(response.read()), allow_pickle=False)
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
        started = time.monotonic()
        engine("stop", "-t", "10", name, timeout=60)
        took = time.monotonic() - started
        code = engine.inspect("container", name)["State"]["ExitCode"]
        assert took < 2.0, f"docker stop took {took:.2f} s (want < 2 s)"
        assert code == 143, f"serve exited {code} on docker stop (want 143: SIGTERM passed through)"
    finally:
        engine("rm", "-f", name, check=False)


def test_labels_users_and_entrypoints(engine: Engine) -> None:
    train = engine.inspect("image", TAG)["Config"]
    serve = engine.inspect("image", SERVE_TAG)["Config"]
    for config in (train, serve):
        labels = config["Labels"]
        assert_oci_labels(labels)
        assert labels["ai.torchbay.framework"] == "pytorch"
        assert labels["ai.torchbay.framework_version"] == "2.13.0"
        assert labels["ai.torchbay.toolkit_version"]
        assert labels["ai.torchbay.device"] == "cpu"
        assert config["Entrypoint"] == ["/usr/bin/tini", "--"]
        env = dict(item.split("=", 1) for item in config["Env"])
        assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
        assert env["LANG"] == "C.UTF-8"
    assert train["Cmd"] == ["train"] and serve["Cmd"] == ["serve"]
    assert serve["User"].split(":")[0].isdigit() and serve["User"].split(":")[0] != "0"
    assert serve["Healthcheck"]["Test"][0] == "CMD" and "/ping" in " ".join(
        serve["Healthcheck"]["Test"]
    )
    # Running as a user would: the commands exist, the serve user is not root, tini is PID 1.
    out = engine(
        "run",
        "--rm",
        "--label",
        LABEL,
        SERVE_TAG,
        "sh",
        "-c",
        "id -u; command -v train; command -v serve; cat /proc/1/comm; train --help >/dev/null && "
        "echo help-ok; "
        "python -c 'import agent, torch; print(torch.__version__)'",
        timeout=180,
    ).stdout.split()
    assert out[0] != "0", f"serving runs as root: {out}"
    assert out[1:3] == ["/usr/local/bin/train", "/usr/local/bin/serve"]
    assert out[3] == "tini" and "help-ok" in out and out[-1].startswith("2.13.0")


def test_no_credentials_or_ca_bundle_in_any_layer(engine: Engine, tmp_path: Path) -> None:
    secrets = [engine.canary.encode(), DUMMY_CREDS["AWS_SECRET_ACCESS_KEY"].encode()]
    for tag in (TAG, SERVE_TAG):
        history = engine("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
        assert engine.canary not in history
        config = json.dumps(engine.inspect("image", tag)["Config"])
        assert "AWS_" not in config and "PIP_CERT" not in config, config
    archive = tmp_path / "serve.tar"
    engine("save", "-o", str(archive), SERVE_TAG, timeout=600)
    hits = []
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            if not member.name.endswith("layer.tar"):
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as layer:
                for entry in layer:
                    path = "/" + entry.name.lstrip("./")
                    if path.startswith(
                        ("/run/secrets", "/root/.aws", "/home/torchbay/.aws")
                    ) or path.endswith(("/.netrc", "/.pypirc", ".docker/config.json")):
                        hits.append(f"{member.name}: {path}")
                    if not entry.isfile() or entry.size > 64 * 1024 * 1024:
                        continue
                    data = layer.extractfile(entry).read()
                    hits += [
                        f"{member.name}: {path} holds {s[:24]!r}" for s in secrets if s in data
                    ]
    assert not hits, "secrets in image layers:\n" + "\n".join(hits)

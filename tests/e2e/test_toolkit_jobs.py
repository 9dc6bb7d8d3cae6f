"""Whole jobs with scripts in the shapes SageMaker users write against the toolkits' Python API,
through
``entrypoints/train`` and a real S3 server; the pip guard; every host's log and status file in S3.

The differential test runs the real sagemaker-training 5.1.4 (tests/shims/reference.py) on the job's
tree, in a process with the script's environment, and compares it with what the script saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers import tar_gz

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "entrypoints" / "train"
pytestmark = pytest.mark.slow

PROPERTIES = [
    "model_dir",
    "output_data_dir",
    "output_dir",
    "output_intermediate_dir",
    "input_dir",
    "input_config_dir",
    "channel_input_dirs",
    "hyperparameters",
    "hosts",
    "current_host",
    "master_hostname",
    "is_master",
    "num_gpus",
    "num_cpus",
    "network_interface_name",
    "job_name",
    "module_name",
    "user_entry_point",
    "resource_config",
    "input_data_config",
    "log_level",
    "distribution_hosts",
]

# A training script as SageMaker users write it with the toolkit: folders, hosts and hyperparameters
# from
# Environment(), the arguments from argparse. It also records what it saw, for the differential
# test.
ENVIRONMENT_SCRIPT = f"""
import argparse
import json
import os

from sagemaker_training import environment

PROPERTIES = {PROPERTIES!r}


def parse_args(env):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--model-dir", default=env.model_dir)
    parser.add_argument("--train", default=env.channel_input_dirs["train"])
    return parser.parse_args()


if __name__ == "__main__":
    seen_environ = dict(os.environ)
    env = environment.Environment()
    args = parse_args(env)
    files = sorted(os.listdir(args.train))
    print(f"training on {{env.current_host}} of {{env.hosts}} "
          f"(master {{env.master_hostname}}): {{files}}", flush=True)
    for epoch in range(args.epochs):
        print(f"epoch={{epoch}} loss={{1.0 / (epoch + 1):.3f}}", flush=True)
    with open(os.path.join(args.model_dir, "model.json"), "w") as f:
        json.dump({{"lr": args.learning_rate, "epochs": args.epochs}}, f)
    record = {{name: getattr(env, name) for name in PROPERTIES}}
    record["to_env_vars()"] = env.to_env_vars()
    record["to_cmd_args()"] = env.to_cmd_args()
    record["environ"] = seen_environ
    with open(os.path.join(env.output_data_dir, "seen.json"), "w") as f:
        json.dump(record, f)
"""

# The legacy shape (the DCGAN of the PyTorch-on-SageMaker talks):
# sagemaker_containers.training_env().
CONTAINERS_SCRIPT = """
import argparse
import os

import sagemaker_containers


def train(args):
    print(f"{len(args.hosts)} host(s), this is {args.current_host}, {args.num_gpus} GPU(s)",
          flush=True)
    with open(os.path.join(args.model_dir, "generator.txt"), "w") as f:
        f.write(f"nz={args.nz} data={sorted(os.listdir(args.data_dir))}")


if __name__ == "__main__":
    env = sagemaker_containers.training_env()
    parser = argparse.ArgumentParser()
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.0002)
    parser.add_argument("--hosts", type=list, default=env.hosts)
    parser.add_argument("--current-host", type=str, default=env.current_host)
    parser.add_argument("--model-dir", type=str, default=env.model_dir)
    parser.add_argument("--data-dir", type=str, default=env.channel_input_dirs["train"])
    parser.add_argument("--num-gpus", type=int, default=env.num_gpus)
    train(parser.parse_args())
"""


def _spec(bucket: str, *, hps: dict | None = None) -> dict:
    return {
        "TrainingJobName": "toolkit-job",
        "HyperParameters": {
            "epochs": "2",
            "learning-rate": "0.05",
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": json.dumps(f"s3://{bucket}/src/sourcedir.tar.gz"),
            "sagemaker_container_log_level": "20",
            **(hps or {}),
        },
        "InputDataConfig": [
            {
                "ChannelName": "train",
                "ContentType": "text/csv",
                "DataSource": {"S3DataSource": {"S3Uri": f"s3://{bucket}/data/train/"}},
            }
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "StoppingCondition": {"MaxRuntimeInSeconds": 600},
    }


def _arrange(s3: Any, bucket: str, files: dict[str, bytes]) -> None:
    s3.put_object(Bucket=bucket, Key="src/sourcedir.tar.gz", Body=tar_gz(files))
    s3.put_object(Bucket=bucket, Key="data/train/a.csv", Body=b"1,2\n")


def _run(tmp_path: Path, s3_env: dict, spec: dict, **extra: str) -> subprocess.CompletedProcess:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **s3_env,
        "TORCHBAY_ROOT": str(tmp_path / "ml"),
        "TORCHBAY_PYTHON": sys.executable,
        "TORCHBAY_JOB": str(spec_file),
        "TORCHBAY_SAMPLE_INTERVAL": "0",
        "TORCHBAY_GRACE_PERIOD": "10",
        **extra,
    }
    return subprocess.run(
        [str(TRAIN)], env=env, capture_output=True, timeout=240, cwd=str(REPO), check=False
    )


def _object(s3: Any, bucket: str, key: str) -> str:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def _keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def test_environment_script_runs_and_equals_the_real_toolkit(
    tmp_path: Path, bucket: str, s3, s3_env: dict, reference_toolkit: Path
) -> None:
    _arrange(s3, bucket, {"train.py": ENVIRONMENT_SCRIPT.encode()})
    done = _run(
        tmp_path, s3_env, _spec(bucket, hps={"sagemaker_torch_distributed_enabled": "true"})
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "training on algo-1 of ['algo-1'] (master algo-1): ['a.csv']" in done.stdout.decode()
    root = tmp_path / "ml"
    seen = json.loads((root / "output" / "data" / "seen.json").read_text())
    assert seen["model_dir"] == f"{root}/model" == seen["environ"]["SM_MODEL_DIR"]
    assert seen["hyperparameters"] == {"epochs": 2, "learning-rate": 0.05}
    assert seen["job_name"] == "toolkit-job"
    # The real toolkit, on the same tree, in a process with the environment the script had.
    code = (
        "import json, sys\nfrom sagemaker_training import environment\nenv = "
        "environment.Environment()\n"
        f"record = {{name: getattr(env, name) for name in {PROPERTIES!r}}}\n"
        "record['to_env_vars()'] = env.to_env_vars()\nrecord['to_cmd_args()'] = env.to_cmd_args()\n"
        "json.dump(record, sys.stdout)\n"
    )
    environ = {k: v for k, v in seen["environ"].items() if k != "PYTHONPATH"}
    real = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, "PYTHONPATH": str(reference_toolkit)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(root / "code"),
        check=False,
    )
    assert real.returncode == 0, real.stderr[-3000:]
    expected = json.loads(real.stdout)
    assert [
        name
        for name in [*PROPERTIES, "to_cmd_args()", "to_env_vars()"]
        if seen[name] != expected[name]
    ] == []
    # The agent's own SM_* variables (what scripts that read os.environ see) agree with the
    # toolkit's too.
    agent_vars = {name: seen["environ"].get(name) for name in expected["to_env_vars()"]}
    assert {
        k: (v, expected["to_env_vars()"][k])
        for k, v in agent_vars.items()
        if v != expected["to_env_vars()"][k] and k != "SM_TRAINING_ENV"
    } == {}
    agent_env = json.loads(seen["environ"]["SM_TRAINING_ENV"])
    real_env = json.loads(expected["to_env_vars()"]["SM_TRAINING_ENV"])
    assert {k: (agent_env.get(k), v) for k, v in real_env.items() if agent_env.get(k) != v} == {}


def test_sagemaker_containers_script(tmp_path: Path, bucket: str, s3, s3_env: dict) -> None:
    _arrange(s3, bucket, {"train.py": CONTAINERS_SCRIPT.encode()})
    done = _run(tmp_path, s3_env, _spec(bucket, hps={"nz": "16"}))
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "1 host(s), this is algo-1, 0 GPU(s)" in done.stdout.decode()
    assert (tmp_path / "ml" / "model" / "generator.txt").read_text() == "nz=16 data=['a.csv']"
    assert _object(s3, bucket, "out/toolkit-job/output/success-algo-1") == ""
    log = _object(s3, bucket, "out/toolkit-job/output/job-algo-1.log")
    assert "[algo-1:0] 1 host(s), this is algo-1" in log and "[algo-1:agent] " in log


def test_old_flask_pin_is_refused_and_the_agent_stays_intact(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    before = metadata.version("flask")
    _arrange(
        s3,
        bucket,
        {"train.py": b"print('never runs')\n", "requirements.txt": b"numpy\nflask==1.1.1\n"},
    )
    done = _run(tmp_path, s3_env, _spec(bucket))
    assert done.returncode == 75, done.stderr.decode()[-3000:]
    failure = (tmp_path / "ml" / "output" / "failure").read_text()
    assert failure.startswith("PackageConflictError: requirements.txt asks for flask==1.1.1")
    assert f"Flask>=2.3 (installed: {before}" in failure
    assert metadata.version("flask") == before
    # The host that failed at pip explains itself from S3.
    assert _object(s3, bucket, "out/toolkit-job/output/failure-algo-1") == failure
    log = _object(s3, bucket, "out/toolkit-job/output/job-algo-1.log")
    assert "[algo-1:agent] " in log and "PackageConflictError" in log and "flask==1.1.1" in log
    assert "never runs" not in done.stdout.decode()


def _wheel(name: str, requires: str) -> bytes:
    """A minimal pure-Python wheel of ``name`` 0.1 that requires ``requires``."""
    import base64
    import hashlib
    import io
    import zipfile

    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\nRequires-Dist: {requires}\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        record = []
        for path, data in files.items():
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        archive.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return buffer.getvalue()


def test_a_package_that_pulls_an_old_flask_is_stopped_by_pip(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    before = metadata.version("flask")
    _arrange(
        s3,
        bucket,
        {
            "train.py": b"print('never runs')\n",
            "requirements.txt": b"./oldapp-0.1-py3-none-any.whl\n",
            "oldapp-0.1-py3-none-any.whl": _wheel("oldapp", "flask==1.1.1"),
        },
    )
    done = _run(tmp_path, s3_env, _spec(bucket), PIP_NO_INDEX="1")
    assert done.returncode == 75, done.stderr.decode()[-3000:]
    failure = (tmp_path / "ml" / "output" / "failure").read_text()
    assert (
        "oldapp (from requirements.txt) depends on flask==1.1.1, but TorchBay itself needs "
        "Flask>=2.3" in failure
    )
    assert metadata.version("flask") == before
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("oldapp")


def test_failed_staging_leaves_log_and_failure_in_s3(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    _arrange(s3, bucket, {"train.py": b"print('never runs')\n"})
    spec = _spec(bucket)
    spec["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = (
        f"s3://{bucket}/data/absent/"
    )
    done = _run(tmp_path, s3_env, spec)
    assert done.returncode == 66, done.stderr.decode()[-3000:]
    assert "ChannelError" in _object(s3, bucket, "out/toolkit-job/output/failure-algo-1")
    log = _object(s3, bucket, "out/toolkit-job/output/job-algo-1.log")
    assert "[algo-1:agent] " in log and "data/absent" in log
    assert "out/toolkit-job/output/success-algo-1" not in _keys(s3, bucket, "out/")


def test_failed_host_wait_leaves_log_and_failure_in_s3(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    _arrange(s3, bucket, {"train.py": b"print('never runs')\n"})
    done = _run(
        tmp_path,
        s3_env,
        _spec(bucket),
        TORCHBAY_HOSTS="127.0.0.1,localhost",
        TORCHBAY_CURRENT_HOST="localhost",
        TORCHBAY_HOST_WAIT_TIMEOUT="1",
        TORCHBAY_MASTER_PORT=str(free_port()),
    )
    assert done.returncode == 68, done.stderr.decode()[-3000:]
    failure = _object(s3, bucket, "out/toolkit-job/output/failure-localhost")
    assert "DistributedError" in failure and "127.0.0.1" in failure
    log = _object(s3, bucket, "out/toolkit-job/output/job-localhost.log")
    assert "[localhost:agent] " in log and "DistributedError" in log


def test_bad_code_uri_leaves_log_and_failure_in_s3(
    tmp_path: Path, bucket: str, s3, s3_env: dict
) -> None:
    spec = _spec(
        bucket, hps={"sagemaker_submit_directory": json.dumps(f"s3://{bucket}/src/missing.tar.gz")}
    )
    done = _run(tmp_path, s3_env, spec)
    assert done.returncode != 0
    assert "missing.tar.gz" in _object(s3, bucket, "out/toolkit-job/output/failure-algo-1")
    assert "[algo-1:agent] " in _object(s3, bucket, "out/toolkit-job/output/job-algo-1.log")


def test_serve_with_a_sagemaker_inference_module(tmp_path: Path) -> None:
    from tests.serving.conftest import Server, make_mlp

    root = tmp_path / "ml"
    make_mlp(root / "model" / "model.pt")
    code = root / "model" / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(
        textwrap.dedent("""
        import json

        import torch
        from sagemaker_inference import content_types, decoder, encoder, errors


        def model_fn(model_dir):
            # make_mlp writes a torch.export program
            return torch.export.load(f"{model_dir}/model.pt").module()


        def input_fn(input_data, content_type):
            if content_type not in (content_types.JSON, content_types.CSV, content_types.NPY):
                raise errors.UnsupportedFormatError(content_type)
            return torch.tensor(decoder.decode(input_data, content_type), dtype=torch.float32)


        def predict_fn(data, model):
            if data.shape[-1] != 4:
                raise errors.GenericInferenceToolkitError(
                    422, f"expected 4 features, got {data.shape[-1]}"
                )
            with torch.no_grad():
                return model(data)


        def output_fn(prediction, accept):
            if accept in ("*/*", ""):
                accept = content_types.JSON
            return encoder.encode(prediction.numpy(), accept), accept
        """)
    )
    server = Server(root, {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}, [], tmp_path / "serve.log")
    try:
        server.wait_healthy()
        status, headers, body = server.post(b"[[1, 2, 3, 4]]", accept="application/json")
        assert status == 200, body
        assert (
            headers["content-type"].startswith("application/json") and len(json.loads(body)[0]) == 3
        )
        status, headers, body = server.post(
            b"1,2,3,4\n5,6,7,8\n", content_type="text/csv", accept="text/csv"
        )
        assert status == 200 and [line.count(",") for line in body.decode().splitlines()] == [
            2,
            2,
        ], body
        status, _, body = server.post(b"[[1, 2]]")
        assert status == 422 and b"expected 4 features" in body, body
        status, _, body = server.post(b"x", content_type="text/plain")
        assert status == 415, body
    finally:
        server.stop()

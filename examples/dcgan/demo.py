"""The demo behind ``scripts/demo``: the DCGAN job from data in S3 to a served model, on one
machine.

Makes a small image set, uploads it to an embedded S3 server (moto on 127.0.0.1), trains with
2 processes through ``torchbay train`` (DDP over Gloo), serves the model with ``torchbay serve``,
asks it to turn noise into images, and prints where everything is. ``--docker IMAGE`` runs the
train and serve steps with ``docker run`` of a TorchBay image instead (host network).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from make_data import make_images  # noqa: E402
from train import save_grid  # noqa: E402  (needs torch; the demo's venv has it)

CREDS = {
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
BUCKET = "torchbay-demo"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(REPO / "demo-output"), help="where everything goes (emptied first)"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument(
        "--docker",
        metavar="IMAGE",
        help="run train/serve with `docker run IMAGE` (and IMAGE-serve)",
    )
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited with {proc.returncode} before listening") from None
            time.sleep(0.2)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen, grace: float = 20) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _sourcedir() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name in ("train.py", "model.py", "inference.py", "requirements.txt"):
            archive.add(HERE / name, arcname=name)
    return buf.getvalue()


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.path.dirname(sys.executable))
    if not found:
        raise SystemExit(
            f"{name} is not installed next to {sys.executable}; run scripts/demo (it installs "
            "TorchBay)"
        )
    return found


def _docker_run(name: str, env: dict, *args: str) -> list[str]:
    """``docker run`` of one demo step: host network (the S3 server is on 127.0.0.1), named so it
    can be removed whatever happens, the environment passed explicitly."""
    return [
        os.environ.get("DOCKER", "docker"),
        "run",
        "--rm",
        "--name",
        name,
        "--network",
        "host",
        *[a for k, v in env.items() if k not in ("PATH", "HOME") for a in ("-e", f"{k}={v}")],
        *args,
    ]


def _docker_cleanup(names: list[str], image: str, root: Path) -> None:
    """Remove the demo's containers (an interrupted run leaves them) and give the files the train
    container wrote as root under ``root`` back to the user running the demo."""
    docker = os.environ.get("DOCKER", "docker")
    for name in names:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=60, check=False)
    if os.getuid() != 0 and root.is_dir():
        subprocess.run(
            [
                docker,
                "run",
                "--rm",
                "-v",
                f"{root}:/opt/ml",
                image,
                "chown",
                "-R",
                f"{os.getuid()}:{os.getgid()}",
                "/opt/ml",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    s3_port = _free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONUNBUFFERED": "1",
        **CREDS,
        "AWS_ENDPOINT_URL": endpoint,
    }
    moto = subprocess.Popen(
        [_tool("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=open(out / "logs" / "s3.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=base_env,
    )
    serve = None
    root = out / "ml"
    containers = [f"torchbay-demo-{step}-{os.getpid()}" for step in ("train", "serve")]
    try:
        _wait_port(s3_port, moto, 60, "the local S3 server (moto)")
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)
        images = make_images(args.images, 32, seed=0)
        for k, shard in enumerate(np.array_split(images, 4)):
            buf = io.BytesIO()
            np.save(buf, shard)
            s3.put_object(
                Bucket=BUCKET, Key=f"data/training/images-{k:03d}.npy", Body=buf.getvalue()
            )
        s3.put_object(Bucket=BUCKET, Key="code/sourcedir.tar.gz", Body=_sourcedir())
        print(
            f"demo: {args.images} images (32x32) and the code uploaded to s3://{BUCKET}/ on "
            f"{endpoint}",
            flush=True,
        )

        job = {
            "TrainingJobName": "dcgan-demo",
            "HyperParameters": {
                "sagemaker_program": '"train.py"',
                "sagemaker_submit_directory": json.dumps(f"s3://{BUCKET}/code/sourcedir.tar.gz"),
                "sagemaker_torch_distributed_enabled": "true",
                "epochs": str(args.epochs),
                "image-size": "32",
                "ngf": "32",
                "ndf": "32",
                "batch-size": "32",
            },
            "AlgorithmSpecification": {
                "MetricDefinitions": [
                    {"Name": "loss_D", "Regex": r"loss_D=([0-9.]+)"},
                    {"Name": "loss_G", "Regex": r"loss_G=([0-9.]+)"},
                    {"Name": "batch_time", "Regex": r"batch_time=([0-9.]+)"},
                ]
            },
            "InputDataConfig": [
                {
                    "ChannelName": "training",
                    "DataSource": {"S3DataSource": {"S3Uri": f"s3://{BUCKET}/data/training/"}},
                }
            ],
            "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/output"},
            "TensorBoardOutputConfig": {"S3OutputPath": f"s3://{BUCKET}/tensorboard"},
            "StoppingCondition": {"MaxRuntimeInSeconds": 900},
        }
        train_env = {
            **base_env,
            "TORCHBAY_JOB": json.dumps(job),
            "TORCHBAY_NPROC_PER_NODE": "2",
            "TORCHBAY_SAMPLE_INTERVAL": "5",
        }
        if args.docker:
            root.mkdir(parents=True)
            cmd = _docker_run(
                containers[0], train_env, "-v", f"{root}:/opt/ml", args.docker, "train"
            )
        else:
            train_env["TORCHBAY_ROOT"] = str(root)
            cmd = [_tool("torchbay"), "train"]
        print(f"demo: training with 2 processes: {' '.join(cmd[:2])} ...", flush=True)
        with open(out / "logs" / "train.log", "wb") as log:
            proc = subprocess.Popen(
                cmd,
                env=train_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
            code = proc.wait()
        if code != 0:
            print(
                f"demo: training failed with exit code {code}; see {out / 'logs' / 'train.log'}",
                file=sys.stderr,
            )
            return code
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
        model_key = next(k for k in keys if k.endswith("model.tar.gz"))

        port = _free_port()
        serve_env = {
            **base_env,
            "TORCHBAY_MODEL_URI": f"s3://{BUCKET}/{model_key}",
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "TORCHBAY_SERVE_HOST": "127.0.0.1",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        }
        if args.docker:
            cmd = _docker_run(containers[1], serve_env, f"{args.docker}-serve", "serve")
        else:
            serve_env["TORCHBAY_ROOT"] = str(out / "serve-ml")
            cmd = [_tool("torchbay"), "serve"]
        serve = subprocess.Popen(
            cmd,
            env=serve_env,
            stdout=open(out / "logs" / "serve.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_port(port, serve, 120, "torchbay serve")
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit(
                    f"torchbay serve never became ready; see {out / 'logs' / 'serve.log'}"
                )
            time.sleep(0.5)
        noise = np.random.default_rng(0).standard_normal((16, 100)).astype(np.float32)
        body = io.BytesIO()
        np.save(body, noise)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body.getvalue(),
            headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            generated = np.load(io.BytesIO(response.read()), allow_pickle=False)
        gen_dir = out / "generated"
        gen_dir.mkdir()
        import torch

        save_grid(
            torch.from_numpy(generated).permute(0, 3, 1, 2).float().div(127.5).sub(1),
            str(gen_dir / "grid.png"),
        )
        np.save(gen_dir / "images.npy", generated)
        print(
            f"demo: the served generator turned noise {noise.shape} into images {generated.shape}",
            flush=True,
        )
        _stop(serve)
        serve = None

        for key in keys:  # what the job left in S3, mirrored locally
            target = out / "s3" / key
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, key, str(target))
        local = root / "output"
        job_log, board = local / "torchbay" / "job.log", local / "tensorboard"
        s3_out = f"s3://{BUCKET}/output/dcgan-demo/"
        print(f"""
demo: done in {time.monotonic() - started:.0f} s. Where things are:
  logs              {out / "logs"} (train.log, serve.log); the job log {job_log}
  metrics           {local / "torchbay" / "metrics.jsonl"}; in S3 under {s3_out}
  TensorBoard       {board} and s3://{BUCKET}/tensorboard/  (tensorboard --logdir {board})
  sample grids      {local / "data" / "samples"} (also in output.tar.gz)
  model             {root / "model" / "model.pt2"}; s3://{BUCKET}/{model_key}
  generated images  {gen_dir / "grid.png"} and {gen_dir / "images.npy"}
  everything in S3  mirrored under {out / "s3"}""")
        return 0
    finally:
        if serve is not None:
            _stop(serve)
        _stop(moto, 10)
        if args.docker:
            _docker_cleanup(containers, args.docker, root)


if __name__ == "__main__":
    raise SystemExit(main())

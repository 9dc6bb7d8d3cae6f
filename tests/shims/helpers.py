"""A SageMaker-shaped tree and a child Python that has the toolkit stand-ins as a user script has
them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.shims import BOOT_DIR

# The tree of the measured reference (shared/reference/sm-training-env-example.md).
REFERENCE_HPS = {
    "epochs": "2",
    "lr": "0.1",
    "flag": "true",
    "batch-size": "32",
    "name": '"dcgan"',
    "sagemaker_program": '"train.py"',
    "sagemaker_container_log_level": "20",
    "sagemaker_job_name": '"example-job"',
    "sagemaker_region": '"us-east-1"',
}
REFERENCE_CHANNELS = {
    "train": {
        "ContentType": "text/csv",
        "TrainingInputMode": "File",
        "S3DistributionType": "FullyReplicated",
        "RecordWrapperType": "None",
    },
    "eval": {
        "TrainingInputMode": "File",
        "S3DistributionType": "FullyReplicated",
        "RecordWrapperType": "None",
    },
}


def resource(current: str, hosts: Sequence[str], instance_type: str = "ml.m5.large") -> dict:
    return {
        "current_host": current,
        "current_instance_type": instance_type,
        "current_group_name": "homogeneousCluster",
        "hosts": list(hosts),
        "instance_groups": [
            {
                "instance_group_name": "homogeneousCluster",
                "instance_type": instance_type,
                "hosts": list(hosts),
            }
        ],
        "network_interface_name": "eth0",
    }


def make_tree(
    root: Path,
    *,
    hps: dict | None = None,
    channels: dict | None = None,
    resource_config: dict | None = None,
) -> Path:
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (root / "code").mkdir(exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(REFERENCE_HPS if hps is None else hps))
    (config / "inputdataconfig.json").write_text(
        json.dumps(REFERENCE_CHANNELS if channels is None else channels)
    )
    (config / "resourceconfig.json").write_text(
        json.dumps(resource_config or resource("localhost", ["localhost"]))
    )
    return root


def user_python(
    code: str,
    root: Path,
    *,
    env: Mapping[str, str] | None = None,
    pythonpath: Sequence[str] = (),
    cwd: Path | None = None,
    python: str = sys.executable,
) -> subprocess.CompletedProcess:
    """Run ``code`` as the user's process runs: the boot folder at the end of PYTHONPATH,
    SAGEMAKER_BASE_DIR set."""
    child = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SAGEMAKER_BASE_DIR": str(root),
        "PYTHONPATH": os.pathsep.join([*pythonpath, str(BOOT_DIR)]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    child.update(env or {})
    return subprocess.run(
        [python, "-c", code],
        env=child,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(cwd or root),
        check=False,
    )


DUMP = """
import json, sys
from sagemaker_training import environment
env = environment.Environment()
out = {name: getattr(env, name) for name in env.properties()}
out["to_env_vars()"] = env.to_env_vars()
out["to_cmd_args()"] = env.to_cmd_args()
out["dict(env)"] = dict(env)
json.dump(out, sys.stdout, sort_keys=True)
"""

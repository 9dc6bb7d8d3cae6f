"""The real toolkits, installed by the tests into a folder of their own, for the differential tests.

``pip install --no-deps --target`` of the pinned releases (pure Python but for one small C
extension), cached under this venv (``<venv>/torchbay-reference/``): their imports (boto3, numpy)
come from the test venv, nothing lands in it. Without PyPI the tests skip with the reason; in CI
(CI=true) they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REFERENCE = {"sagemaker-training": "5.1.4", "sagemaker-inference": "1.10.1", "six": "1.17.0"}
_TAG = "-".join(f"{name}-{version}" for name, version in REFERENCE.items())


@pytest.fixture(scope="session")
def reference_toolkit() -> Path:
    """A folder to put on PYTHONPATH that holds the real sagemaker_training and
    sagemaker_inference."""
    folder = Path(sys.prefix) / "torchbay-reference" / _TAG
    if (folder / "sagemaker_training" / "environment.py").is_file():
        return folder
    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pins = [f"{name}=={version}" for name, version in REFERENCE.items()]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(staging),
            *pins,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        reason = (
            f"pip could not install the reference toolkits {pins}: {done.stderr.strip()[-500:]}"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        staging.rename(folder)
    except OSError:  # another session finished first
        shutil.rmtree(staging, ignore_errors=True)
    return folder

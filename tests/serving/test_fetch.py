"""Fetching model.tar.gz (file:// and s3:// on the real moto server) and installing requirements
once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import InstallError, UnsafePathError
from agent.serving.fetch import fetch_model, install_requirements
from tests.helpers import tar_gz


def test_fetch_from_file_uri_once(tmp_path: Path) -> None:
    (tmp_path / "model.tar.gz").write_bytes(
        tar_gz({"model.pt": b"weights", "code/inference.py": b"x = 1\n"})
    )
    model_dir = tmp_path / "model"
    assert fetch_model(f"file://{tmp_path}/model.tar.gz", model_dir) is True
    assert (model_dir / "model.pt").read_bytes() == b"weights"
    assert (model_dir / "code" / "inference.py").exists()
    assert (
        fetch_model(f"file://{tmp_path}/model.tar.gz", model_dir) is False
    )  # same archive: not again


def test_fetch_from_s3(tmp_path: Path, bucket: str, s3, s3_server) -> None:
    s3.put_object(Bucket=bucket, Key="jobs/j1/output/model.tar.gz", Body=tar_gz({"model.pt": b"w"}))
    model_dir = tmp_path / "model"
    fetch_model(
        f"s3://{bucket}/jobs/j1/output/model.tar.gz", model_dir, endpoint_url=s3_server.endpoint
    )
    assert (model_dir / "model.pt").read_bytes() == b"w"


def test_fetch_refuses_hostile_archive(tmp_path: Path) -> None:
    (tmp_path / "evil.tar.gz").write_bytes(tar_gz({"../escape.txt": b"x"}))
    with pytest.raises(UnsafePathError):
        fetch_model(f"file://{tmp_path}/evil.tar.gz", tmp_path / "model")
    assert not (tmp_path / "escape.txt").exists()


def test_requirements_installed_once_per_content(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "requirements.txt").write_text("numpy\n")  # already installed: pip needs no network
    env = dict(os.environ)
    assert install_requirements(code, env=env, stamp_dir=tmp_path / "stamp") is True
    assert install_requirements(code, env=env, stamp_dir=tmp_path / "stamp") is False
    (code / "requirements.txt").write_text(
        "this-package-does-not-exist-torchbay==0.0.1 ; python_version < '3'\n"
    )
    assert (
        install_requirements(code, env=env, stamp_dir=tmp_path / "stamp") is True
    )  # changed: installed again


def test_failing_requirements_raise_install_error(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "requirements.txt").write_text("--this-is-not-a-pip-option\n")
    with pytest.raises(InstallError, match="fix the file"):
        install_requirements(code, env=dict(os.environ), stamp_dir=tmp_path / "stamp")

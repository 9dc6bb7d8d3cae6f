"""Fetching the user's code (file:// and a real S3 server) and installing its requirements with real
pip."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from agent.code import FETCHED, INSTALLED, KEPT, NOTHING, SKIPPED, fetch_code, install_requirements
from agent.errors import InstallError, StorageError, UnsafePathError
from agent.job import Job, load_job
from tests.helpers import tar_gz

LOG = logging.getLogger("test")


def _job(tmp_path: Path, hps: dict, **env: str) -> Job:
    spec = {
        "TrainingJobName": "code",
        "HyperParameters": {k: json.dumps(v) for k, v in hps.items()},
    }
    return load_job({"TORCHBAY_ROOT": str(tmp_path / "ml"), **env}, json.dumps(spec))


def test_no_source_does_nothing(tmp_path: Path) -> None:
    assert fetch_code(_job(tmp_path, {}), log=LOG) == NOTHING


def test_s3_tarball_fetched_then_skipped_then_refetched(tmp_path: Path, bucket: str, s3) -> None:
    s3.put_object(
        Bucket=bucket,
        Key="src/sourcedir.tar.gz",
        Body=tar_gz({"train.py": b"v1", "pkg/m.py": b"m"}),
    )
    job = _job(tmp_path, {"sagemaker_submit_directory": f"s3://{bucket}/src/sourcedir.tar.gz"})
    code = job.layout.code_dir
    assert fetch_code(job, log=LOG) == FETCHED
    assert (code / "train.py").read_bytes() == b"v1" and (code / "pkg" / "m.py").exists()
    assert fetch_code(job, log=LOG) == SKIPPED  # a restart on the same machine
    s3.put_object(
        Bucket=bucket, Key="src/sourcedir.tar.gz", Body=tar_gz({"train.py": b"v2-longer"})
    )
    assert fetch_code(job, log=LOG) == FETCHED
    assert (code / "train.py").read_bytes() == b"v2-longer" and not (code / "pkg").exists()


def test_folder_and_single_file_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "train.py").write_text("x")
    (src / "sub" / "a.py").write_text("a")
    job = _job(tmp_path, {"sagemaker_submit_directory": f"file://{src}"})
    assert fetch_code(job, log=LOG) == FETCHED
    assert (job.layout.code_dir / "sub" / "a.py").read_text() == "a"
    other = tmp_path / "other"
    single = tmp_path / "single" / "run.py"
    single.parent.mkdir()
    single.write_text("print(1)")
    job2 = load_job(
        {"TORCHBAY_ROOT": str(other)},
        json.dumps(
            {"TrainingJobName": "c", "HyperParameters": {"sagemaker_submit_directory": str(single)}}
        ),
    )
    assert fetch_code(job2, log=LOG) == FETCHED
    assert (other / "code" / "run.py").read_text() == "print(1)"


def test_code_already_in_place_is_kept(tmp_path: Path) -> None:
    tarball = tmp_path / "s.tar.gz"
    tarball.write_bytes(tar_gz({"train.py": b"new"}))
    job = _job(tmp_path, {"sagemaker_submit_directory": f"file://{tarball}"})
    job.layout.code_dir.mkdir(parents=True)
    (job.layout.code_dir / "train.py").write_text("baked into the image")
    assert fetch_code(job, log=LOG) == KEPT
    assert (job.layout.code_dir / "train.py").read_text() == "baked into the image"


@pytest.mark.parametrize(
    "files, links",
    [
        ({"../evil.py": b"x"}, {}),
        ({"/tmp/abs-evil.py": b"x"}, {}),
        ({}, {"link": "../../outside"}),
    ],
)
def test_hostile_tarball_writes_nothing_outside_code(
    tmp_path: Path, files: dict, links: dict
) -> None:
    tarball = tmp_path / "evil.tar.gz"
    tarball.write_bytes(tar_gz({"ok.py": b"fine", **files}, links))
    job = _job(tmp_path, {"sagemaker_submit_directory": f"file://{tarball}"})
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    with pytest.raises(UnsafePathError):
        fetch_code(job, log=LOG)
    after = sorted(
        p
        for p in tmp_path.rglob("*")
        if (p.is_file() or p.is_symlink()) and "torchbay" not in p.parts
    )
    assert [p for p in after if p not in before] == []
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/abs-evil.py").exists()
    assert not any(job.layout.code_dir.iterdir())


def test_missing_source(tmp_path: Path) -> None:
    job = _job(tmp_path, {"sagemaker_submit_directory": f"file://{tmp_path}/absent.tar.gz"})
    with pytest.raises(StorageError, match="does not exist"):
        fetch_code(job, log=LOG)


def _code_job(tmp_path: Path, requirements: str) -> Job:
    job = _job(
        tmp_path, {}, PIP_NO_INDEX="1", PATH=os.environ.get("PATH", "")
    )  # offline: never reach an index
    job.layout.code_dir.mkdir(parents=True, exist_ok=True)
    (job.layout.code_dir / "requirements.txt").write_text(requirements)
    return job


def test_requirements_installed_once_then_skipped(tmp_path: Path) -> None:
    job = _code_job(tmp_path, "psutil\n")  # already in the venv: pip succeeds without an index
    assert install_requirements(job, log=LOG, python=sys.executable) == INSTALLED
    assert install_requirements(job, log=LOG, python=sys.executable) == SKIPPED
    (job.layout.code_dir / "requirements.txt").write_text("psutil\nwatchdog\n")
    assert install_requirements(job, log=LOG, python=sys.executable) == INSTALLED


def test_failing_requirements_give_pips_last_lines(tmp_path: Path) -> None:
    job = _code_job(tmp_path, "torchbay-no-such-package-xyz==9.9.9\n")
    with pytest.raises(InstallError) as info:
        install_requirements(job, log=LOG, python=sys.executable)
    message = str(info.value)
    assert "requirements.txt" in message and "exit code" in message
    assert "torchbay-no-such-package-xyz" in message  # pip's own words
    assert not (
        job.layout.agent_dir / "install.json"
    ).exists()  # a failed install is retried next time


def test_nothing_to_install(tmp_path: Path) -> None:
    assert install_requirements(_job(tmp_path, {}), log=LOG) == NOTHING

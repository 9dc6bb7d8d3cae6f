"""The train lifecycle, driven through ``main(argv, env=..., out=...)`` with file:// URIs and real
processes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent.training import FAILURE_REASON_MAX, failure_reason, main


def _job(tmp_path: Path, script: str, **spec_extra) -> tuple[dict[str, str], Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "train.py").write_text(script)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "x.csv").write_text("1\n")
    spec = {
        "TrainingJobName": "t",
        "HyperParameters": {
            "sagemaker_program": "train.py",
            "sagemaker_submit_directory": f"file://{src}",
        },
        "InputDataConfig": [
            {"ChannelName": "train", "DataSource": {"S3DataSource": {"S3Uri": f"file://{data}"}}}
        ],
        "OutputDataConfig": {"S3OutputPath": f"file://{tmp_path}/out"},
        **spec_extra,
    }
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TORCHBAY_ROOT": str(tmp_path / "ml"),
        "TORCHBAY_JOB": json.dumps(spec),
        "TORCHBAY_SAMPLE_INTERVAL": "0",
    }
    return env, tmp_path / "ml"


def test_failure_reason_leads_with_the_exception_and_fits_the_cap() -> None:
    tail = ["noise " * 40] * 30 + [
        "Traceback (most recent call last):",
        '  File "t.py", line 1, in <module>',
        "    boom()",
        "RuntimeError: CUDA out of memory",
    ]
    reason = failure_reason(1, tail, argv=["/venv/bin/python", "/ml/code/t.py", "--x", "1"])
    assert reason.startswith(
        "RuntimeError: CUDA out of memory\nThe training script failed with exit code 1"
    )
    assert reason.endswith("RuntimeError: CUDA out of memory")  # the newest stderr lines are kept
    assert len(reason) <= FAILURE_REASON_MAX


def test_failure_reason_for_a_signal_and_custom_exceptions() -> None:
    reason = failure_reason(137, ["Killed"])
    assert "SIGKILL" in reason and "OOM" in reason
    tail = ["Traceback (most recent call last):", "  x", "mypkg.Boom: it broke"]
    assert failure_reason(1, tail).startswith("mypkg.Boom: it broke")
    assert failure_reason(143, [], stopped="the agent got SIGTERM").count("SIGTERM") == 2


def test_success_then_restart_reuses_code(tmp_path: Path) -> None:
    script = "import os; open(os.environ['SM_MODEL_DIR'] + '/m', 'w').write('w'); print('hello')\n"
    env, root = _job(tmp_path, script)
    out = io.BytesIO()
    assert main([], env=env, out=out) == 0
    assert b"hello" in out.getvalue()
    assert (root / "output" / "success").exists()
    with tarfile.open(tmp_path / "out" / "t" / "output" / "model.tar.gz") as archive:
        assert archive.getnames() == ["m"]
    assert (
        json.loads((root / "input" / "config" / "hyperparameters.json").read_text())[
            "sagemaker_program"
        ]
        == '"train.py"'
    )
    assert main([], env=env, out=io.BytesIO()) == 0  # a restart on the same machine


def test_a_failure_file_written_by_the_script_is_kept(tmp_path: Path) -> None:
    script = (
        "import os, sys\nopen(os.path.join(os.environ['SM_OUTPUT_DIR'], 'failure'), 'w')"
        ".write('my own reason')\nsys.exit(2)\n"
    )
    env, root = _job(tmp_path, script)
    assert main([], env=env, out=io.BytesIO()) == 2
    assert (root / "output" / "failure").read_text() == "my own reason"


def test_max_runtime_stops_the_script(tmp_path: Path) -> None:
    env, root = _job(
        tmp_path, "import time\ntime.sleep(120)\n", StoppingCondition={"MaxRuntimeInSeconds": 1}
    )
    env["TORCHBAY_GRACE_PERIOD"] = "10"
    assert main([], env=env, out=io.BytesIO()) == 143
    assert "MaxRuntimeInSeconds (1 s)" in (root / "output" / "failure").read_text()
    assert (tmp_path / "out" / "t" / "output" / "model.tar.gz").exists()


def test_sagemaker_mode_reads_the_config_files(tmp_path: Path) -> None:
    root = tmp_path / "ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "data" / "train").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "code" / "train.py").write_text(
        "import os; print(os.environ['SM_CHANNEL_TRAIN'], os.environ['SM_HP_LR'])\n"
    )
    (root / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({"lr": "0.5", "sagemaker_program": '"train.py"'})
    )
    (root / "input" / "config" / "inputdataconfig.json").write_text(
        json.dumps(
            {
                "train": {
                    "TrainingInputMode": "File",
                    "S3DistributionType": "FullyReplicated",
                    "RecordWrapperType": "None",
                }
            }
        )
    )
    (root / "input" / "config" / "resourceconfig.json").write_text(
        json.dumps(
            {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}
        )
    )
    out = io.BytesIO()
    assert (
        main(
            [],
            env={
                "PATH": os.environ.get("PATH", ""),
                "SAGEMAKER_BASE_DIR": str(root),
                "TORCHBAY_SAMPLE_INTERVAL": "0",
            },
            out=out,
        )
        == 0
    )
    assert f"{root}/input/data/train 0.5".encode() in out.getvalue()
    assert (root / "output" / "success").exists()


def test_no_job_at_all_is_a_config_error(tmp_path: Path) -> None:
    assert main([], env={"TORCHBAY_ROOT": str(tmp_path)}, out=io.BytesIO()) == 78
    assert "no job to run" in (tmp_path / "output" / "failure").read_text()


def test_the_agent_imports_neither_torch_nor_boto3_for_a_file_job(tmp_path: Path) -> None:
    env, _ = _job(tmp_path, "print('ok')\n")
    check = (
        "import io, json, os, sys\nfrom agent.training import main\n"
        f"code = main([], env=json.loads({json.dumps(json.dumps(env))}), out=io.BytesIO())\n"
        "print(json.dumps([code, 'torch' in sys.modules, 'boto3' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        timeout=120,
        cwd=str(Path(__file__).resolve().parents[1]),
        check=False,
    )
    assert json.loads(done.stdout.decode().strip().splitlines()[-1]) == [0, False, False], (
        done.stderr.decode()
    )


def test_a_failed_upload_fails_a_successful_job_and_still_writes_the_status(tmp_path: Path) -> None:
    env, root = _job(tmp_path, "print('fine')\n")
    spec = json.loads(env["TORCHBAY_JOB"])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    spec["OutputDataConfig"]["S3OutputPath"] = f"file://{blocker}"
    env["TORCHBAY_JOB"] = json.dumps(spec)
    code = main([], env=env, out=io.BytesIO())
    assert code in (69, 70)  # StorageError, or an internal error from the file backend
    assert "model.tar.gz" in (root / "output" / "failure").read_text()
    assert not (root / "output" / "success").exists()


_C_WRITER = r"""
#include <signal.h>
#include <stdio.h>
int main(void) {
    for (int i = 0; i < 5; i++) printf("c-line %d\n", i);
    fprintf(stderr, "c-error line\n");
    raise(SIGKILL);  /* no exit(): whatever stdio still buffers is lost */
    return 0;
}
"""


@pytest.mark.parametrize("line_buffer", ["true", "false"])
def test_c_stdio_lines_survive_sigkill_under_stdbuf(tmp_path: Path, line_buffer: str) -> None:
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which("stdbuf") is None:
        pytest.skip("needs a C compiler and coreutils stdbuf")
    src = tmp_path / "writer.c"
    src.write_text(_C_WRITER)
    code = tmp_path / "code"
    code.mkdir()
    subprocess.run([cc, "-o", str(code / "writer"), str(src)], check=True)
    spec = {
        "TrainingJobName": "c",
        "HyperParameters": {
            "sagemaker_program": "writer",
            "sagemaker_submit_directory": f"file://{code}",
        },
        "OutputDataConfig": {"S3OutputPath": f"file://{tmp_path}/out"},
    }
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TORCHBAY_ROOT": str(tmp_path / "ml"),
        "TORCHBAY_JOB": json.dumps(spec),
        "TORCHBAY_SAMPLE_INTERVAL": "0",
        "TORCHBAY_LINE_BUFFER": line_buffer,
    }
    out = io.BytesIO()
    assert main([], env=env, out=out) == 137
    lines = [line for line in out.getvalue().decode().splitlines() if "c-line" in line]
    if line_buffer == "true":
        assert lines == [f"[algo-1:0] c-line {i}" for i in range(5)]
    else:  # the block-buffered C stdio of a killed process: what stdbuf is there to prevent
        assert lines == []
    assert "c-error line" in (tmp_path / "ml" / "output" / "failure").read_text()

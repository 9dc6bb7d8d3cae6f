"""The user's environment and arguments, against what sagemaker-training 5.1.4 gives a script.

The expected values are the ones measured with the toolkit
(shared/reference/sm-training-env-example.md).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.environment import (
    detect_gpus,
    entry_command,
    resolve_entry_point,
    user_args,
    user_environment,
)
from agent.errors import EntryPointError
from agent.job import load_job

HPS = {
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
INPUT = {
    "train": {
        "ContentType": "text/csv",
        "RecordWrapperType": "None",
        "S3DistributionType": "FullyReplicated",
        "TrainingInputMode": "File",
    },
    "eval": {
        "RecordWrapperType": "None",
        "S3DistributionType": "FullyReplicated",
        "TrainingInputMode": "File",
    },
}
RESOURCE = {
    "current_host": "localhost",
    "current_instance_type": "ml.m5.large",
    "current_group_name": "homogeneousCluster",
    "hosts": ["localhost"],
    "instance_groups": [
        {
            "instance_group_name": "homogeneousCluster",
            "instance_type": "ml.m5.large",
            "hosts": ["localhost"],
        }
    ],
    "network_interface_name": "eth0",
}


@pytest.fixture
def sm_root(tmp_path: Path) -> Path:
    root = tmp_path / "opt" / "ml"
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(HPS))
    (config / "inputdataconfig.json").write_text(json.dumps(INPUT))
    (config / "resourceconfig.json").write_text(json.dumps(RESOURCE))
    (root / "code").mkdir()
    (root / "code" / "train.py").write_text("print('hi')\n")
    return root


def test_arguments_match_the_toolkit(sm_root: Path) -> None:
    job = load_job({"SAGEMAKER_BASE_DIR": str(sm_root)})
    assert user_args(job) == [
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--flag",
        "True",
        "--lr",
        "0.1",
        "--name",
        "dcgan",
    ]


def test_one_letter_and_dict_hyperparameters(tmp_path: Path) -> None:
    spec = {
        "TrainingJobName": "x",
        "HyperParameters": {"k": "3", "opts": json.dumps({"b": 2, "a": "x"}), "none": "null"},
    }
    job = load_job({"TORCHBAY_ROOT": str(tmp_path)}, json.dumps(spec))
    assert user_args(job) == ["-k", "3", "--none", "", "--opts", "a=x,b=2"]


def test_sm_variables_match_the_toolkit(sm_root: Path) -> None:
    job = load_job({"SAGEMAKER_BASE_DIR": str(sm_root), "PATH": "/usr/bin"})
    entry = resolve_entry_point(job)
    env = user_environment(job, entry, num_gpus=0)
    r = str(sm_root)
    expected = {
        "SM_CHANNELS": '["eval","train"]',
        "SM_CHANNEL_EVAL": f"{r}/input/data/eval",
        "SM_CHANNEL_TRAIN": f"{r}/input/data/train",
        "SM_CURRENT_HOST": "localhost",
        "SM_CURRENT_INSTANCE_GROUP": "homogeneousCluster",
        "SM_CURRENT_INSTANCE_GROUP_HOSTS": '["localhost"]',
        "SM_CURRENT_INSTANCE_TYPE": "ml.m5.large",
        "SM_DISTRIBUTION_INSTANCE_GROUPS": "[]",
        "SM_FRAMEWORK_MODULE": "",
        "SM_FRAMEWORK_PARAMS": "{}",
        "SM_HOSTS": '["localhost"]',
        "SM_HPS": '{"batch-size":32,"epochs":2,"flag":true,"lr":0.1,"name":"dcgan"}',
        "SM_HP_BATCH-SIZE": "32",
        "SM_HP_EPOCHS": "2",
        "SM_HP_FLAG": "true",
        "SM_HP_LR": "0.1",
        "SM_HP_NAME": "dcgan",
        "SM_INPUT_CONFIG_DIR": f"{r}/input/config",
        "SM_INPUT_DATA_CONFIG": (
            '{"eval":{"RecordWrapperType":"None","S3DistributionType":"FullyReplicated",'
            '"TrainingInputMode":"File"},"train":{"ContentType":"text/csv",'
            '"RecordWrapperType":"None","S3DistributionType":"FullyReplicated",'
            '"TrainingInputMode":"File"}}'
        ),
        "SM_INPUT_DIR": f"{r}/input",
        "SM_INSTANCE_GROUPS": '["homogeneousCluster"]',
        "SM_INSTANCE_GROUPS_DICT": (
            '{"homogeneousCluster":{"hosts":["localhost"],"instance_group_name":'
            '"homogeneousCluster","instance_type":"ml.m5.large"}}'
        ),
        "SM_IS_HETERO": "false",
        "SM_LOG_LEVEL": "20",
        "SM_MODEL_DIR": f"{r}/model",
        "SM_MODULE_DIR": f"{r}/code",
        "SM_MODULE_NAME": "train",
        "SM_NETWORK_INTERFACE_NAME": "eth0",
        "SM_NUM_CPUS": str(os.cpu_count()),
        "SM_NUM_GPUS": "0",
        "SM_NUM_NEURONS": "0",
        "SM_OUTPUT_DATA_DIR": f"{r}/output/data",
        "SM_OUTPUT_DIR": f"{r}/output",
        "SM_OUTPUT_INTERMEDIATE_DIR": f"{r}/output/intermediate",
        "SM_RESOURCE_CONFIG": (
            '{"current_group_name":"homogeneousCluster","current_host":"localhost",'
            '"current_instance_type":"ml.m5.large","hosts":["localhost"],"instance_groups":'
            '[{"hosts":["localhost"],"instance_group_name":"homogeneousCluster","instance_type":'
            '"ml.m5.large"}],"network_interface_name":"eth0"}'
        ),
        "SM_USER_ARGS": (
            '["--batch-size","32","--epochs","2","--flag","True","--lr","0.1","--name","dcgan"]'
        ),
        "SM_USER_ENTRY_POINT": "train.py",
    }
    for key, value in expected.items():
        assert env[key] == value, key
    # Our one addition: a shell-safe alias for names the shell cannot spell.
    extra = {k for k in env if k.startswith("SM_")} - set(expected) - {"SM_TRAINING_ENV"}
    assert extra == {"SM_HP_BATCH_SIZE"}
    training = json.loads(env["SM_TRAINING_ENV"])
    assert training["hyperparameters"] == {
        "batch-size": 32,
        "epochs": 2,
        "flag": True,
        "lr": 0.1,
        "name": "dcgan",
    }
    assert training["master_hostname"] == "localhost" and training["is_master"] is True
    assert training["user_entry_point"] == "train.py" and training["topology"] == []
    assert training["job_name"] == "example-job"
    assert env["CURRENT_HOST"] == "localhost" and env["SAGEMAKER_REGION"] == "us-east-1"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/usr/bin"


def test_pythonpath_is_extended_and_credentials_stay_out_of_training_env(sm_root: Path) -> None:
    secret = "very-secret-key-value"
    job = load_job(
        {
            "SAGEMAKER_BASE_DIR": str(sm_root),
            "PYTHONPATH": "/site/a:/site/b",
            "AWS_SECRET_ACCESS_KEY": secret,
            "TORCHBAY_JOB": "",
        }
    )
    entry = resolve_entry_point(job)
    env = user_environment(job, entry, {"MASTER_ADDR": "algo-1"})
    from agent.shims import BOOT_DIR

    assert env["PYTHONPATH"] == f"{sm_root}/code:/site/a:/site/b:{BOOT_DIR}"
    assert env["AWS_SECRET_ACCESS_KEY"] == secret  # the script may need credentials itself
    assert all(secret not in v for k, v in env.items() if k.startswith("SM_"))
    assert env["MASTER_ADDR"] == "algo-1"


def test_spec_environment_and_framework_params(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "t.py").write_text("")
    spec = {
        "TrainingJobName": "j",
        "Environment": {"FOO": "bar"},
        "HyperParameters": {
            "sagemaker_program": "t.py",
            "sagemaker_torch_distributed_enabled": "true",
            "sagemaker_submit_directory": "s3://b/src.tar.gz",
        },
    }
    job = load_job({"TORCHBAY_ROOT": str(tmp_path)}, json.dumps(spec))
    env = user_environment(job, resolve_entry_point(job))
    assert env["FOO"] == "bar"
    assert env["SM_FRAMEWORK_PARAMS"] == '{"sagemaker_torch_distributed_enabled":true}'
    assert env["SM_HPS"] == "{}" and env["SM_USER_ARGS"] == "[]"
    assert env["SM_MODULE_DIR"] == "s3://b/src.tar.gz"  # the toolkit reports the submit directory


def _job_with_program(tmp_path: Path, program: str):
    spec = {"TrainingJobName": "j", "HyperParameters": {"sagemaker_program": json.dumps(program)}}
    return load_job({"TORCHBAY_ROOT": str(tmp_path)}, json.dumps(spec))


def test_entry_point_kinds(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("")
    (code / "run.sh").write_text("echo hi\n")
    tool = code / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    script = resolve_entry_point(_job_with_program(tmp_path, "train.py"))
    assert entry_command(script, ["--a", "1"], python="py") == [
        "py",
        str(code / "train.py"),
        "--a",
        "1",
    ]
    module = resolve_entry_point(_job_with_program(tmp_path, "-m pkg.train"))
    assert (module.kind, module.module_name) == ("module", "pkg.train")
    assert entry_command(module, [], python="py") == ["py", "-m", "pkg.train"]
    shell = resolve_entry_point(_job_with_program(tmp_path, "run.sh"))
    assert entry_command(shell, ["x"]) == ["/bin/sh", str(code / "run.sh"), "x"]
    assert entry_command(resolve_entry_point(_job_with_program(tmp_path, "tool")), []) == [
        str(tool)
    ]


@pytest.mark.parametrize(
    "program, words",
    [
        ("missing.py", ["'missing.py' not found", "sagemaker_program"]),
        ("../escape.py", ["'..'"]),
        ("-m not a module", ["not a module name"]),
        ("data.bin", ["not executable"]),
    ],
)
def test_entry_point_errors(tmp_path: Path, program: str, words: list) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "data.bin").write_text("")
    with pytest.raises(EntryPointError) as info:
        resolve_entry_point(_job_with_program(tmp_path, program))
    for word in words:
        assert word in str(info.value)


def test_no_entry_point(tmp_path: Path) -> None:
    job = load_job({"TORCHBAY_ROOT": str(tmp_path)}, '{"TrainingJobName": "j"}')
    with pytest.raises(EntryPointError, match="sagemaker_program"):
        resolve_entry_point(job)


def test_gpu_count_from_devices_and_visibility(tmp_path: Path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).write_text("")
    assert detect_gpus({}, dev=tmp_path) == 2
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "1"}, dev=tmp_path) == 1
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}, dev=tmp_path) == 0
    assert detect_gpus({}, dev=tmp_path / "absent") == 0


def test_channel_uri_is_given_to_the_script(tmp_path: Path) -> None:
    spec = {
        "TrainingJobName": "x",
        "HyperParameters": {"sagemaker_program": '"train.py"'},
        "InputDataConfig": [
            {
                "ChannelName": "train-set",
                "DataSource": {
                    "S3DataSource": {"S3Uri": "s3://bucket/data/train", "S3DataType": "S3Prefix"}
                },
            }
        ],
    }
    job = load_job({"TORCHBAY_ROOT": str(tmp_path)}, json.dumps(spec))
    (tmp_path / "code").mkdir(exist_ok=True)
    (tmp_path / "code" / "train.py").write_text("print(1)\n")
    env = user_environment(job, resolve_entry_point(job), num_gpus=0)
    assert env["TORCHBAY_CHANNEL_TRAIN_SET_URI"] == "s3://bucket/data/train"
    assert env["SM_CHANNEL_TRAIN-SET"].endswith("input/data/train-set")

"""The job contract: specs and SageMaker-shaped config files into one frozen Job."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent.errors import ConfigError, JobSpecError
from agent.job import load_job, write_config_files

SPEC = {
    "TrainingJobName": "dcgan-1",
    "HyperParameters": {
        "epochs": "2",
        "lr": "0.1",
        "name": '"dcgan"',
        "raw": "plain",
        "sagemaker_program": '"train.py"',
    },
    "AlgorithmSpecification": {
        "TrainingInputMode": "File",
        "MetricDefinitions": [{"Name": "loss", "Regex": "loss=(\\S+)"}],
    },
    "InputDataConfig": [
        {
            "ChannelName": "train",
            "ContentType": "text/csv",
            "ShuffleConfig": {"Seed": 7},
            "DataSource": {
                "S3DataSource": {
                    "S3Uri": "s3://b/train",
                    "S3DataType": "S3Prefix",
                    "S3DataDistributionType": "ShardedByS3Key",
                }
            },
        },
        {
            "ChannelName": "eval",
            "InputMode": "Pipe",
            "CompressionType": "Gzip",
            "DataSource": {"S3DataSource": {"S3Uri": "file:///data/eval"}},
        },
    ],
    "OutputDataConfig": {"S3OutputPath": "s3://b/out"},
    "CheckpointConfig": {"S3Uri": "s3://b/ckpt"},
    "TensorBoardOutputConfig": {"S3OutputPath": "s3://b/tb", "LocalPath": "/tmp/tb"},
    "ResourceConfig": {"InstanceCount": 2, "InstanceType": "ml.m5.large"},
    "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    "Environment": {"MY_VAR": "x"},
}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"TORCHBAY_ROOT": str(tmp_path / "ml"), **extra}


def test_spec_file_becomes_a_frozen_job(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(SPEC))
    job = load_job(_env(tmp_path, TORCHBAY_CURRENT_HOST="algo-2"), str(spec_file))
    assert job.name == "dcgan-1" and not job.on_sagemaker
    assert job.layout.root == tmp_path / "ml"
    assert dict(job.hyperparameters) == {
        "epochs": 2,
        "lr": 0.1,
        "name": "dcgan",
        "raw": "plain",
        "sagemaker_program": "train.py",
    }
    train, evalc = job.channels
    assert (
        train.name,
        train.uri,
        train.distribution,
        train.content_type,
        train.shuffle_seed,
        train.input_mode,
    ) == ("train", "s3://b/train", "ShardedByS3Key", "text/csv", 7, "File")
    assert (evalc.input_mode, evalc.compression, evalc.uri) == ("Pipe", "Gzip", "file:///data/eval")
    assert job.resource.hosts == ("algo-1", "algo-2") and job.resource.current_host == "algo-2"
    assert job.resource.current_instance_type == "ml.m5.large"
    assert job.output_path == "s3://b/out" and job.job_output_uri == "s3://b/out/dcgan-1/output"
    assert (
        job.checkpoint_uri == "s3://b/ckpt"
        and job.checkpoint_local_path == tmp_path / "ml" / "checkpoints"
    )
    assert job.tensorboard_uri == "s3://b/tb" and job.tensorboard_local_path == Path("/tmp/tb")
    assert job.max_runtime == 3600.0 and job.instance_count == 2
    assert dict(job.environment) == {"MY_VAR": "x"}
    assert job.metric_definitions[0].name == "loss"
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.hyperparameters["epochs"] = 3  # type: ignore[index]


def test_inline_json_from_the_environment(tmp_path: Path) -> None:
    job = load_job(_env(tmp_path, TORCHBAY_JOB=json.dumps({"TrainingJobName": "inline"})))
    assert job.name == "inline" and job.resource.hosts == ("algo-1",) and job.channels == ()


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda s: s.update(Bogus=1), ["unknown key 'Bogus'"]),
        (
            lambda s: s["InputDataConfig"][0]["DataSource"]["S3DataSource"].update(S3uri="x"),
            ["InputDataConfig[0].DataSource.S3DataSource.S3uri", "S3Uri"],
        ),
        (
            lambda s: s["ResourceConfig"].update(InstanceCount="2"),
            ["ResourceConfig.InstanceCount", "an integer"],
        ),
        (
            lambda s: s["StoppingCondition"].update(MaxRuntimeInSeconds=True),
            ["MaxRuntimeInSeconds"],
        ),
        (lambda s: s.pop("TrainingJobName"), ["missing required key 'TrainingJobName'"]),
        (lambda s: s["InputDataConfig"][1].pop("ChannelName"), ["InputDataConfig[1].ChannelName"]),
        (
            lambda s: s["InputDataConfig"][0].update(InputMode="Stream"),
            ["InputDataConfig[0].InputMode", "Pipe"],
        ),
        (
            lambda s: s["OutputDataConfig"].update(S3OutputPath="b/out"),
            ["OutputDataConfig.S3OutputPath", "s3://"],
        ),
        (lambda s: s["Environment"].update(N=1), ["Environment.N", "a string"]),
    ],
)
def test_bad_fields_name_the_key_and_the_file(tmp_path: Path, mutate, words) -> None:
    spec = json.loads(json.dumps(SPEC))
    mutate(spec)
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(JobSpecError) as info:
        load_job(_env(tmp_path), str(spec_file))
    for word in [*words, str(spec_file)]:
        assert word in str(info.value)


def test_spec_that_is_not_json_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(JobSpecError, match="not valid JSON"):
        load_job(_env(tmp_path), str(bad))
    with pytest.raises(JobSpecError, match="does not exist"):
        load_job(_env(tmp_path), str(tmp_path / "missing.json"))


def test_hosts_from_settings(tmp_path: Path) -> None:
    spec = json.dumps({"TrainingJobName": "h"})
    job = load_job(_env(tmp_path, TORCHBAY_HOSTS="a, b", TORCHBAY_CURRENT_HOST="b"), spec)
    assert job.resource.hosts == ("a", "b") and job.resource.host_index == 1
    with pytest.raises(ConfigError, match="TORCHBAY_CURRENT_HOST='c'"):
        load_job(_env(tmp_path, TORCHBAY_HOSTS="a,b", TORCHBAY_CURRENT_HOST="c"), spec)


def test_config_files_round_trip_as_sagemaker_writes_them(tmp_path: Path) -> None:
    spec_job = load_job(_env(tmp_path), json.dumps(SPEC))
    write_config_files(spec_job)
    config = tmp_path / "ml" / "input" / "config"
    hps = json.loads((config / "hyperparameters.json").read_text())
    assert (
        hps["epochs"] == "2"
        and hps["name"] == '"dcgan"'
        and hps["sagemaker_program"] == '"train.py"'
    )
    data = json.loads((config / "inputdataconfig.json").read_text())
    assert data["train"] == {
        "ContentType": "text/csv",
        "RecordWrapperType": "None",
        "S3DistributionType": "ShardedByS3Key",
        "TrainingInputMode": "File",
    }
    assert data["eval"]["TrainingInputMode"] == "Pipe" and data["eval"]["CompressionType"] == "Gzip"
    resource = json.loads((config / "resourceconfig.json").read_text())
    assert resource["current_host"] == "algo-1" and resource["hosts"] == ["algo-1", "algo-2"]
    assert resource["instance_groups"][0]["instance_type"] == "ml.m5.large"
    # Without a spec the same files are read back: SageMaker mode, data already in place.
    job = load_job(_env(tmp_path, TRAINING_JOB_NAME="from-env"))
    assert job.on_sagemaker and job.name == "from-env"
    assert dict(job.hyperparameters) == dict(spec_job.hyperparameters)
    assert [(c.name, c.uri, c.input_mode) for c in job.channels] == [
        ("eval", None, "Pipe"),
        ("train", None, "File"),
    ]
    assert job.resource == spec_job.resource
    assert job.output_path is None and job.checkpoint_uri is None


def test_sagemaker_base_dir_is_honoured_and_torchbay_root_wins(tmp_path: Path) -> None:
    spec = json.dumps({"TrainingJobName": "r"})
    assert load_job({"SAGEMAKER_BASE_DIR": "/sm"}, spec).layout.root == Path("/sm")
    assert load_job(
        {"SAGEMAKER_BASE_DIR": "/sm", "TORCHBAY_ROOT": "/tb"}, spec
    ).layout.root == Path("/tb")
    assert load_job({}, spec).layout.root == Path("/opt/ml")


def test_malformed_or_missing_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no job to run"):
        load_job(_env(tmp_path))
    config = tmp_path / "ml" / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text("{oops")
    with pytest.raises(ConfigError, match="hyperparameters.json is not valid JSON"):
        load_job(_env(tmp_path))
    (config / "hyperparameters.json").write_text('{"a": "1"}')
    (config / "resourceconfig.json").write_text('{"hosts": ["x"]}')
    with pytest.raises(ConfigError, match="resourceconfig.json is malformed"):
        load_job(_env(tmp_path))
    (config / "resourceconfig.json").write_text('{"hosts": ["x"], "current_host": "x"}')
    job = load_job(_env(tmp_path))
    assert job.resource.current_host == "x" and job.hyperparameters["a"] == 1 and job.channels == ()


def test_metric_regexes_compile_in_load_job_naming_the_regex_and_the_definition(
    tmp_path: Path,
) -> None:
    spec = json.loads(json.dumps(SPEC))
    spec["AlgorithmSpecification"]["MetricDefinitions"].append({"Name": "acc", "Regex": "acc=("})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as info:
        load_job(_env(tmp_path), str(spec_file))
    message = str(info.value)
    for word in ("'acc'", "'acc=('", "does not compile", "MetricDefinitions[1]", str(spec_file)):
        assert word in message, (word, message)

    setting = json.dumps([{"Name": "ok", "Regex": "ok=(\\d+)"}, {"Name": "bad", "Regex": "[z"}])
    with pytest.raises(ConfigError) as info:
        load_job(_env(tmp_path, TORCHBAY_METRIC_DEFINITIONS=setting), json.dumps(SPEC))
    message = str(info.value)
    for word in ("TORCHBAY_METRIC_DEFINITIONS[1]", "'bad'", "'[z'", "does not compile"):
        assert word in message, (word, message)


def test_the_settings_metric_definitions_join_the_jobs_the_spec_winning(tmp_path: Path) -> None:
    setting = json.dumps(
        [{"Name": "loss", "Regex": "other=(\\S+)"}, {"Name": "lr", "Regex": "lr=(\\S+)"}]
    )
    job = load_job(_env(tmp_path, TORCHBAY_METRIC_DEFINITIONS=setting), json.dumps(SPEC))
    assert [(d.name, d.regex) for d in job.metric_definitions] == [
        ("loss", "loss=(\\S+)"),
        ("lr", "lr=(\\S+)"),
    ]
    assert job.metric_definitions[0].pattern.search("step 3 loss=0.5").group(1) == "0.5"


def test_settings_are_typed_parts_read_once(tmp_path: Path) -> None:
    job = load_job(_env(tmp_path, TORCHBAY_DATA_THREADS="3"), json.dumps(SPEC))
    assert job.settings.data.data_threads == 3
    assert job.settings.general.root == str(tmp_path / "ml")
    assert job.settings.source("data_threads") == "TORCHBAY_DATA_THREADS"
    assert job.settings.source("pipe_epochs") == "default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.settings.data.data_threads = 4  # type: ignore[misc]

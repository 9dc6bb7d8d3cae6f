"""The job spec: a CreateTrainingJob-shaped JSON (a file or inline), validated and read into a Job.

Also the reader of SageMaker's MetricDefinitions JSON (``parse_definitions``), for the
TORCHBAY_METRIC_DEFINITIONS setting.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, JobSpecError
from agent.job.files import decode_hyperparameters, encode_hyperparameter, hosts_from_settings
from agent.job.shapes import Channel, Job, Layout, MetricDefinition, Resource, frozen_map
from agent.redact import looks_secret
from agent.settings import Settings

__all__ = ["check_schema", "job_from_spec", "parse_definitions"]

# Keys of CreateTrainingJob that TorchBay reads. A schema node is a type, a tuple of types, a dict
# (an object: key -> node, "*required" -> required keys) or a one-element list (an array of node).
_ANY_SCALAR = (str, int, float, bool)
_S3_DATA_SOURCE = {
    "S3Uri": str,
    "S3DataType": str,
    "S3DataDistributionType": str,
    "AttributeNames": [str],
    "InstanceGroupNames": [str],
    "*required": ("S3Uri",),
}
_CHANNEL = {
    "ChannelName": str,
    "DataSource": {"S3DataSource": _S3_DATA_SOURCE, "*required": ("S3DataSource",)},
    "ContentType": str,
    "CompressionType": str,
    "RecordWrapperType": str,
    "InputMode": str,
    "ShuffleConfig": {"Seed": int, "*required": ("Seed",)},
    "*required": ("ChannelName", "DataSource"),
}
_SPEC_SCHEMA = {
    "TrainingJobName": str,
    "HyperParameters": {"*values": _ANY_SCALAR},
    "AlgorithmSpecification": {
        "TrainingInputMode": str,
        "TrainingImage": str,
        "AlgorithmName": str,
        "MetricDefinitions": [{"Name": str, "Regex": str, "*required": ("Name", "Regex")}],
        "EnableSageMakerMetricsTimeSeries": bool,
        "ContainerEntrypoint": [str],
        "ContainerArguments": [str],
    },
    "InputDataConfig": [_CHANNEL],
    "OutputDataConfig": {
        "S3OutputPath": str,
        "KmsKeyId": str,
        "CompressionType": str,
        "*required": ("S3OutputPath",),
    },
    "CheckpointConfig": {"S3Uri": str, "LocalPath": str, "*required": ("S3Uri",)},
    "TensorBoardOutputConfig": {
        "S3OutputPath": str,
        "LocalPath": str,
        "*required": ("S3OutputPath",),
    },
    "ResourceConfig": {
        "InstanceCount": int,
        "InstanceType": str,
        "VolumeSizeInGB": int,
        "VolumeKmsKeyId": str,
        "KeepAlivePeriodInSeconds": int,
    },
    "StoppingCondition": {
        "MaxRuntimeInSeconds": int,
        "MaxWaitTimeInSeconds": int,
        "MaxPendingTimeInSeconds": int,
    },
    "Environment": {"*values": str},
    # Accepted for compatibility with real requests; they mean nothing outside SageMaker.
    "RoleArn": str,
    "Tags": [{"Key": str, "Value": str}],
    "VpcConfig": dict,
    "EnableNetworkIsolation": bool,
    "EnableInterContainerTrafficEncryption": bool,
    "EnableManagedSpotTraining": bool,
    "RetryStrategy": dict,
    "DebugHookConfig": dict,
    "ProfilerConfig": dict,
    "ExperimentConfig": dict,
    "*required": ("TrainingJobName",),
}
_INPUT_MODES = ("File", "Pipe", "FastFile")
_DISTRIBUTIONS = ("FullyReplicated", "ShardedByS3Key")
_S3_DATA_TYPES = ("S3Prefix", "ManifestFile", "AugmentedManifestFile")
_COMPRESSIONS = ("None", "Gzip")
_RECORD_WRAPPERS = ("None", "RecordIO")
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "an array",
}


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return "a string, number or boolean"
    return _TYPE_NAMES.get(expected, getattr(expected, "__name__", str(expected)))


def check_schema(
    value: Any,
    schema: Any,
    source: str,
    *,
    kind: str = "job spec",
    request: str = "CreateTrainingJob",
) -> None:
    """Validate ``value`` against a schema node (see _SPEC_SCHEMA); raises JobSpecError naming the
    key path and
    the source, never a value that may be secret. The transform spec (agent/transform/spec.py) uses
    it too."""

    def fail(what: str) -> None:
        raise JobSpecError(f"{kind} {source}: {what}; see the {request} fields in the README")

    _check(value, schema, "", fail)


def _check(value: Any, node: Any, path: str, fail: Callable[[str], None]) -> None:
    if isinstance(node, dict):
        if not isinstance(value, dict):
            fail(
                f"{path or 'the spec'} must be an object, got "
                f"{type(value).__name__}{_shown(path, value)}"
            )
        values_node = node.get("*values")
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if values_node is not None:
                _check(item, values_node, where, fail)
            elif key.startswith("*") or key not in node:
                known = ", ".join(k for k in node if not k.startswith("*"))
                fail(f"unknown key {where!r} (known here: {known})")
            else:
                _check(item, node[key], where, fail)
        for key in node.get("*required", ()):
            if key not in value:
                fail(f"missing required key {(path + '.' if path else '') + key!r}")
        return
    if isinstance(node, list):
        if not isinstance(value, list):
            fail(f"{path} must be an array, got {type(value).__name__}{_shown(path, value)}")
        for index, item in enumerate(value):
            _check(item, node[0], f"{path}[{index}]", fail)
        return
    accepted = node if isinstance(node, tuple) else (node,)
    ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
    if node is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        fail(f"{path} must be {_type_name(node)}, got {type(value).__name__}{_shown(path, value)}")


def _shown(path: str, value: Any) -> str:
    """`` <value>`` for an error message, or nothing where the value may be a secret: fields whose
    names look
    secret, and every Environment and HyperParameters value (the message names the field and the
    type)."""
    name = path.rsplit(".", 1)[-1].split("[", 1)[0]
    if looks_secret(name) or path.split(".", 1)[0] in ("Environment", "HyperParameters"):
        return ""
    return " " + _short(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choice(value: str, allowed: tuple[str, ...], path: str, source: str) -> str:
    if value not in allowed:
        raise JobSpecError(
            f"job spec {source}: {path} is {value!r}; use one of {', '.join(allowed)}"
        )
    return value


def _read_spec(text: str, source: str) -> dict[str, Any]:
    try:
        spec: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as err:
        raise JobSpecError(f"job spec {source} is not valid JSON: {err}; fix the JSON") from err
    check_schema(spec, _SPEC_SCHEMA, source)
    return spec


def _spec_text(job_arg: str, origin: str) -> tuple[str, str]:
    """(text, source) for a job argument that is a path or inline JSON; ``origin`` names where it
    came from."""
    if job_arg.lstrip().startswith("{"):
        return job_arg, f"{origin} (inline JSON)"
    path = Path(job_arg)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise JobSpecError(
            f"job spec file {job_arg} does not exist; give --job a path or the JSON itself"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobSpecError(
            f"job spec file {job_arg} cannot be read: {err}; check the path and permissions"
        ) from err


def job_from_spec(
    job_arg: str, origin: str, layout: Layout, settings: Settings, env: Mapping[str, str]
) -> Job:
    """The job in ``job_arg`` (a path or inline JSON; ``origin`` names where it came from); raises
    JobSpecError."""
    text, source = _spec_text(job_arg, origin)
    return _job_from_spec(_read_spec(text, source), source, layout, settings, env)


def _job_from_spec(
    spec: Mapping[str, Any], source: str, layout: Layout, settings: Settings, env: Mapping[str, str]
) -> Job:
    algo = spec.get("AlgorithmSpecification", {})
    input_mode = _choice(
        algo.get("TrainingInputMode", "File"),
        _INPUT_MODES,
        "AlgorithmSpecification.TrainingInputMode",
        source,
    )
    channels = []
    seen: set[str] = set()
    for index, item in enumerate(spec.get("InputDataConfig", [])):
        where = f"InputDataConfig[{index}]"
        name = item["ChannelName"]
        if not name or "/" in name or name in (".", "..") or name in seen:
            raise JobSpecError(
                f"job spec {source}: {where}.ChannelName {name!r} is empty, repeated or not a "
                "plain name; give each channel a unique name without '/'"
            )
        seen.add(name)
        s3 = item["DataSource"]["S3DataSource"]
        channels.append(
            Channel(
                name=name,
                uri=s3["S3Uri"],
                s3_data_type=_choice(
                    s3.get("S3DataType", "S3Prefix"),
                    _S3_DATA_TYPES,
                    f"{where}.DataSource.S3DataSource.S3DataType",
                    source,
                ),
                distribution=_choice(
                    s3.get("S3DataDistributionType", "FullyReplicated"),
                    _DISTRIBUTIONS,
                    f"{where}.DataSource.S3DataSource.S3DataDistributionType",
                    source,
                ),
                input_mode=_choice(
                    item.get("InputMode", input_mode), _INPUT_MODES, f"{where}.InputMode", source
                ),
                content_type=item.get("ContentType"),
                compression=_choice(
                    item.get("CompressionType", "None"),
                    _COMPRESSIONS,
                    f"{where}.CompressionType",
                    source,
                ),
                record_wrapper=_choice(
                    item.get("RecordWrapperType", "None"),
                    _RECORD_WRAPPERS,
                    f"{where}.RecordWrapperType",
                    source,
                ),
                shuffle_seed=item.get("ShuffleConfig", {}).get("Seed"),
            )
        )
    resource_spec = spec.get("ResourceConfig", {})
    instance_count = resource_spec.get("InstanceCount", 1)
    if instance_count < 1:
        raise JobSpecError(
            f"job spec {source}: ResourceConfig.InstanceCount is {instance_count}; use 1 or more"
        )
    current, hosts = hosts_from_settings(settings, instance_count)
    instance_type = resource_spec.get("InstanceType", "local")
    group = "homogeneousCluster"
    resource = Resource(
        current_host=current,
        hosts=hosts,
        network_interface_name=settings.train.network_interface,
        current_instance_type=instance_type,
        current_group_name=group,
        instance_groups=(
            frozen_map(
                {"instance_group_name": group, "instance_type": instance_type, "hosts": list(hosts)}
            ),
        ),
    )
    stopping = spec.get("StoppingCondition", {})
    max_runtime = stopping.get("MaxRuntimeInSeconds")
    if max_runtime is not None and max_runtime <= 0:
        raise JobSpecError(
            f"job spec {source}: StoppingCondition.MaxRuntimeInSeconds is {max_runtime}; "
            "use a positive number of seconds"
        )
    checkpoint = spec.get("CheckpointConfig", {})
    tensorboard = spec.get("TensorBoardOutputConfig", {})
    name = spec["TrainingJobName"]
    if not name or "/" in name:
        raise JobSpecError(
            f"job spec {source}: TrainingJobName {name!r} is empty or contains '/'; "
            "use letters, digits and hyphens"
        )
    for path, uri in (
        ("OutputDataConfig.S3OutputPath", spec.get("OutputDataConfig", {}).get("S3OutputPath")),
        ("CheckpointConfig.S3Uri", checkpoint.get("S3Uri")),
        ("TensorBoardOutputConfig.S3OutputPath", tensorboard.get("S3OutputPath")),
        *(
            (f"InputDataConfig[{i}].DataSource.S3DataSource.S3Uri", c.uri)
            for i, c in enumerate(channels)
        ),
    ):
        if uri is not None and not (uri.startswith(("s3://", "file://"))):
            raise JobSpecError(
                f"job spec {source}: {path} is {uri!r}; use s3://bucket/prefix or file:///path"
            )
    return Job(
        name=name,
        layout=layout,
        settings=settings,
        resource=resource,
        hyperparameters=frozen_map(
            decode_hyperparameters(
                {
                    k: v if isinstance(v, str) else encode_hyperparameter(v)
                    for k, v in spec.get("HyperParameters", {}).items()
                }
            )
        ),
        channels=tuple(channels),
        input_mode=input_mode,
        output_path=spec.get("OutputDataConfig", {}).get("S3OutputPath"),
        checkpoint_uri=checkpoint.get("S3Uri"),
        checkpoint_local_path=Path(checkpoint["LocalPath"])
        if checkpoint.get("LocalPath")
        else (layout.checkpoints_dir if checkpoint else None),
        tensorboard_uri=tensorboard.get("S3OutputPath"),
        tensorboard_local_path=Path(tensorboard["LocalPath"])
        if tensorboard.get("LocalPath")
        else (layout.tensorboard_dir if tensorboard else None),
        instance_count=instance_count,
        max_runtime=float(max_runtime) if max_runtime is not None else None,
        environment=frozen_map(spec.get("Environment", {})),
        metric_definitions=_spec_definitions(algo.get("MetricDefinitions", []), source),
        on_sagemaker=False,
        base_env=frozen_map(env),
    )


def _spec_definitions(items: list[dict[str, str]], source: str) -> tuple[MetricDefinition, ...]:
    out = []
    for index, item in enumerate(items):
        try:
            out.append(MetricDefinition(item["Name"], item["Regex"]))
        except ConfigError as err:
            raise ConfigError(
                f"job spec {source}: AlgorithmSpecification.MetricDefinitions[{index}]: "
                f"{err.message}"
            ) from err
    return tuple(out)


def parse_definitions(
    text: str | None, source: str = "TORCHBAY_METRIC_DEFINITIONS"
) -> tuple[MetricDefinition, ...]:
    """Parse SageMaker's ``[{"Name": ..., "Regex": ...}]`` JSON, each regex compiled; raises
    ConfigError naming ``source`` (and the definition and regex of one that does not compile)."""
    if not text:
        return ()
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(
            f"{source}: not JSON ({err}); give a list like "
            '[{"Name": "train:loss", "Regex": "loss=(\\\\S+)"}]'
        ) from err
    if not isinstance(data, list):
        raise ConfigError(
            f"{source}: expected a JSON list of {{Name, Regex}} objects, got {type(data).__name__}"
        )
    out = []
    for index, item in enumerate(data):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("Name"), str)
            or not isinstance(item.get("Regex"), str)
        ):
            raise ConfigError(
                f"{source}[{index}]: expected an object with string Name and Regex, got {item!r}"
            )
        try:
            out.append(MetricDefinition(item["Name"], item["Regex"]))
        except ConfigError as err:
            raise ConfigError(f"{source}[{index}]: {err.message}") from err
    return tuple(out)

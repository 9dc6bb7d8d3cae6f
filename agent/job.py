"""The job contract, parsed once into frozen, typed objects.

The shapes here are shared by every part of the agent (data, telemetry, distributed,
checkpoints, training). ``load_job`` is the only reader of the config files, the
job spec and the environment.
"""

from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from agent.errors import ConfigError, JobSpecError
from agent.settings import Settings, read_settings

__all__ = ["Layout", "Channel", "Resource", "MetricDefinition", "Job", "load_job", "write_config_files",
           "decode_hyperparameters", "resource_config"]


def _frozen_map(data: Optional[Mapping[str, Any]] = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(data or {}))


@dataclass(frozen=True)
class Layout:
    """The SageMaker folder layout under one root (``/opt/ml`` by default)."""

    root: Path

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def config_dir(self) -> Path:
        return self.root / "input" / "config"

    @property
    def hyperparameters_file(self) -> Path:
        return self.config_dir / "hyperparameters.json"

    @property
    def inputdataconfig_file(self) -> Path:
        return self.config_dir / "inputdataconfig.json"

    @property
    def resourceconfig_file(self) -> Path:
        return self.config_dir / "resourceconfig.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "input" / "data"

    def channel_dir(self, name: str) -> Path:
        """``input/data/<name>``: where a File-mode channel is staged."""
        return self.data_dir / name

    def pipe_path(self, name: str, epoch: int) -> Path:
        """``input/data/<name>_<epoch>``: a Pipe-mode FIFO."""
        return self.data_dir / f"{name}_{epoch}"

    @property
    def code_dir(self) -> Path:
        return self.root / "code"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.root / "output" / "data"

    @property
    def intermediate_dir(self) -> Path:
        return self.root / "output" / "intermediate"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "output" / "tensorboard"

    @property
    def failure_file(self) -> Path:
        return self.root / "output" / "failure"

    @property
    def success_file(self) -> Path:
        return self.root / "output" / "success"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def agent_dir(self) -> Path:
        """Private working space of the agent (rank logs, state files): ``output/torchbay``."""
        return self.root / "output" / "torchbay"


@dataclass(frozen=True)
class Channel:
    """One input channel, as CreateTrainingJob's ``InputDataConfig[]`` and inputdataconfig.json describe it.

    ``uri`` is None when the platform (SageMaker) already put the data in place.
    """

    name: str
    uri: Optional[str] = None
    s3_data_type: str = "S3Prefix"  # S3Prefix | ManifestFile | AugmentedManifestFile
    distribution: str = "FullyReplicated"  # FullyReplicated | ShardedByS3Key
    input_mode: str = "File"  # File | Pipe | FastFile
    content_type: Optional[str] = None
    compression: str = "None"  # None | Gzip
    record_wrapper: str = "None"  # None | RecordIO
    shuffle_seed: Optional[int] = None

    def inputdataconfig(self) -> dict[str, Any]:
        """This channel's entry in inputdataconfig.json, as SageMaker writes it."""
        entry: dict[str, Any] = {}
        if self.content_type:
            entry["ContentType"] = self.content_type
        entry["RecordWrapperType"] = self.record_wrapper
        entry["S3DistributionType"] = self.distribution
        entry["TrainingInputMode"] = self.input_mode
        if self.compression != "None":
            entry["CompressionType"] = self.compression
        return entry


@dataclass(frozen=True)
class Resource:
    """resourceconfig.json: the hosts of the job and which one this is."""

    current_host: str
    hosts: tuple[str, ...]
    network_interface_name: str = "eth0"
    current_instance_type: str = "local"
    current_group_name: str = "homogeneousCluster"
    instance_groups: tuple[Mapping[str, Any], ...] = ()

    @property
    def host_index(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def host_count(self) -> int:
        return len(self.hosts)


@dataclass(frozen=True)
class MetricDefinition:
    """A SageMaker-style metric definition: the first capture group of ``regex`` is the value."""

    name: str
    regex: str


@dataclass(frozen=True)
class Job:
    """Everything a train run needs to know, read once."""

    name: str
    layout: Layout
    settings: Settings
    resource: Resource
    hyperparameters: Mapping[str, Any] = field(default_factory=_frozen_map)  # JSON-decoded, sagemaker_* included
    channels: tuple[Channel, ...] = ()
    input_mode: str = "File"
    output_path: Optional[str] = None  # OutputDataConfig.S3OutputPath
    checkpoint_uri: Optional[str] = None
    checkpoint_local_path: Optional[Path] = None
    tensorboard_uri: Optional[str] = None
    tensorboard_local_path: Optional[Path] = None
    instance_count: int = 1
    max_runtime: Optional[float] = None  # seconds
    environment: Mapping[str, str] = field(default_factory=_frozen_map)  # the spec's Environment
    metric_definitions: tuple[MetricDefinition, ...] = ()
    on_sagemaker: bool = False  # the platform already wrote the config and staged the data
    base_env: Mapping[str, str] = field(default_factory=_frozen_map)  # the agent's own environment, read once

    def channel(self, name: str) -> Channel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)

    @property
    def job_output_uri(self) -> Optional[str]:
        """``<S3OutputPath>/<job>/output``: where model.tar.gz, output.tar.gz and logs go."""
        if not self.output_path:
            return None
        return f"{self.output_path.rstrip('/')}/{self.name}/output"


# --- reading the job: a spec, or the config files SageMaker wrote ------------------------------------

_DEFAULT_JOB_NAME = "torchbay-job"

# Keys of CreateTrainingJob that TorchBay reads. A schema node is a type, a tuple of types, a dict
# (an object: key -> node, "*required" -> required keys) or a one-element list (an array of node).
_ANY_SCALAR = (str, int, float, bool)
_S3_DATA_SOURCE = {
    "S3Uri": str, "S3DataType": str, "S3DataDistributionType": str, "AttributeNames": [str],
    "InstanceGroupNames": [str], "*required": ("S3Uri",),
}
_CHANNEL = {
    "ChannelName": str,
    "DataSource": {"S3DataSource": _S3_DATA_SOURCE, "*required": ("S3DataSource",)},
    "ContentType": str, "CompressionType": str, "RecordWrapperType": str, "InputMode": str,
    "ShuffleConfig": {"Seed": int, "*required": ("Seed",)},
    "*required": ("ChannelName", "DataSource"),
}
_SPEC_SCHEMA = {
    "TrainingJobName": str,
    "HyperParameters": {"*values": _ANY_SCALAR},
    "AlgorithmSpecification": {
        "TrainingInputMode": str, "TrainingImage": str, "AlgorithmName": str,
        "MetricDefinitions": [{"Name": str, "Regex": str, "*required": ("Name", "Regex")}],
        "EnableSageMakerMetricsTimeSeries": bool, "ContainerEntrypoint": [str], "ContainerArguments": [str],
    },
    "InputDataConfig": [_CHANNEL],
    "OutputDataConfig": {"S3OutputPath": str, "KmsKeyId": str, "CompressionType": str,
                         "*required": ("S3OutputPath",)},
    "CheckpointConfig": {"S3Uri": str, "LocalPath": str, "*required": ("S3Uri",)},
    "TensorBoardOutputConfig": {"S3OutputPath": str, "LocalPath": str, "*required": ("S3OutputPath",)},
    "ResourceConfig": {"InstanceCount": int, "InstanceType": str, "VolumeSizeInGB": int, "VolumeKmsKeyId": str,
                       "KeepAlivePeriodInSeconds": int},
    "StoppingCondition": {"MaxRuntimeInSeconds": int, "MaxWaitTimeInSeconds": int, "MaxPendingTimeInSeconds": int},
    "Environment": {"*values": str},
    # Accepted for compatibility with real requests; they mean nothing outside SageMaker.
    "RoleArn": str, "Tags": [{"Key": str, "Value": str}], "VpcConfig": dict, "EnableNetworkIsolation": bool,
    "EnableInterContainerTrafficEncryption": bool, "EnableManagedSpotTraining": bool, "RetryStrategy": dict,
    "DebugHookConfig": dict, "ProfilerConfig": dict, "ExperimentConfig": dict,
    "*required": ("TrainingJobName",),
}
_INPUT_MODES = ("File", "Pipe", "FastFile")
_DISTRIBUTIONS = ("FullyReplicated", "ShardedByS3Key")
_S3_DATA_TYPES = ("S3Prefix", "ManifestFile", "AugmentedManifestFile")
_COMPRESSIONS = ("None", "Gzip")
_RECORD_WRAPPERS = ("None", "RecordIO")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "an array"}


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return "a string, number or boolean"
    return _TYPE_NAMES.get(expected, getattr(expected, "__name__", str(expected)))


def _check(value: Any, node: Any, path: str, source: str) -> None:
    """Validate ``value`` against a schema node; raises JobSpecError naming the key path and the source."""
    def fail(what: str) -> None:
        raise JobSpecError(f"job spec {source}: {what}; see the CreateTrainingJob fields in the README")

    if isinstance(node, dict):
        if not isinstance(value, dict):
            fail(f"{path or 'the spec'} must be an object, got {type(value).__name__} {_short(value)}")
        values_node = node.get("*values")
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if values_node is not None:
                _check(item, values_node, where, source)
            elif key.startswith("*") or key not in node:
                known = ", ".join(k for k in node if not k.startswith("*"))
                fail(f"unknown key {where!r} (known here: {known})")
            else:
                _check(item, node[key], where, source)
        for key in node.get("*required", ()):
            if key not in value:
                fail(f"missing required key {(path + '.' if path else '') + key!r}")
        return
    if isinstance(node, list):
        if not isinstance(value, list):
            fail(f"{path} must be an array, got {type(value).__name__} {_short(value)}")
        for index, item in enumerate(value):
            _check(item, node[0], f"{path}[{index}]", source)
        return
    accepted = node if isinstance(node, tuple) else (node,)
    ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
    if node is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        fail(f"{path} must be {_type_name(node)}, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _choice(value: str, allowed: tuple[str, ...], path: str, source: str) -> str:
    if value not in allowed:
        raise JobSpecError(f"job spec {source}: {path} is {value!r}; use one of {', '.join(allowed)}")
    return value


def _read_spec(text: str, source: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise JobSpecError(f"job spec {source} is not valid JSON: {err}; fix the JSON") from err
    _check(spec, _SPEC_SCHEMA, "", source)
    return spec


def _spec_text(job_arg: str, origin: str) -> tuple[str, str]:
    """(text, source) for a job argument that is a path or inline JSON; ``origin`` names where it came from."""
    if job_arg.lstrip().startswith("{"):
        return job_arg, f"{origin} (inline JSON)"
    path = Path(job_arg)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise JobSpecError(f"job spec file {job_arg} does not exist; give --job a path or the JSON itself") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobSpecError(f"job spec file {job_arg} cannot be read: {err}; check the path and permissions") from err


def decode_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-decode each value as the SageMaker toolkit does, keeping a value that is not JSON as the raw string."""
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            try:
                decoded[key] = json.loads(value)
            except json.JSONDecodeError:
                decoded[key] = value
        else:
            decoded[key] = value
    return decoded


def _encode_hyperparameter(value: Any) -> str:
    return json.dumps(value)


def _hosts(settings: Settings, instance_count: int) -> tuple[str, tuple[str, ...]]:
    if settings.hosts:
        hosts = tuple(h.strip() for h in settings.hosts.split(",") if h.strip())
    else:
        hosts = tuple(f"algo-{i}" for i in range(1, instance_count + 1))
    if not hosts:
        raise ConfigError(f"TORCHBAY_HOSTS={settings.hosts!r} names no host; give a comma-separated list")
    current = settings.current_host or hosts[0]
    if current not in hosts:
        raise ConfigError(
            f"TORCHBAY_CURRENT_HOST={current!r} is not among the hosts {list(hosts)}; fix TORCHBAY_HOSTS "
            "or TORCHBAY_CURRENT_HOST"
        )
    return current, hosts


def _job_from_spec(spec: Mapping[str, Any], source: str, layout: Layout, settings: Settings,
                   env: Mapping[str, str]) -> Job:
    algo = spec.get("AlgorithmSpecification", {})
    input_mode = _choice(algo.get("TrainingInputMode", "File"), _INPUT_MODES,
                         "AlgorithmSpecification.TrainingInputMode", source)
    channels = []
    seen: set[str] = set()
    for index, item in enumerate(spec.get("InputDataConfig", [])):
        where = f"InputDataConfig[{index}]"
        name = item["ChannelName"]
        if not name or "/" in name or name in (".", "..") or name in seen:
            raise JobSpecError(f"job spec {source}: {where}.ChannelName {name!r} is empty, repeated or not a "
                               "plain name; give each channel a unique name without '/'")
        seen.add(name)
        s3 = item["DataSource"]["S3DataSource"]
        channels.append(Channel(
            name=name,
            uri=s3["S3Uri"],
            s3_data_type=_choice(s3.get("S3DataType", "S3Prefix"), _S3_DATA_TYPES,
                                 f"{where}.DataSource.S3DataSource.S3DataType", source),
            distribution=_choice(s3.get("S3DataDistributionType", "FullyReplicated"), _DISTRIBUTIONS,
                                 f"{where}.DataSource.S3DataSource.S3DataDistributionType", source),
            input_mode=_choice(item.get("InputMode", input_mode), _INPUT_MODES, f"{where}.InputMode", source),
            content_type=item.get("ContentType"),
            compression=_choice(item.get("CompressionType", "None"), _COMPRESSIONS, f"{where}.CompressionType",
                                source),
            record_wrapper=_choice(item.get("RecordWrapperType", "None"), _RECORD_WRAPPERS,
                                   f"{where}.RecordWrapperType", source),
            shuffle_seed=item.get("ShuffleConfig", {}).get("Seed"),
        ))
    resource_spec = spec.get("ResourceConfig", {})
    instance_count = resource_spec.get("InstanceCount", 1)
    if instance_count < 1:
        raise JobSpecError(f"job spec {source}: ResourceConfig.InstanceCount is {instance_count}; use 1 or more")
    current, hosts = _hosts(settings, instance_count)
    instance_type = resource_spec.get("InstanceType", "local")
    group = "homogeneousCluster"
    resource = Resource(
        current_host=current, hosts=hosts, network_interface_name=settings.network_interface,
        current_instance_type=instance_type, current_group_name=group,
        instance_groups=(_frozen_map({"instance_group_name": group, "instance_type": instance_type,
                                      "hosts": list(hosts)}),),
    )
    stopping = spec.get("StoppingCondition", {})
    max_runtime = stopping.get("MaxRuntimeInSeconds")
    if max_runtime is not None and max_runtime <= 0:
        raise JobSpecError(f"job spec {source}: StoppingCondition.MaxRuntimeInSeconds is {max_runtime}; "
                           "use a positive number of seconds")
    checkpoint = spec.get("CheckpointConfig", {})
    tensorboard = spec.get("TensorBoardOutputConfig", {})
    name = spec["TrainingJobName"]
    if not name or "/" in name:
        raise JobSpecError(f"job spec {source}: TrainingJobName {name!r} is empty or contains '/'; "
                           "use letters, digits and hyphens")
    for path, uri in (("OutputDataConfig.S3OutputPath", spec.get("OutputDataConfig", {}).get("S3OutputPath")),
                      ("CheckpointConfig.S3Uri", checkpoint.get("S3Uri")),
                      ("TensorBoardOutputConfig.S3OutputPath", tensorboard.get("S3OutputPath")),
                      *((f"InputDataConfig[{i}].DataSource.S3DataSource.S3Uri", c.uri)
                        for i, c in enumerate(channels))):
        if uri is not None and not (uri.startswith("s3://") or uri.startswith("file://")):
            raise JobSpecError(f"job spec {source}: {path} is {uri!r}; use s3://bucket/prefix or file:///path")
    return Job(
        name=name,
        layout=layout,
        settings=settings,
        resource=resource,
        hyperparameters=_frozen_map(decode_hyperparameters(
            {k: v if isinstance(v, str) else _encode_hyperparameter(v)
             for k, v in spec.get("HyperParameters", {}).items()})),
        channels=tuple(channels),
        input_mode=input_mode,
        output_path=spec.get("OutputDataConfig", {}).get("S3OutputPath"),
        checkpoint_uri=checkpoint.get("S3Uri"),
        checkpoint_local_path=Path(checkpoint["LocalPath"]) if checkpoint.get("LocalPath")
        else (layout.checkpoints_dir if checkpoint else None),
        tensorboard_uri=tensorboard.get("S3OutputPath"),
        tensorboard_local_path=Path(tensorboard["LocalPath"]) if tensorboard.get("LocalPath")
        else (layout.tensorboard_dir if tensorboard else None),
        instance_count=instance_count,
        max_runtime=float(max_runtime) if max_runtime is not None else None,
        environment=_frozen_map(spec.get("Environment", {})),
        metric_definitions=tuple(MetricDefinition(m["Name"], m["Regex"]) for m in algo.get("MetricDefinitions", [])),
        on_sagemaker=False,
        base_env=_frozen_map(env),
    )


def _read_config(path: Path, required: bool) -> Optional[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} is missing; write it or run with --job SPEC") from None
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}; check its permissions") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}; fix or rewrite it") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}; rewrite it")
    return data


def _job_from_config_files(layout: Layout, settings: Settings, env: Mapping[str, str]) -> Job:
    files = (layout.hyperparameters_file, layout.inputdataconfig_file, layout.resourceconfig_file)
    if not any(f.exists() for f in files):
        raise ConfigError(
            f"no job to run: no job spec (--job or TORCHBAY_JOB) and no config files under {layout.config_dir}; "
            "give a CreateTrainingJob-shaped JSON spec or set TORCHBAY_ROOT to a SageMaker-shaped folder"
        )
    raw_hps = _read_config(layout.hyperparameters_file, required=False) or {}
    channels_raw = _read_config(layout.inputdataconfig_file, required=False) or {}
    resource_raw = _read_config(layout.resourceconfig_file, required=False)
    hps = decode_hyperparameters(raw_hps)
    channels = []
    for name in sorted(channels_raw):
        entry = channels_raw[name]
        if not isinstance(entry, dict):
            raise ConfigError(f"config file {layout.inputdataconfig_file}: channel {name!r} must be an object, got "
                              f"{type(entry).__name__}; rewrite it")
        channels.append(Channel(
            name=name, uri=None,
            distribution=str(entry.get("S3DistributionType", "FullyReplicated")),
            input_mode=str(entry.get("TrainingInputMode", "File")),
            content_type=entry.get("ContentType"),
            compression=str(entry.get("CompressionType", "None")),
            record_wrapper=str(entry.get("RecordWrapperType", "None")),
            shuffle_seed=(entry.get("ShuffleConfig") or {}).get("Seed"),
        ))
    if resource_raw is None:
        current, hosts = _hosts(settings, 1)
        resource = Resource(current_host=current, hosts=hosts, network_interface_name=settings.network_interface)
    else:
        try:
            hosts = tuple(str(h) for h in resource_raw["hosts"])
            current = str(resource_raw["current_host"])
            if current not in hosts:
                raise ValueError(f"current_host {current!r} is not among hosts {list(hosts)}")
            resource = Resource(
                current_host=current, hosts=hosts,
                network_interface_name=str(resource_raw.get("network_interface_name", "eth0")),
                current_instance_type=str(resource_raw.get("current_instance_type", "local")),
                current_group_name=str(resource_raw.get("current_group_name", "homogeneousCluster")),
                instance_groups=tuple(_frozen_map(g) for g in resource_raw.get("instance_groups", [])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"config file {layout.resourceconfig_file} is malformed ({type(err).__name__}: {err}); "
                              "it needs current_host and hosts") from err
    modes = {c.input_mode for c in channels}
    name = env.get("TRAINING_JOB_NAME") or str(hps.get("sagemaker_job_name") or _DEFAULT_JOB_NAME)
    return Job(
        name=name, layout=layout, settings=settings, resource=resource,
        hyperparameters=_frozen_map(hps), channels=tuple(channels),
        input_mode=modes.pop() if len(modes) == 1 else "File",
        instance_count=len(resource.hosts),
        on_sagemaker=True, base_env=_frozen_map(env),
    )


def load_job(env: Mapping[str, str], job_arg: Optional[str] = None) -> Job:
    """Read the job once: from ``job_arg`` (a path or inline JSON), else TORCHBAY_JOB, else the config files.

    Raises JobSpecError (a bad spec field, naming the key and the file) or ConfigError (a bad config file
    or setting).
    """
    settings = read_settings(env)
    layout = Layout(Path(settings.root))
    origin = "--job" if job_arg else "TORCHBAY_JOB"
    job_arg = job_arg or settings.job
    if job_arg:
        text, source = _spec_text(job_arg, origin)
        return _job_from_spec(_read_spec(text, source), source, layout, settings, env)
    return _job_from_config_files(layout, settings, env)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def resource_config(resource: Resource) -> dict[str, Any]:
    """resourceconfig.json's content, as SageMaker writes it."""
    return {
        "current_host": resource.current_host,
        "current_instance_type": resource.current_instance_type,
        "current_group_name": resource.current_group_name,
        "hosts": list(resource.hosts),
        "instance_groups": [dict(g) for g in resource.instance_groups],
        "network_interface_name": resource.network_interface_name,
    }


def write_config_files(job: Job) -> None:
    """Write hyperparameters.json, inputdataconfig.json and resourceconfig.json as the platform would."""
    layout = job.layout
    _write_json(layout.hyperparameters_file, {k: _encode_hyperparameter(v) for k, v in job.hyperparameters.items()})
    _write_json(layout.inputdataconfig_file, {c.name: c.inputdataconfig() for c in job.channels})
    _write_json(layout.resourceconfig_file, resource_config(job.resource))

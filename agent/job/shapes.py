"""The job's frozen shapes: the layout, channels, resource, metric definitions and the Job.

The bottom of agent.job: every part of the agent (data, telemetry, distributed, checkpoints,
training) reads these, and the readers above (agent.job.spec, agent.job.files, agent.job.load)
build them. Nothing here reads a file or the environment.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from agent.settings import Settings

if TYPE_CHECKING:  # an annotation only: agent.distributed builds the cluster from the job
    from agent.distributed.cluster import Cluster

__all__ = [
    "Channel",
    "Job",
    "Layout",
    "MetricDefinition",
    "Resource",
    "frozen_map",
    "resource_config",
]


def frozen_map(data: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """A read-only copy of ``data`` (the Job's mapping fields)."""
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

    @property
    def job_log_file(self) -> Path:
        """This host's tagged log of every rank: ``output/torchbay/job.log``."""
        return self.agent_dir / "job.log"

    @property
    def metrics_file(self) -> Path:
        """This host's metric points, JSON lines: ``output/torchbay/metrics.jsonl``."""
        return self.agent_dir / "metrics.jsonl"


@dataclass(frozen=True)
class Channel:
    """One input channel, as CreateTrainingJob's ``InputDataConfig[]`` and inputdataconfig.json
    describe it.

    ``uri`` is None when the platform (SageMaker) already put the data in place.
    """

    name: str
    uri: str | None = None
    s3_data_type: str = "S3Prefix"  # S3Prefix | ManifestFile | AugmentedManifestFile
    distribution: str = "FullyReplicated"  # FullyReplicated | ShardedByS3Key
    input_mode: str = "File"  # File | Pipe | FastFile
    content_type: str | None = None
    compression: str = "None"  # None | Gzip
    record_wrapper: str = "None"  # None | RecordIO
    shuffle_seed: int | None = None

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
    """A SageMaker-style metric definition: the first capture group of ``regex`` is the value.

    Made only by the job's readers (load_job), so a bad regex fails the job before its code,
    packages or data are fetched; ConfigError names the definition and the regex.
    """

    name: str
    regex: str

    # ``regex`` compiled (multi-line) when the definition is made: every definition compiles.
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            pattern = re.compile(self.regex, re.MULTILINE)
        except re.error as err:
            raise ConfigError(
                f"metric {self.name!r}: regex {self.regex!r} does not compile ({err}); fix the "
                "MetricDefinitions Regex"
            ) from err
        object.__setattr__(self, "pattern", pattern)


@dataclass(frozen=True)
class Job:
    """Everything a train run needs to know, read once."""

    name: str
    layout: Layout
    settings: Settings
    resource: Resource
    # JSON-decoded, sagemaker_* included
    hyperparameters: Mapping[str, Any] = field(default_factory=frozen_map)
    channels: tuple[Channel, ...] = ()
    input_mode: str = "File"
    output_path: str | None = None  # OutputDataConfig.S3OutputPath
    checkpoint_uri: str | None = None
    checkpoint_local_path: Path | None = None
    tensorboard_uri: str | None = None
    tensorboard_local_path: Path | None = None
    instance_count: int = 1
    max_runtime: float | None = None  # seconds
    environment: Mapping[str, str] = field(default_factory=frozen_map)  # the spec's Environment
    metric_definitions: tuple[MetricDefinition, ...] = ()
    on_sagemaker: bool = False  # the platform already wrote the config and staged the data
    # the agent's own environment, read once
    base_env: Mapping[str, str] = field(default_factory=frozen_map)
    # The cluster identity, found once by load_job; ``resource`` agrees with it. None only for Job
    # objects built by hand (tests), which then discover on use.
    cluster: Cluster | None = None

    def channel(self, name: str) -> Channel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)

    @property
    def job_output_uri(self) -> str | None:
        """``<S3OutputPath>/<job>/output``: where model.tar.gz, output.tar.gz and logs go."""
        if not self.output_path:
            return None
        return f"{self.output_path.rstrip('/')}/{self.name}/output"


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

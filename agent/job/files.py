"""SageMaker's config files: hyperparameters.json, inputdataconfig.json and resourceconfig.json,
read into the job's shapes (agent.job.shapes) and written from them.

Hyperparameter values are JSON-encoded strings in those files; ``decode_hyperparameters`` and
``encode_hyperparameter`` convert them, for the spec reader too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.job.shapes import Channel, Job, Layout, Resource, frozen_map, resource_config
from agent.settings import Settings
from agent.storage import write_text_atomically

__all__ = [
    "decode_hyperparameters",
    "encode_hyperparameter",
    "hosts_from_settings",
    "job_from_config_files",
    "write_config_files",
]

_DEFAULT_JOB_NAME = "torchbay-job"


def decode_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-decode each value as the SageMaker toolkit does, keeping a value that is not JSON as the
    raw string."""
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


def encode_hyperparameter(value: Any) -> str:
    """One hyperparameter as hyperparameters.json holds it."""
    return json.dumps(value)


def hosts_from_settings(settings: Settings, instance_count: int) -> tuple[str, tuple[str, ...]]:
    """(current host, hosts) from TORCHBAY_HOSTS / TORCHBAY_CURRENT_HOST, else algo-1..N."""
    if settings.train.hosts:
        hosts = tuple(h.strip() for h in settings.train.hosts.split(",") if h.strip())
    else:
        hosts = tuple(f"algo-{i}" for i in range(1, instance_count + 1))
    if not hosts:
        raise ConfigError(
            f"TORCHBAY_HOSTS={settings.train.hosts!r} names no host; give a comma-separated list"
        )
    current = settings.train.current_host or hosts[0]
    if current not in hosts:
        raise ConfigError(
            f"TORCHBAY_CURRENT_HOST={current!r} is not among the hosts {list(hosts)}; fix "
            "TORCHBAY_HOSTS "
            "or TORCHBAY_CURRENT_HOST"
        )
    return current, hosts


def _read_config(path: Path, required: bool) -> Any | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"config file {path} is missing; write it or run with --job SPEC"
            ) from None
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"config file {path} cannot be read: {err}; check its permissions"
        ) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"config file {path} is not valid JSON: {err}; fix or rewrite it"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a JSON object, got {type(data).__name__}; rewrite it"
        )
    return data


def job_from_config_files(layout: Layout, settings: Settings, env: Mapping[str, str]) -> Job:
    """The job SageMaker described in the config files under the layout; raises ConfigError."""
    files = (layout.hyperparameters_file, layout.inputdataconfig_file, layout.resourceconfig_file)
    if not any(f.exists() for f in files):
        raise ConfigError(
            "no job to run: no job spec (--job or TORCHBAY_JOB) and no config files under "
            f"{layout.config_dir}; "
            "give a CreateTrainingJob-shaped JSON spec or set TORCHBAY_ROOT to a SageMaker-shaped "
            "folder"
        )
    raw_hps = _read_config(layout.hyperparameters_file, required=False) or {}
    channels_raw = _read_config(layout.inputdataconfig_file, required=False) or {}
    resource_raw = _read_config(layout.resourceconfig_file, required=False)
    hps = decode_hyperparameters(raw_hps)
    channels = []
    for name in sorted(channels_raw):
        entry = channels_raw[name]
        if not isinstance(entry, dict):
            raise ConfigError(
                f"config file {layout.inputdataconfig_file}: channel {name!r} must be an object, "
                "got "
                f"{type(entry).__name__}; rewrite it"
            )
        channels.append(
            Channel(
                name=name,
                uri=None,
                distribution=str(entry.get("S3DistributionType", "FullyReplicated")),
                input_mode=str(entry.get("TrainingInputMode", "File")),
                content_type=entry.get("ContentType"),
                compression=str(entry.get("CompressionType", "None")),
                record_wrapper=str(entry.get("RecordWrapperType", "None")),
                shuffle_seed=(entry.get("ShuffleConfig") or {}).get("Seed"),
            )
        )
    if resource_raw is None:
        current, hosts = hosts_from_settings(settings, 1)
        resource = Resource(
            current_host=current,
            hosts=hosts,
            network_interface_name=settings.train.network_interface,
        )
    else:
        try:
            hosts = tuple(str(h) for h in resource_raw["hosts"])
            current = str(resource_raw["current_host"])
            if current not in hosts:
                raise ValueError(f"current_host {current!r} is not among hosts {list(hosts)}")
            resource = Resource(
                current_host=current,
                hosts=hosts,
                network_interface_name=str(resource_raw.get("network_interface_name", "eth0")),
                current_instance_type=str(resource_raw.get("current_instance_type", "local")),
                current_group_name=str(
                    resource_raw.get("current_group_name", "homogeneousCluster")
                ),
                instance_groups=tuple(
                    frozen_map(g) for g in resource_raw.get("instance_groups", [])
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"config file {layout.resourceconfig_file} is malformed ({type(err).__name__}: "
                f"{err}); "
                "it needs current_host and hosts"
            ) from err
    modes = {c.input_mode for c in channels}
    name = env.get("TRAINING_JOB_NAME") or str(hps.get("sagemaker_job_name") or _DEFAULT_JOB_NAME)
    return Job(
        name=name,
        layout=layout,
        settings=settings,
        resource=resource,
        hyperparameters=frozen_map(hps),
        channels=tuple(channels),
        input_mode=modes.pop() if len(modes) == 1 else "File",
        instance_count=len(resource.hosts),
        on_sagemaker=True,
        base_env=frozen_map(env),
    )


def _write_json(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_config_files(job: Job) -> None:
    """Write hyperparameters.json, inputdataconfig.json and resourceconfig.json as the platform
    would."""
    layout = job.layout
    _write_json(
        layout.hyperparameters_file,
        {k: encode_hyperparameter(v) for k, v in job.hyperparameters.items()},
    )
    _write_json(layout.inputdataconfig_file, {c.name: c.inputdataconfig() for c in job.channels})
    _write_json(layout.resourceconfig_file, resource_config(job.resource))

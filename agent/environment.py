"""What the user's process sees: the entry point, the SageMaker ``SM_*`` environment and the
arguments.

Names and value formats match the SageMaker training toolkit (sagemaker-training 5.x) exactly, so a
script written for SageMaker sees what it saw there. Where the toolkit hurts users we do better,
and say so in the README: ``PYTHONPATH`` is extended (code dir first), not replaced by the
launcher's
``sys.path``; ``SM_HP_<NAME>`` gets a shell-safe alias (``SM_HP_BATCH_SIZE`` beside
``SM_HP_BATCH-SIZE``); nothing from the agent's environment (credentials included) goes into
``SM_TRAINING_ENV``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.data import channel_uri_variable
from agent.distributed.cluster import count_gpus
from agent.errors import EntryPointError, UnsafePathError
from agent.job import Job, resource_config
from agent.safety import safe_join
from agent.shims import BOOT_DIR  # the SageMaker toolkits' API when the real packages are absent
from agent.storage import redact

__all__ = [
    "RESERVED_HYPERPARAMETERS",
    "EntryPoint",
    "detect_gpus",
    "entry_command",
    "resolve_entry_point",
    "sm_variables",
    "training_env",
    "user_args",
    "user_environment",
]

# Hyperparameters the toolkit removes from SM_HPS and the command line (sagemaker_training.params).
RESERVED_HYPERPARAMETERS = frozenset(
    {
        "sagemaker_program",
        "sagemaker_submit_directory",
        "sagemaker_enable_cloudwatch_metrics",
        "sagemaker_region",
        "sagemaker_container_log_level",
        "sagemaker_job_name",
        "default_user_module_name",
        "_tuning_objective_metric",
        "sagemaker_s3_output",
    }
)
_FRAMEWORK_PREFIX = "sagemaker_"
# Hyperparameters that make the toolkit distribute over the current instance group.
_DISTRIBUTION_FLAGS = (
    "sagemaker_mpi_enabled",
    "sagemaker_parameter_server_enabled",
    "sagemaker_distributed_dataparallel_enabled",
    "sagemaker_pytorch_ddp_enabled",
    "sagemaker_pytorch_xla_multi_worker_enabled",
    "sagemaker_multi_worker_mirrored_strategy_enabled",
    "sagemaker_torch_distributed_enabled",
)
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SHELL_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class EntryPoint:
    """The user's program: ``kind`` is ``script`` (a .py file), ``module`` (``-m pkg.mod``) or
    ``executable``.

    ``name`` is as given (``train.py``, ``pkg.mod``, ``run.sh``); ``path`` is the resolved file
    (None for a
    module); ``code_dir`` is where it runs from.
    """

    kind: str
    name: str
    path: Path | None
    code_dir: Path

    @property
    def module_name(self) -> str:
        """``SM_MODULE_NAME``: the entry point without ``.py``."""
        return self.name[:-3] if self.name.endswith(".py") else self.name


def _program(job: Job) -> str | None:
    # SAGEMAKER_PROGRAM wins over the hyperparameter, as in the toolkit.
    program = job.base_env.get("SAGEMAKER_PROGRAM") or job.hyperparameters.get("sagemaker_program")
    return str(program).strip() if program not in (None, "") else None


def resolve_entry_point(job: Job, code_dir: Path | None = None) -> EntryPoint:
    """The entry point named by ``sagemaker_program`` (or SAGEMAKER_PROGRAM), checked to exist in
    ``code_dir``.

    Raises EntryPointError naming the program and the folder.
    """
    code = Path(code_dir) if code_dir is not None else job.layout.code_dir
    program = _program(job)
    if not program:
        raise EntryPointError(
            'no entry point: set the hyperparameter sagemaker_program (e.g. "train.py", "-m '
            'pkg.train" or '
            '"run.sh") in the job spec or hyperparameters.json'
        )
    if program.startswith(("-m ", "-m\t")):
        module = program[2:].strip()
        if not _MODULE_NAME.match(module):
            raise EntryPointError(
                f"entry point {program!r}: {module!r} is not a module name; use -m pkg.module"
            )
        return EntryPoint("module", module, None, code)
    try:
        path = safe_join(code, program, what="entry point")
    except UnsafePathError as err:
        raise EntryPointError(f"{err}; name a file inside {code}") from err
    if not path.is_file():
        present = sorted(p.name for p in code.iterdir())[:10] if code.is_dir() else []
        raise EntryPointError(
            f"entry point {program!r} not found in {code} (it holds {present or 'nothing'}); check "
            "sagemaker_program and sagemaker_submit_directory"
        )
    if program.endswith(".py"):
        return EntryPoint("script", program, path, code)
    if not os.access(path, os.X_OK) and not program.endswith(".sh"):
        raise EntryPointError(
            f"entry point {path} is not executable; chmod +x it, or name a .py or .sh file"
        )
    return EntryPoint("executable", program, path, code)


def entry_command(
    entry: EntryPoint, args: Sequence[str], python: str = sys.executable
) -> list[str]:
    """The argv that runs ``entry`` as one process (no shell): python script, python -m module, or
    the file."""
    if entry.kind == "script":
        return [python, str(entry.path), *args]
    if entry.kind == "module":
        return [python, "-m", entry.name, *args]
    assert entry.path is not None
    if not os.access(entry.path, os.X_OK):
        return ["/bin/sh", str(entry.path), *args]
    return [str(entry.path), *args]


def _split_hyperparameters(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user hyperparameters, additional framework parameters), as the toolkit splits them."""
    user: dict[str, Any] = {}
    framework: dict[str, Any] = {}
    for key, value in job.hyperparameters.items():
        if key in RESERVED_HYPERPARAMETERS:
            continue
        if key.startswith(_FRAMEWORK_PREFIX):
            framework[key] = value
        else:
            user[key] = value
    return user, framework


def _arg_value(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "items"):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def user_args(job: Job) -> list[str]:
    """Hyperparameters as the toolkit passes them: sorted, ``--key value`` (``-k`` for one letter),
    str()'d."""
    user, _ = _split_hyperparameters(job)
    args: list[str] = []
    for key in sorted(user):
        args.append(f"--{key}" if len(key) > 1 else f"-{key}")
        args.append(_arg_value(user[key]))
    return args


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def detect_gpus(env: Mapping[str, str], dev: Path = Path("/dev")) -> int:
    """GPUs this process may use: the cluster identity's one counter
    (agent.distributed.cluster.count_gpus)."""
    return count_gpus(env, dev)


def _neurons(dev: Path = Path("/dev")) -> int:
    try:
        return sum(1 for p in dev.iterdir() if re.fullmatch(r"neuron\d+", p.name))
    except OSError:
        return 0


def training_env(job: Job, entry: EntryPoint, *, num_gpus: int | None = None) -> dict[str, Any]:
    """The toolkit's ``Environment`` as a dict (what ``SM_TRAINING_ENV`` holds), built from the job
    alone."""
    layout = job.layout
    resource = job.resource
    user, framework = _split_hyperparameters(job)
    groups = [dict(g) for g in resource.instance_groups]
    groups_dict = {str(g.get("instance_group_name")): g for g in groups}
    current_group = groups_dict.get(resource.current_group_name)
    dist_groups = job.hyperparameters.get("sagemaker_distribution_instance_groups")
    if dist_groups is None:  # as the toolkit: a distribution flag means the current group
        flagged = any(job.hyperparameters.get(flag, False) for flag in _DISTRIBUTION_FLAGS)
        dist_groups = [resource.current_group_name] if flagged else []
    dist_hosts = (
        [
            h
            for g in groups
            if g.get("instance_group_name") in dist_groups
            for h in g.get("hosts", [])
        ]
        if groups
        else list(resource.hosts)
    )
    master = dist_hosts[0] if dist_hosts else resource.hosts[0]
    channels = {c.name: str(layout.channel_dir(c.name)) for c in job.channels}
    log_level = job.hyperparameters.get("sagemaker_container_log_level", 20)
    submit_dir = job.hyperparameters.get("sagemaker_submit_directory")
    return {
        "additional_framework_parameters": framework,
        "channel_input_dirs": channels,
        "current_host": resource.current_host,
        "current_instance_group": resource.current_group_name,
        "current_instance_group_hosts": list(current_group.get("hosts", []))
        if current_group
        else [],
        "current_instance_type": resource.current_instance_type,
        "distribution_hosts": dist_hosts,
        "distribution_instance_groups": list(dist_groups),
        "framework_module": job.base_env.get("SAGEMAKER_TRAINING_MODULE") or None,
        "hosts": list(resource.hosts),
        "hyperparameters": user,
        "input_config_dir": str(layout.config_dir),
        "input_data_config": {c.name: c.inputdataconfig() for c in job.channels},
        "input_dir": str(layout.input_dir),
        "instance_groups": [str(g.get("instance_group_name")) for g in groups],
        "instance_groups_dict": groups_dict,
        "is_hetero": len(groups) > 1,
        "is_master": resource.current_host == master,
        "is_modelparallel_enabled": None,
        "is_smddpmprun_installed": False,
        "is_smddprun_installed": False,
        "job_name": job.name,
        "log_level": log_level,
        "master_hostname": master,
        "model_dir": str(layout.model_dir),
        "module_dir": redact(str(submit_dir)) if submit_dir else str(entry.code_dir),
        "module_name": entry.module_name,
        "network_interface_name": resource.network_interface_name,
        "num_cpus": os.cpu_count() or 1,
        "num_gpus": (job.cluster.num_gpus if job.cluster is not None else detect_gpus(job.base_env))
        if num_gpus is None
        else num_gpus,
        "num_neurons": _neurons(),
        "output_data_dir": str(layout.output_data_dir),
        "output_dir": str(layout.output_dir),
        "output_intermediate_dir": str(layout.intermediate_dir),
        "resource_config": resource_config(resource),
        "topology": [],
        "user_entry_point": entry.name,
    }


# The Environment properties the toolkit also exports one by one (as SM_<NAME>).
_EXPORTED = (
    "current_host",
    "current_instance_group",
    "current_instance_group_hosts",
    "current_instance_type",
    "distribution_instance_groups",
    "framework_module",
    "hosts",
    "input_config_dir",
    "input_data_config",
    "input_dir",
    "instance_groups",
    "instance_groups_dict",
    "is_hetero",
    "log_level",
    "model_dir",
    "module_dir",
    "module_name",
    "network_interface_name",
    "num_cpus",
    "num_gpus",
    "num_neurons",
    "output_data_dir",
    "output_dir",
    "output_intermediate_dir",
    "resource_config",
    "user_entry_point",
)


def sm_variables(job: Job, entry: EntryPoint, *, num_gpus: int | None = None) -> dict[str, str]:
    """Every ``SM_*`` variable the toolkit sets, with its value format (strings as-is, the rest
    compact JSON)."""
    env_dict = training_env(job, entry, num_gpus=num_gpus)
    args = user_args(job)
    out = {f"SM_{key.upper()}": _env_value(env_dict[key]) for key in _EXPORTED}
    out["SM_CHANNELS"] = _env_value(sorted(env_dict["channel_input_dirs"]))
    for name, path in env_dict["channel_input_dirs"].items():
        out[f"SM_CHANNEL_{name.upper()}"] = path
    out["SM_HPS"] = _env_value(env_dict["hyperparameters"])
    for key, value in env_dict["hyperparameters"].items():
        out[f"SM_HP_{key.upper()}"] = _env_value(value)
    for key, value in env_dict["hyperparameters"].items():
        alias = "SM_HP_" + _SHELL_UNSAFE.sub("_", key.upper())
        out.setdefault(alias, _env_value(value))
    out["SM_FRAMEWORK_PARAMS"] = _env_value(env_dict["additional_framework_parameters"])
    out["SM_USER_ARGS"] = _env_value(args)
    out["SM_TRAINING_ENV"] = _env_value(env_dict)
    return out


def user_environment(
    job: Job, entry: EntryPoint, extra: Mapping[str, str] = {}, *, num_gpus: int | None = None
) -> dict[str, str]:
    """The user's whole environment: the agent's own, the spec's Environment, ``SM_*``, then
    ``extra``.

    ``PYTHONPATH`` gets the code dir in front of what was there and the toolkit stand-ins' boot
    folder
    (agent/shims) at its end; ``SAGEMAKER_BASE_DIR`` is the root; ``PYTHONUNBUFFERED=1``.
    """
    env = dict(job.base_env)
    env.pop("TORCHBAY_JOB", None)  # the spec may be inline JSON; the script reads SM_* instead
    env.update(job.environment)
    env.update(sm_variables(job, entry, num_gpus=num_gpus))
    region = (
        job.hyperparameters.get("sagemaker_region")
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
    )
    env["CURRENT_HOST"] = job.resource.current_host
    env["SAGEMAKER_JOB_NAME"] = job.name
    env.setdefault("TRAINING_JOB_NAME", job.name)
    if region:
        env["SAGEMAKER_REGION"] = str(region)
    for channel in job.channels:  # for scripts that stream instead of reading the staged copy
        if channel.uri:
            env[channel_uri_variable(channel.name)] = channel.uri
    previous = [
        p
        for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and p not in (str(entry.code_dir), str(BOOT_DIR))
    ]
    env["PYTHONPATH"] = os.pathsep.join([str(entry.code_dir), *previous, str(BOOT_DIR)])
    env["SAGEMAKER_BASE_DIR"] = str(
        job.layout.root
    )  # where the toolkits (real or stand-in) find the config files
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env

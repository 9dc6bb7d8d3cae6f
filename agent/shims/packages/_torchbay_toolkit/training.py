"""The training environment as sagemaker-training 5.x computes it inside the user's process.

Read at run time, as the toolkit reads it: the config files under ``SAGEMAKER_BASE_DIR``
(``/opt/ml``), the process environment (``SAGEMAKER_PROGRAM``, ``TRAINING_JOB_NAME``,
``SAGEMAKER_TRAINING_MODULE``, ...), ``/dev`` for accelerators and the CPU count. Folder attributes
are fixed when the module is imported, as in the toolkit. Stdlib only.

The config files are JSON the platform wrote and hyperparameter values are whatever the user
passed, so those are typed ``Any``; the names the toolkit reads from them (hosts, groups) are typed
as the contract has them.
"""

import collections.abc
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

SAGEMAKER_BASE_PATH = os.path.join("/opt", "ml")
BASE_PATH_ENV = "SAGEMAKER_BASE_DIR"
HYPERPARAMETERS_FILE = "hyperparameters.json"
RESOURCE_CONFIG_FILE = "resourceconfig.json"
INPUT_DATA_CONFIG_FILE = "inputdataconfig.json"

# Hyperparameters the toolkit keeps for itself
# (sagemaker_training.params.SAGEMAKER_HYPERPARAMETERS).
SAGEMAKER_PREFIX = "sagemaker_"
SAGEMAKER_HYPERPARAMETERS = (
    "sagemaker_program",
    "sagemaker_submit_directory",
    "sagemaker_enable_cloudwatch_metrics",
    "sagemaker_container_log_level",
    "sagemaker_job_name",
    "sagemaker_region",
    "sagemaker_s3_output",
    "_tuning_objective_metric",
    "default_user_module_name",
)
_DISTRIBUTION_FLAGS = (
    "sagemaker_mpi_enabled",
    "sagemaker_parameter_server_enabled",
    "sagemaker_distributed_dataparallel_enabled",
    "sagemaker_pytorch_ddp_enabled",
    "sagemaker_pytorch_xla_multi_worker_enabled",
    "sagemaker_multi_worker_mirrored_strategy_enabled",
    "sagemaker_torch_distributed_enabled",
)


class Paths:
    """The folders under one base dir."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.code_dir = os.path.join(base_dir, "code")
        self.model_dir = os.path.join(base_dir, "model")
        self.input_dir = os.path.join(base_dir, "input")
        self.input_data_dir = os.path.join(self.input_dir, "data")
        self.input_config_dir = os.path.join(self.input_dir, "config")
        self.output_dir = os.path.join(base_dir, "output")
        self.output_data_dir = os.path.join(self.output_dir, "data")
        self.output_intermediate_dir = os.path.join(self.output_dir, "intermediate")
        self.hyperparameters_file_dir = os.path.join(self.input_config_dir, HYPERPARAMETERS_FILE)
        self.input_data_config_file_dir = os.path.join(
            self.input_config_dir, INPUT_DATA_CONFIG_FILE
        )
        self.resource_config_file_dir = os.path.join(self.input_config_dir, RESOURCE_CONFIG_FILE)


def base_dir_from_environment() -> str:
    """``SAGEMAKER_BASE_DIR``, else ``/opt/ml`` (the agent sets the former to its root)."""
    return os.environ.get(BASE_PATH_ENV) or SAGEMAKER_BASE_PATH


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def decode_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-decode each value, keeping one that is not JSON as it is."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            value = json.loads(value)
        except (ValueError, TypeError):
            pass
        out[key] = value
    return out


def count_gpus() -> int:
    """GPUs as ``nvidia-smi --list-gpus`` counts them (0 without nvidia-smi)."""
    import subprocess

    try:
        output = subprocess.check_output(
            ["nvidia-smi", "--list-gpus"], stderr=subprocess.DEVNULL
        ).decode("utf-8")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(1 for line in output.split("\n") if line.startswith("GPU "))


def count_neurons(instance_type: str | None = "") -> int:
    """AWS Neuron cores: 64 on trn2.48xlarge, else as neuron-ls counts them (0 without it)."""
    import subprocess

    if "trn2.48xlarge" in (instance_type or ""):
        return 64
    try:
        output = subprocess.check_output(["neuron-ls", "-j"], stderr=subprocess.DEVNULL).decode(
            "utf-8"
        )
        return sum(int(device.get("nc_count", 0)) for device in json.loads(output))
    except (OSError, ValueError, TypeError, AttributeError, subprocess.CalledProcessError):
        return 0


def count_cpus() -> int:
    import multiprocessing

    return multiprocessing.cpu_count()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin1")
    return str(value)


def to_cmd_args(mapping: Mapping[Any, Any]) -> list[str]:
    """``--key value`` pairs (``-k`` for one letter), keys sorted, dicts as ``k=v,k2=v2``."""
    args: list[str] = []
    for key in sorted(mapping):
        name = _text(key)
        args.append(("--" if len(name) > 1 else "-") + name if name else "")
        value = mapping[key]
        if hasattr(value, "items"):
            args.append(",".join(f"{k}={v}" for k, v in sorted(value.items())))
        else:
            args.append(_text(value))
    return args


def to_env_vars(mapping: Mapping[Any, Any]) -> dict[str, str]:
    """``SM_<KEY>`` names; strings as they are, None as "", the rest as compact sorted JSON."""

    def value_of(value: object) -> str:
        if isinstance(value, bytes):
            return value.decode("latin1")
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    return {
        (f"SM_{str(key).upper()}" if key else ""): value_of(value) for key, value in mapping.items()
    }


def _module_name(program: str) -> str:
    if program and program.endswith(".py"):
        return program[:-3]
    return program


class MappingMixin(collections.abc.Mapping[str, Any]):
    """Dict-like access to every property, as the toolkit's Environment offers (``dict(env)``,
    ``env["hosts"]``)."""

    @classmethod
    def properties(cls) -> list[str]:
        return [name for name in dir(cls) if isinstance(getattr(cls, name, None), property)]

    def __getitem__(self, key: str) -> Any:
        if not isinstance(getattr(type(self), str(key), None), property):
            raise KeyError(f"Trying to access non property {key}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.properties())

    def __len__(self) -> int:
        return len(self.properties())

    def __str__(self) -> str:
        return str(dict(self))


class Environment(MappingMixin):
    """A read-only snapshot of the training environment, equal to sagemaker-training 5.x's
    ``Environment``.

    Like the toolkit, making one sets ``SAGEMAKER_JOB_NAME``, ``CURRENT_HOST`` and
    ``SAGEMAKER_REGION`` (from the hyperparameters and the resource config) in ``os.environ``.
    """

    def __init__(
        self,
        resource_config: Mapping[str, Any] | None = None,
        input_data_config: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        *,
        paths: Paths | None = None,
    ) -> None:
        paths = paths or _PATHS
        environ = os.environ
        self._paths = paths
        self._num_gpus = count_gpus()
        self._num_cpus = count_cpus()
        program = environ.get("SAGEMAKER_PROGRAM")
        resource_config = resource_config or read_json(paths.resource_config_file_dir)
        input_data_config = input_data_config or read_json(paths.input_data_config_file_dir)
        all_hps = hyperparameters or decode_hyperparameters(
            read_json(paths.hyperparameters_file_dir)
        )
        self._resource_config: Mapping[str, Any] = resource_config
        self._input_data_config: Mapping[str, Any] = input_data_config
        self._hosts: list[str] = resource_config["hosts"]
        self._current_host: str = resource_config["current_host"]
        self._current_instance_type: str = resource_config.get("current_instance_type", "local")
        self._current_instance_group: str = resource_config.get(
            "current_group_name", "homogeneousCluster"
        )
        self._network_interface_name: str = resource_config.get("network_interface_name", "eth0")
        self._topology: Any = resource_config.get("topology", [])
        self._num_neurons = count_neurons(self._current_instance_type)
        sagemaker_hps: dict[str, Any] = {
            k: v
            for k, v in all_hps.items()
            if k in SAGEMAKER_HYPERPARAMETERS or k.startswith(SAGEMAKER_PREFIX)
        }
        self._hyperparameters: dict[str, Any] = {
            k: v for k, v in all_hps.items() if k not in sagemaker_hps
        }
        self._additional_framework_parameters: dict[str, Any] = {
            k: v for k, v in sagemaker_hps.items() if k not in SAGEMAKER_HYPERPARAMETERS
        }
        region = sagemaker_hps.get(
            "sagemaker_region", environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        )
        environ["SAGEMAKER_JOB_NAME"] = _text(sagemaker_hps.get("sagemaker_job_name", ""))
        environ["CURRENT_HOST"] = self._current_host
        environ["SAGEMAKER_REGION"] = _text(region)
        self._channel_input_dirs = {
            name: os.path.join(paths.input_data_dir, name) for name in input_data_config
        }
        self._module_name = (
            program if program is not None else str(sagemaker_hps.get("sagemaker_program"))
        )
        self._user_entry_point: Any = program or sagemaker_hps.get("sagemaker_program")
        self._module_dir = str(sagemaker_hps.get("sagemaker_submit_directory", paths.code_dir))
        self._log_level: Any = sagemaker_hps.get("sagemaker_container_log_level", logging.INFO)
        self._sagemaker_s3_output: Any = sagemaker_hps.get("sagemaker_s3_output")
        self._framework_module = environ.get("SAGEMAKER_TRAINING_MODULE", None)
        self._job_name = environ.get("TRAINING_JOB_NAME", None)
        groups: list[dict[str, Any]] = resource_config.get("instance_groups", [])
        self._instance_groups: list[str] = [g["instance_group_name"] for g in groups]
        self._instance_groups_dict = {g["instance_group_name"]: g for g in groups}
        self._current_instance_group_hosts: list[str] = next(
            (
                g["hosts"]
                for g in groups
                if g["instance_group_name"] == self._current_instance_group
            ),
            [],
        )
        fallback = (
            [self._current_instance_group]
            if any(
                self._additional_framework_parameters.get(flag, False)
                for flag in _DISTRIBUTION_FLAGS
            )
            else []
        )
        self._distribution_instance_groups: Any = self._additional_framework_parameters.get(
            "sagemaker_distribution_instance_groups", fallback
        )
        if groups:
            self._distribution_hosts: list[str] = [
                h
                for g in groups
                if g["instance_group_name"] in self._distribution_instance_groups
                for h in g["hosts"]
            ]
        else:
            self._distribution_hosts = list(self._hosts)
        self._is_hetero = len(self._instance_groups) > 1
        self._master_hostname: str = next(iter(self._distribution_hosts or self._hosts))
        self._is_master: bool = self._current_host == self._master_hostname
        mp_parameters = environ.get("SM_HP_MP_PARAMETERS")
        self._is_modelparallel_enabled: str | bool | None = mp_parameters and mp_parameters != "{}"
        self._is_smddprun_installed = _on_path("smddprun")
        self._is_smddpmprun_installed = _on_path("smddpmprun")

    # --- the properties (what dict(env) and SM_TRAINING_ENV hold) -------------------------------
    @property
    def additional_framework_parameters(self) -> dict[str, Any]:
        return self._additional_framework_parameters

    @property
    def channel_input_dirs(self) -> dict[str, str]:
        return self._channel_input_dirs

    @property
    def current_host(self) -> str:
        return self._current_host

    @property
    def current_instance_group(self) -> str:
        return self._current_instance_group

    @property
    def current_instance_group_hosts(self) -> list[str]:
        return self._current_instance_group_hosts

    @property
    def current_instance_type(self) -> str:
        return self._current_instance_type

    @property
    def distribution_hosts(self) -> list[str]:
        return self._distribution_hosts

    @property
    def distribution_instance_groups(self) -> Any:
        return self._distribution_instance_groups

    @property
    def framework_module(self) -> str | None:
        return self._framework_module

    @property
    def hosts(self) -> list[str]:
        return self._hosts

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return self._hyperparameters

    @property
    def input_config_dir(self) -> str:
        return self._paths.input_config_dir

    @property
    def input_data_config(self) -> Mapping[str, Any]:
        return self._input_data_config

    @property
    def input_dir(self) -> str:
        return self._paths.input_dir

    @property
    def instance_groups(self) -> list[str]:
        return self._instance_groups

    @property
    def instance_groups_dict(self) -> dict[str, dict[str, Any]]:
        return self._instance_groups_dict

    @property
    def is_hetero(self) -> bool:
        return self._is_hetero

    @property
    def is_master(self) -> bool:
        return self._is_master

    @property
    def is_modelparallel_enabled(self) -> str | bool | None:
        return self._is_modelparallel_enabled

    @property
    def is_smddpmprun_installed(self) -> bool:
        return self._is_smddpmprun_installed

    @property
    def is_smddprun_installed(self) -> bool:
        return self._is_smddprun_installed

    @property
    def job_name(self) -> str | None:
        return self._job_name

    @property
    def log_level(self) -> Any:
        return self._log_level

    @property
    def master_hostname(self) -> str:
        return self._master_hostname

    @property
    def model_dir(self) -> str:
        return self._paths.model_dir

    @property
    def module_dir(self) -> str:
        return self._module_dir

    @property
    def module_name(self) -> str:
        return _module_name(self._module_name)

    @property
    def network_interface_name(self) -> str:
        return self._network_interface_name

    @property
    def num_cpus(self) -> int:
        return self._num_cpus

    @property
    def num_gpus(self) -> int:
        return self._num_gpus

    @property
    def num_neurons(self) -> int:
        return self._num_neurons

    @property
    def output_data_dir(self) -> str:
        return self._paths.output_data_dir

    @property
    def output_dir(self) -> str:
        return self._paths.output_dir

    @property
    def output_intermediate_dir(self) -> str:
        return self._paths.output_intermediate_dir

    @property
    def resource_config(self) -> Mapping[str, Any]:
        return self._resource_config

    @property
    def topology(self) -> Any:
        return self._topology

    @property
    def user_entry_point(self) -> Any:
        return self._user_entry_point

    # --- methods --------------------------------------------------------------------------------
    def sagemaker_s3_output(self) -> Any:
        """``sagemaker_s3_output`` from the hyperparameters, or None."""
        return self._sagemaker_s3_output

    def get_current_instance_group(self) -> Any:
        return self._resource_config["current_instance_group"]

    def get_current_instance_group_hosts(self) -> list[str]:
        return self._current_instance_group_hosts

    def get_instance_groups(self) -> list[str]:
        return self._instance_groups

    def get_instance_groups_dict(self) -> dict[str, dict[str, Any]]:
        return self._instance_groups_dict

    def get_distribution_hosts(self) -> list[str]:
        return self._distribution_hosts

    def get_master_hostname(self) -> str:
        return self._master_hostname

    def to_cmd_args(self) -> list[str]:
        """The user's hyperparameters as the command line the toolkit passes to the script."""
        return to_cmd_args(self.hyperparameters)

    def to_env_vars(self) -> dict[str, str]:
        """Every ``SM_*`` variable the toolkit sets for the script, from this environment."""
        env: dict[str, Any] = {
            "hosts": self.hosts,
            "network_interface_name": self.network_interface_name,
            "hps": self.hyperparameters,
            "user_entry_point": self.user_entry_point,
            "framework_params": self.additional_framework_parameters,
            "resource_config": self.resource_config,
            "input_data_config": self.input_data_config,
            "output_data_dir": self.output_data_dir,
            "channels": sorted(self.channel_input_dirs),
            "current_host": self.current_host,
            "current_instance_type": self.current_instance_type,
            "current_instance_group": self.current_instance_group,
            "current_instance_group_hosts": self.current_instance_group_hosts,
            "instance_groups": self.instance_groups,
            "instance_groups_dict": self.instance_groups_dict,
            "distribution_instance_groups": self.distribution_instance_groups,
            "is_hetero": self.is_hetero,
            "module_name": self.module_name,
            "log_level": self.log_level,
            "framework_module": self.framework_module,
            "input_dir": self.input_dir,
            "input_config_dir": self.input_config_dir,
            "output_dir": self.output_dir,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "num_neurons": self.num_neurons,
            "model_dir": self.model_dir,
            "module_dir": self.module_dir,
            "training_env": dict(self),
            "user_args": self.to_cmd_args(),
            "output_intermediate_dir": self.output_intermediate_dir,
        }
        if self.topology:
            env["topology"] = self.topology
        for name, path in self.channel_input_dirs.items():
            env[f"channel_{name}"] = path
        for key, value in self.hyperparameters.items():
            env[f"hp_{key}"] = value
        return to_env_vars(env)


def _on_path(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


_PATHS = Paths(base_dir_from_environment())

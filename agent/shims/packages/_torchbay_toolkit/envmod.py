"""The module-level API of ``sagemaker_training.environment`` (and of the legacy ``framework.env``).

Values come from the job contract the way the toolkit reads it inside the script's process:
``SAGEMAKER_BASE_DIR`` (``/opt/ml``; ``torchbay train`` sets it to its root), the config files under
``input/config``, and the environment. The folder names are fixed when this module is imported.
"""

import os
from typing import Any

from _torchbay_toolkit import training as _t

__all__ = [
    "BASE_PATH_ENV",
    "HYPERPARAMETERS_FILE",
    "INPUT_DATA_CONFIG_FILE",
    "RESOURCE_CONFIG_FILE",
    "SAGEMAKER_BASE_PATH",
    "Environment",
    "base_dir",
    "channel_path",
    "code_dir",
    "hyperparameters_file_dir",
    "input_config_dir",
    "input_data_config_file_dir",
    "input_dir",
    "model_dir",
    "num_cpus",
    "num_gpus",
    "num_neurons",
    "output_data_dir",
    "output_dir",
    "output_intermediate_dir",
    "read_hyperparameters",
    "read_input_data_config",
    "read_resource_config",
    "resource_config_file_dir",
    "validate_smddpmprun",
    "validate_smddprun",
    "write_env_vars",
]

SAGEMAKER_BASE_PATH = _t.SAGEMAKER_BASE_PATH
BASE_PATH_ENV = _t.BASE_PATH_ENV
HYPERPARAMETERS_FILE = _t.HYPERPARAMETERS_FILE
RESOURCE_CONFIG_FILE = _t.RESOURCE_CONFIG_FILE
INPUT_DATA_CONFIG_FILE = _t.INPUT_DATA_CONFIG_FILE

_paths = _t._PATHS
base_dir = _paths.base_dir
code_dir = _paths.code_dir
model_dir = _paths.model_dir
input_dir = _paths.input_dir
_input_data_dir = _paths.input_data_dir
input_config_dir = _paths.input_config_dir
output_dir = _paths.output_dir
output_data_dir = _paths.output_data_dir
output_intermediate_dir = _paths.output_intermediate_dir
hyperparameters_file_dir = _paths.hyperparameters_file_dir
input_data_config_file_dir = _paths.input_data_config_file_dir
resource_config_file_dir = _paths.resource_config_file_dir

Environment = _t.Environment


def read_hyperparameters() -> dict[str, Any]:
    """hyperparameters.json, each value JSON-decoded (kept as it is when it is not JSON)."""
    return _t.decode_hyperparameters(_t.read_json(hyperparameters_file_dir))


def read_resource_config() -> Any:
    """resourceconfig.json."""
    return _t.read_json(resource_config_file_dir)


def read_input_data_config() -> Any:
    """inputdataconfig.json."""
    return _t.read_json(input_data_config_file_dir)


def channel_path(channel: str) -> str:
    """``<base>/input/data/<channel>``."""
    return os.path.join(_input_data_dir, channel)


def num_gpus() -> int:
    """GPUs as ``nvidia-smi --list-gpus`` lists them."""
    return _t.count_gpus()


def num_cpus() -> int:
    """``multiprocessing.cpu_count()``."""
    return _t.count_cpus()


def num_neurons(instance_type: str | None) -> int:
    """Neuron cores on this instance (0 without Neuron devices)."""
    return _t.count_neurons(instance_type)


def validate_smddprun() -> bool:
    """Whether ``smddprun`` is on PATH."""
    return _t._on_path("smddprun")


def validate_smddpmprun() -> bool:
    """Whether ``smddpmprun`` is on PATH."""
    return _t._on_path("smddpmprun")


def write_env_vars(env_vars: dict[str, str] | None = None) -> None:
    """Put ``env_vars`` (and ``PYTHONPATH`` from sys.path) into ``os.environ``."""
    import sys

    env_vars = env_vars or {}
    env_vars["PYTHONPATH"] = ":".join(sys.path)
    for name, value in env_vars.items():
        os.environ[name] = value

"""``sagemaker_containers.beta.framework``: ``env``, ``training_env()``, ``content_types`` and
``encoders``."""

from typing import NoReturn

from _torchbay_toolkit.missing import missing as _missing
from sagemaker_containers import training_env
from sagemaker_containers.beta.framework import content_types, encoders, env

__all__ = ["content_types", "encoders", "env", "training_env"]

_INSTEAD = {
    "modules": "`torchbay train` (it installs code/requirements.txt and runs the entry point)",
    "entry_point": "`torchbay train`",
    "trainer": "`torchbay train`",
    "worker": "model_fn/input_fn/predict_fn/output_fn in code/inference.py under `torchbay serve`",
    "server": "`torchbay serve`",
    "transformer": (
        "model_fn/input_fn/predict_fn/output_fn in code/inference.py under `torchbay serve`"
    ),
    "functions": "plain Python",
    "mapping": "plain dicts",
}


def __getattr__(name: str) -> NoReturn:
    _missing(__name__, name, "sagemaker-containers", _INSTEAD)

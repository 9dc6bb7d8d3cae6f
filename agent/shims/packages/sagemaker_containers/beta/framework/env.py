"""``sagemaker_containers.beta.framework.env``: ``TrainingEnv`` and the module-level folders and
readers."""

from typing import NoReturn

from _torchbay_toolkit import envmod as _envmod
from _torchbay_toolkit.envmod import *  # noqa: F403  (the module API, as envmod's __all__ lists it)
from _torchbay_toolkit.missing import missing as _missing
from _torchbay_toolkit.training import Environment as TrainingEnv

# Spelled so that linters and type checkers can read the names (a starred list they cannot).
__all__ = ["TrainingEnv"]
__all__ += _envmod.__all__


def __getattr__(name: str) -> NoReturn:
    _missing(
        __name__,
        name,
        "sagemaker-containers",
        {"ServingEnv": "the SAGEMAKER_* serving settings of `torchbay serve`"},
    )

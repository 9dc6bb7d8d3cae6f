"""``sagemaker_containers.beta.framework.env``: ``TrainingEnv`` and the module-level folders and
readers."""

from _torchbay_toolkit.envmod import *  # noqa: F403
from _torchbay_toolkit.envmod import __all__ as _names
from _torchbay_toolkit.missing import missing as _missing
from _torchbay_toolkit.training import Environment as TrainingEnv

__all__ = [*_names, "TrainingEnv"]


def __getattr__(name):
    _missing(
        __name__,
        name,
        "sagemaker-containers",
        {"ServingEnv": "the SAGEMAKER_* serving settings of `torchbay serve`"},
    )

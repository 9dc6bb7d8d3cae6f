"""``sagemaker_training.environment`` as sagemaker-training 5.x has it: ``Environment()``, the
folders and readers.

Values come from the job contract the way the toolkit reads it inside the script's process:
``SAGEMAKER_BASE_DIR`` (``/opt/ml``; ``torchbay train`` sets it to its root), the config files under
``input/config``, and the environment. The folder names are fixed when this module is imported.
"""

from typing import NoReturn

from _torchbay_toolkit.envmod import *  # noqa: F403  (the module API, as envmod's __all__ lists it)
from _torchbay_toolkit.envmod import __all__  # noqa: F401  (re-exported: the same names)
from _torchbay_toolkit.missing import missing as _missing


def __getattr__(name: str) -> NoReturn:
    _missing(__name__, name, "sagemaker-training")

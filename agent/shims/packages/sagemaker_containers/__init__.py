"""TorchBay's stand-in for the legacy sagemaker-containers 2.x: ``training_env()`` and
``beta.framework``.

The real package does not run on Python 3.10+ (``collections.Mapping``); scripts written for it run
unchanged here. ``training_env()`` returns the same object as
``sagemaker_training.environment.Environment()``
(every property the legacy ``TrainingEnv`` had, with the same values).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from _torchbay_toolkit.missing import missing as _missing

if TYPE_CHECKING:
    from _torchbay_toolkit.training import Environment

__torchbay_shim__ = True
__version__ = "2.8.6+torchbay"
__all__ = ["beta", "training_env"]

_INSTEAD = {
    "entry_point": "`torchbay train` (it runs the entry point named by sagemaker_program)",
    "trainer": "`torchbay train`",
    "mpi": "`torchbay train` with torch.distributed",
    "_server": "`torchbay serve`",
    "_worker": "`torchbay serve`",
}


def training_env() -> Environment:
    """The training environment of this job (``sagemaker_training.environment.Environment``'s
    values)."""
    # Imported on the first call, as the toolkit reads the folders: SAGEMAKER_BASE_DIR is read
    # when _torchbay_toolkit.training is imported, not when sagemaker_containers is.
    from _torchbay_toolkit.training import Environment

    return Environment()


def __getattr__(name: str) -> ModuleType:
    import importlib

    if name == "beta":
        return importlib.import_module(f"{__name__}.beta")
    _missing(__name__, name, "sagemaker-containers", _INSTEAD)

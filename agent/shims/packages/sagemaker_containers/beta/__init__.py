"""``sagemaker_containers.beta``: only ``framework`` exists."""

from types import ModuleType

from _torchbay_toolkit.missing import missing as _missing

__all__ = ["framework"]


def __getattr__(name: str) -> ModuleType:
    import importlib

    if name == "framework":
        return importlib.import_module(f"{__name__}.framework")
    _missing(__name__, name, "sagemaker-containers")

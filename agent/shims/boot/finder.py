"""The meta path finder for the toolkit stand-ins (stdlib only: it runs at every start of the user's Python)."""

from __future__ import annotations

import importlib.machinery
import sys
from typing import Any, Optional, Sequence

__all__ = ["SHIMMED", "ShimFinder", "install"]

# top-level name -> the PyPI distribution it stands in for
SHIMMED = {
    "sagemaker_training": "sagemaker-training",
    "sagemaker_containers": "sagemaker-containers",
    "sagemaker_inference": "sagemaker-inference",
    "_torchbay_toolkit": "torchbay",  # the code the three share
}


class ShimFinder:
    """Finds the stand-in packages in ``directory``; asked last, so any real package is found first."""

    torchbay_shims = True

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: Any = None) -> Any:
        top, dot, _ = fullname.partition(".")
        if top not in SHIMMED:
            return None
        if not dot:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])
        parent = sys.modules.get(top)
        if parent is not None and getattr(parent, "__torchbay_shim__", False):
            # a submodule the stand-in does not have: say so instead of a bare "No module named"
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: TorchBay's stand-in for {SHIMMED[top]} provides only the modules "
                f"listed in the README (section 'The SageMaker toolkits' Python API'); pip install "
                f"{SHIMMED[top]} to use the real package", name=fullname)
        return None

    def __repr__(self) -> str:
        return f"ShimFinder({self.directory!r})"


def install(directory: str) -> bool:
    """Append a ShimFinder for ``directory`` to ``sys.meta_path`` unless one is there; True when added."""
    if any(getattr(finder, "torchbay_shims", False) for finder in sys.meta_path):
        return False
    sys.meta_path.append(ShimFinder(directory))
    return True

"""Runs at the start of every Python process of the user's job (this folder is on its PYTHONPATH).

It adds the finder of TorchBay's stand-ins for the SageMaker toolkits at the end of
``sys.meta_path`` (so a real installed package is always found first), then runs the
``sitecustomize`` this file shadows, if any. Stdlib only and cheap (it runs at every interpreter
start); nothing is imported by name from ``agent``, since the user's code dir may hold a module of
that name. ``agent.shims`` imports :class:`ShimFinder` and :func:`install` from here for the
serving workers.
"""

from __future__ import annotations  # the annotations stay strings: nothing imported for them

import importlib.machinery
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing at every interpreter start costs ms
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

# top-level name -> the PyPI distribution it stands in for
SHIMMED = {
    "sagemaker_training": "sagemaker-training",
    "sagemaker_containers": "sagemaker-containers",
    "sagemaker_inference": "sagemaker-inference",
    "_torchbay_toolkit": "torchbay",  # the code the three share
}


class ShimFinder:
    """Finds the stand-in packages in ``directory``; asked last, so any real package is found
    first."""

    torchbay_shims = True

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        top, dot, _ = fullname.partition(".")
        if top not in SHIMMED:
            return None
        if not dot:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])
        parent = sys.modules.get(top)
        if parent is not None and getattr(parent, "__torchbay_shim__", False):
            # a submodule the stand-in does not have: say so instead of a bare "No module named"
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: TorchBay's stand-in for {SHIMMED[top]} provides "
                "only the modules "
                f"listed in the README (section 'The SageMaker toolkits' Python API'); pip install "
                f"{SHIMMED[top]} to use the real package",
                name=fullname,
            )
        return None

    def __repr__(self) -> str:
        return f"ShimFinder({self.directory!r})"


def install(directory: str) -> bool:
    """Append a ShimFinder for ``directory`` to ``sys.meta_path`` unless one is there; True when
    added."""
    if any(getattr(finder, "torchbay_shims", False) for finder in sys.meta_path):
        return False
    sys.meta_path.append(ShimFinder(directory))
    return True


def _boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    install(os.path.join(os.path.dirname(here), "packages"))
    # The sitecustomize this one shadows (a distribution's or the image's) still runs.
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    chained = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if (
        chained is not None
        and chained.loader is not None
        and chained.origin != os.path.abspath(__file__)
    ):
        from importlib.util import module_from_spec  # only when there is one to chain to

        module = module_from_spec(chained)
        chained.loader.exec_module(module)


if __name__ == "sitecustomize":
    try:
        _boot()
    except Exception as _err:  # never stop the user's interpreter from starting
        sys.stderr.write(
            f"torchbay: the SageMaker toolkit stand-ins are off: {type(_err).__name__}: {_err}\n"
        )

"""Runs at the start of every Python process of the user's job (this folder is on its PYTHONPATH).

It adds the finder of TorchBay's stand-ins for the SageMaker toolkits at the end of ``sys.meta_path``
(a real installed package is always found first), then runs the ``sitecustomize`` this file shadows, if
any. Stdlib only, and nothing is imported by name from ``agent``: the user's code dir may hold a module
of that name.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _torchbay_boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_torchbay_shim_finder", os.path.join(here, "finder.py"))
    if spec is None or spec.loader is None:
        return
    finder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finder)
    finder.install(os.path.join(os.path.dirname(here), "packages"))
    # The sitecustomize this one shadows (a distribution's or the image's) still runs.
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    chained = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if chained is not None and chained.loader is not None and chained.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(chained)
        chained.loader.exec_module(module)


try:
    _torchbay_boot()
except Exception as _err:  # never stop the user's interpreter from starting
    sys.stderr.write(f"torchbay: the SageMaker toolkit stand-ins are off: {type(_err).__name__}: {_err}\n")
del _torchbay_boot

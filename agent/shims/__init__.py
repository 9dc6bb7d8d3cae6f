"""Stand-ins for the SageMaker toolkits' Python API, served when the real packages are not
installed.

``sagemaker_training`` (``environment.Environment`` and helpers), ``sagemaker_containers``
(``training_env()``, ``beta.framework``) and ``sagemaker_inference`` (content types, codecs, errors,
the default handler) live under ``packages/``. They are found by a finder placed at the *end* of
``sys.meta_path``: Python's own path finder (``PYTHONPATH``, the code dir, site-packages) is asked
first, so a real package the user installed always wins. The user's processes get the finder from
``boot/sitecustomize.py`` (its folder is on their ``PYTHONPATH``; it runs any other sitecustomize
after it); serving workers call :func:`install` before importing the user's module.

The stand-ins read the job contract as the toolkits do at run time (``input/config/*.json`` under
``SAGEMAKER_BASE_DIR``, which the agent sets to its root, and the process environment), so they
equal the real toolkits on whatever the agent wrote; they import nothing from ``agent`` and never
import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.shims.boot.sitecustomize import SHIMMED
from agent.shims.boot.sitecustomize import install as _boot_install

# boot/sitecustomize.py runs at every interpreter start of the user's job and is kept to bare
# stdlib code; this is the signature it has.
_install: Callable[[str], bool] = _boot_install

__all__ = ["BOOT_DIR", "PACKAGES_DIR", "SHIMMED", "install"]

BOOT_DIR = Path(__file__).resolve().parent / "boot"
PACKAGES_DIR = Path(__file__).resolve().parent / "packages"


def install() -> bool:
    """Put the stand-ins' finder at the end of ``sys.meta_path`` (once); True when added now."""
    return _install(str(PACKAGES_DIR))

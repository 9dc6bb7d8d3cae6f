"""The AttributeError a stand-in module raises for a name the real toolkit has and TorchBay does
not."""

from collections.abc import Mapping
from typing import NoReturn

_README = "the README, section 'The SageMaker toolkits' Python API'"


def missing(
    module: str, name: str, distribution: str, instead: Mapping[str, str] | None = None
) -> NoReturn:
    """Raise the AttributeError for ``module.name``: not provided, and what to use instead."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    hint = (instead or {}).get(name)
    use = f"use {hint}" if hint else f"see {_README} for what is provided"
    if distribution == "sagemaker-containers":  # the real one cannot be installed on Python 3.10+
        raise AttributeError(
            f"{module}.{name} is not provided by TorchBay's stand-in for {distribution}; {use}"
        )
    raise AttributeError(
        f"{module}.{name} is not provided by TorchBay's stand-in for {distribution}; {use}, or "
        f"pip install {distribution} (a real installed package replaces the stand-in)"
    )

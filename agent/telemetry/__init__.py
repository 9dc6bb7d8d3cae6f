"""The log/metric agent: per-rank log capture, regex metrics, system metrics, shipping to the output
prefix.

``LogCapture`` tails the ranks' files; ``Telemetry`` samples the system, serves Prometheus
and uploads the job log and metrics file; ``default_paths(job)`` names those two files.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LogCapture", "Telemetry", "default_paths"]

# Lazy: importing LogCapture on the train agent's start-up path must not pull in psutil and the
# sampler.
_EXPORTS = {
    "LogCapture": "agent.telemetry.capture",
    "Telemetry": "agent.telemetry.service",
    "default_paths": "agent.telemetry.service",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agent.telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

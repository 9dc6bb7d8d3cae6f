"""The log/metric agent: per-rank log capture, regex metrics, system metrics, shipping to the output prefix.

``LogCapture`` tails the ranks' files; ``Telemetry`` samples the system, serves Prometheus
and uploads the job log and metrics file; ``default_paths(job)`` names those two files.
"""

from __future__ import annotations

from agent.telemetry.capture import LogCapture
from agent.telemetry.service import Telemetry, default_paths

__all__ = ["LogCapture", "Telemetry", "default_paths"]

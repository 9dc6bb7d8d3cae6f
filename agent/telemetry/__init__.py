"""The log/metric agent: per-rank log capture, regex metrics, system metrics, shipping to the output prefix."""

from __future__ import annotations

from agent.telemetry.capture import LogCapture

__all__ = ["LogCapture"]

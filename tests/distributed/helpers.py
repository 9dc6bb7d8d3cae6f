"""Builders of Job objects for the distributed tests (no files, no environment of this process)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.job import Job, Layout, Resource
from agent.settings import read_settings


def make_job(
    tmp_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    hosts: tuple[str, ...] = ("algo-1",),
    current: str = "algo-1",
    hyperparameters: Mapping[str, Any] | None = None,
    environment: Mapping[str, str] | None = None,
    on_sagemaker: bool = False,
    settings_env: Mapping[str, str] | None = None,
    interface: str = "eth0",
) -> Job:
    """A Job whose agent environment is ``env`` and whose settings come from ``settings_env``."""
    return Job(
        name="job-1",
        layout=Layout(tmp_path / "ml"),
        settings=read_settings(dict(settings_env or {})),
        resource=Resource(current_host=current, hosts=hosts, network_interface_name=interface),
        hyperparameters=types.MappingProxyType(dict(hyperparameters or {})),
        environment=types.MappingProxyType(dict(environment or {})),
        on_sagemaker=on_sagemaker,
        instance_count=len(hosts),
        base_env=types.MappingProxyType(dict(env or {})),
    )

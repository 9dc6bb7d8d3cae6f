"""Serving settings resolved once: settings and flags in, one frozen ServeConfig out."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.job import Layout
from agent.settings import Settings

__all__ = ["ServeConfig", "assign_gpu", "available_cores", "resolve_config"]


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server needs, decided before the model is loaded."""

    layout: Layout
    host: str
    port: int
    model_uri: str | None
    program: str
    workers: int
    torch_threads: int
    http_threads: int
    timeout: float  # seconds per request
    max_payload_bytes: int
    default_accept: str
    batch_size: int
    batch_delay: float  # seconds
    grace_period: float
    preload: bool
    crash_window: float
    gpus: int
    log_level: str
    header_timeout: float = 10.0  # seconds for a request's headers
    body_min_rate: float = 65536.0  # bytes/s a body must at least arrive at
    keepalive: float = 5.0  # seconds an idle connection stays open
    max_decoded_bytes: int = 24 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_json_depth: int = 32
    stuck_timeout: float = 90.0  # seconds one model call may run before its worker is replaced
    model_file: str | None = (
        None  # a file name in model_dir or a format (see agent.serving.formats)
    )
    compile_program: bool = False

    @property
    def model_dir(self) -> Path:
        return self.layout.model_dir

    @property
    def code_dir(self) -> Path:
        return self.layout.model_dir / "code"

    def execution_parameters(self) -> dict[str, Any]:
        """The body of ``GET /execution-parameters`` (SageMaker batch transform)."""
        return {
            "MaxConcurrentTransforms": self.workers * self.http_threads,
            "BatchStrategy": "MULTI_RECORD",
            "MaxPayloadInMB": max(1, int(self.max_payload_bytes // (1024 * 1024))),
        }


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_config(
    settings: Settings,
    overrides: Mapping[str, Any] | None = None,
    *,
    cores: int | None = None,
    gpus: int = 0,
) -> ServeConfig:
    """Settings plus command-line ``overrides`` (None values ignored) into a ServeConfig.

    Workers default to ``serve_workers_per_gpu`` per GPU (unset: min(4, cores // gpus), at least 1),
    else one per core; torch threads to cores // workers, so workers x threads never exceed the
    cores unless both are set explicitly.
    """
    values = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = set(values) - set(settings.as_dict())
    if unknown:
        raise ConfigError(
            f"unknown serving overrides {sorted(unknown)}; this is a bug in the caller"
        )
    settings = settings.replace(**values)  # each flag checked as its setting is
    serving = settings.serving
    cores = cores or available_cores()
    if serving.serve_workers:
        workers = serving.serve_workers
    elif gpus:
        workers = gpus * (serving.serve_workers_per_gpu or max(1, min(4, cores // gpus)))
    else:
        workers = cores
    torch_threads = serving.serve_torch_threads or max(1, cores // workers)
    batch_size = serving.serve_batch_size
    http_threads = serving.serve_http_threads or max(4, 2 * batch_size)
    return ServeConfig(
        layout=Layout(Path(settings.general.root)),
        host=serving.serve_host,
        port=serving.serve_port,
        model_uri=serving.serve_model_uri,
        program=serving.serve_program,
        workers=workers,
        torch_threads=torch_threads,
        http_threads=http_threads,
        timeout=serving.serve_timeout,
        max_payload_bytes=int(serving.serve_max_payload_mb * 1024 * 1024),
        default_accept=serving.serve_default_accept,
        batch_size=batch_size,
        batch_delay=serving.serve_batch_delay_ms / 1000.0,
        grace_period=serving.serve_grace_period,
        preload=serving.serve_preload and gpus == 0,
        crash_window=serving.serve_crash_window,
        gpus=gpus,
        log_level=settings.general.log_level,
        header_timeout=serving.serve_header_timeout,
        body_min_rate=serving.serve_body_min_rate,
        keepalive=serving.serve_keepalive,
        max_decoded_bytes=int(
            (serving.serve_max_decoded_mb or 4 * serving.serve_max_payload_mb) * 1024 * 1024
        ),
        max_image_pixels=serving.serve_max_image_pixels,
        max_json_depth=serving.serve_max_json_depth,
        stuck_timeout=serving.serve_stuck_timeout or serving.serve_timeout + 30.0,
        model_file=serving.serve_model_file,
        compile_program=serving.serve_compile,
    )


def assign_gpu(taken: Iterable[int | None], gpus: int) -> int:
    """The GPU for a new worker: the one fewest live workers use (``taken``: their GPUs), lowest
    first.

    Called as each worker is forked, this spreads workers round-robin, and a worker that replaces a
    dead one goes where the dead one was.
    """
    if gpus < 1:
        raise ConfigError(
            f"assign_gpu needs at least one GPU, got {gpus}; this is a bug in the caller"
        )
    counts = [0] * gpus
    for gpu in taken:
        if gpu is not None and 0 <= gpu < gpus:
            counts[gpu] += 1
    return counts.index(min(counts))

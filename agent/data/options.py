"""How to stage a channel (File mode): the options of agent.data.staging and its fetchers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["StageOptions"]


@dataclass(frozen=True)
class StageOptions:
    """How to stage: threads per process, worker processes (0 = pick from the list), ranged GETs
    for objects of ``range_threshold`` bytes or more in ``range_size`` parts, attempts per object,
    progress interval."""

    threads: int = 16
    processes: int = 0
    range_threshold: int = 1024**3
    range_size: int = 64 * 1024**2
    attempts: int = 5
    progress_interval: float = 5.0
    verify_md5: bool = True
    endpoint_url: str | None = None
    backoff: float = 0.5
    # signed GETs over http.client (agent.storage.lean), boto3 for anything unusual
    lean: bool = True
    # bytes per read of a large body into a reused buffer (1 MiB beat 4 and 16 MiB)
    read_size: int = 1024**2
    # no CRC32/SHA from S3: bodies up to this size are checked by the MD5 of a plain ETag
    md5_max_size: int = 1024**3
    # objects up to this size are fetched on one thread over ``small_connections`` multiplexed
    # connections (agent.storage.multiget; plain-HTTP endpoints, lean GETs); 0: every object on
    # the threads
    small_size: int = 1024**2
    small_connections: int = 64
    large_size: int = 16 * 1024**2  # objects this big or bigger ...
    large_streams: int = 4  # ... are fetched at most this many at a time per process
    # processes=0: a worker process per this many objects (up to one per core)
    objects_per_process: int = 4000
    # worker processes' environment (None: this process's)
    child_env: Mapping[str, str] | None = None

    @classmethod
    def from_settings(
        cls, settings: Any, child_env: Mapping[str, str] | None = None
    ) -> StageOptions:
        return cls(
            child_env=dict(child_env) if child_env else None,
            threads=settings.data.data_threads,
            processes=settings.data.data_processes,
            range_threshold=settings.data.data_range_threshold,
            range_size=settings.data.data_range_size,
            attempts=settings.data.data_attempts,
            progress_interval=settings.data.data_progress_interval,
            verify_md5=settings.data.data_verify_md5,
            endpoint_url=settings.general.endpoint_url,
            lean=settings.data.data_lean_get,
            read_size=settings.data.data_read_size,
            md5_max_size=settings.data.data_md5_max_size,
            small_size=settings.data.data_small_size,
            small_connections=settings.data.data_small_connections,
            large_size=settings.data.data_large_size,
            large_streams=settings.data.data_large_streams,
            objects_per_process=settings.data.data_objects_per_process,
        )

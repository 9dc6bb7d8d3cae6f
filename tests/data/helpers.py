"""Arranging jobs and buckets for the data agent's tests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.job import Channel, Job, Layout, Resource
from agent.settings import read_settings


def make_job(
    root: Path,
    channels: Iterable[Channel],
    *,
    endpoint: str | None,
    host: str = "algo-1",
    hosts: Iterable[str] = ("algo-1",),
    **settings: object,
) -> Job:
    values = read_settings({}).replace(
        endpoint_url=endpoint, data_progress_interval=0.5, **settings
    )
    return Job(
        name="job",
        layout=Layout(Path(root)),
        settings=values,
        resource=Resource(host, tuple(hosts)),
        channels=tuple(channels),
    )


def upload(s3, bucket: str, objects: Mapping[str, bytes], threads: int = 8) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]),
                objects.items(),
            )
        )


def random_objects(prefix: str, count: int, size: int, *, nested: bool = True) -> dict[str, bytes]:
    out = {}
    for i in range(count):
        key = f"{prefix}{i % 3}/{i:04d}.bin" if nested else f"{prefix}{i:04d}.bin"
        out[key] = os.urandom(size if size else i + 1)
    return out


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }

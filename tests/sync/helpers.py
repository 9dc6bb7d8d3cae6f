"""Shared helpers for the live sync tests: a job, polling, S3 look-ups, whole-file blobs, child
writers."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.job import Job, Layout, Resource
from agent.settings import read_settings
from agent.sync import LiveSync

LOG = logging.getLogger("test-sync")


def make_job(root: Path, endpoint: str, **fields: Any) -> Job:
    settings = read_settings({"AWS_ENDPOINT_URL": endpoint})
    overrides = {
        k[len("setting_") :]: fields.pop(k) for k in list(fields) if k.startswith("setting_")
    }
    if overrides:
        settings = settings.replace(**overrides)
    return Job(
        name="job-1",
        layout=Layout(root),
        settings=settings,
        resource=Resource("algo-1", ("algo-1",)),
        **fields,
    )


def wait_for(check: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


def keys(s3, bucket: str, prefix: str = "") -> dict[str, int]:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for item in resp.get("Contents", ())}


def body(s3, bucket: str, key: str, version: str | None = None) -> bytes:
    kwargs = {"VersionId": version} if version else {}
    return s3.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()


def all_versions(s3, bucket: str) -> list[tuple[str, str]]:
    resp = s3.list_object_versions(Bucket=bucket)
    return [(v["Key"], v["VersionId"]) for v in resp.get("Versions", ())]


def checked_blob(payload_size: int, seed: int) -> bytes:
    """``payload`` + sha256(payload): a blob that proves it is whole."""
    payload = hashlib.sha256(str(seed).encode()).digest() * (payload_size // 32)
    return payload + hashlib.sha256(payload).digest()


def is_whole(blob: bytes) -> bool:
    return len(blob) > 32 and hashlib.sha256(blob[:-32]).digest() == blob[-32:]


def spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def started_sync(root: Path, endpoint: str, bucket: str, **fields: Any) -> LiveSync:
    """A started LiveSync mirroring ``root/checkpoints`` to ``s3://<bucket>/ckpt`` (``setting_*``
    overrides)."""
    sync = LiveSync(
        make_job(root, endpoint, checkpoint_uri=f"s3://{bucket}/ckpt", **fields), log=LOG
    )
    sync.start()
    return sync

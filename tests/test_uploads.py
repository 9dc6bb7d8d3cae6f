"""agent/uploads.py: end-of-job uploads through an S3 outage (a relay in front of moto goes down and
back)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from agent.errors import BucketMissing, UploadIncomplete
from agent.storage import S3Storage, make_s3_client
from agent.uploads import DeadlineStorage, put_until

LOG = logging.getLogger("torchbay.test.uploads")
MiB = 1024 * 1024


def _storage(endpoint: str) -> S3Storage:
    return S3Storage(make_s3_client(endpoint, 16, max_attempts=2, connect_timeout=5))


def _blob(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest()


def _remote_md5(s3, bucket: str, key: str) -> str:
    return hashlib.md5(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


def test_multipart_resumes_after_a_3s_outage(tmp_path, s3_proxy, s3, bucket, caplog) -> None:
    path = tmp_path / "model.tar.gz"
    digest = _blob(path, 43 * MiB)  # 9 parts of 5 MiB, 4 sent at once
    s3_proxy.outage_after(
        28 * MiB, 3.0
    )  # down once the first 4 parts are in and the next 4 are on the way
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger=LOG.name):
        attempts = put_until(
            _storage(s3_proxy.endpoint),
            path,
            f"s3://{bucket}/out/model.tar.gz",
            started + 10,
            log=LOG,
            part_size=5 * MiB,
        )
    elapsed = time.monotonic() - started
    assert s3_proxy.outages, "the outage did not happen during the upload"
    assert attempts > 1
    assert elapsed < 10
    assert _remote_md5(s3, bucket, "out/model.tar.gz") == digest
    assert (
        "parts are already there" in caplog.text
    )  # resumed: only the missing parts were sent again
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_multipart_fails_at_the_deadline_naming_the_object(tmp_path, s3_proxy, s3, bucket) -> None:
    path = tmp_path / "model.tar.gz"
    _blob(path, 12 * MiB)
    s3_proxy.outage_after(6 * MiB, 20.0)
    started = time.monotonic()
    with pytest.raises(UploadIncomplete) as info:
        put_until(
            _storage(s3_proxy.endpoint),
            path,
            f"s3://{bucket}/out/model.tar.gz",
            started + 10,
            log=LOG,
            part_size=5 * MiB,
        )
    elapsed = time.monotonic() - started
    assert 8 < elapsed < 14
    message = str(info.value)
    assert (
        "model.tar.gz was not uploaded" in message and f"s3://{bucket}/out/model.tar.gz" in message
    )
    assert "deadline" in message
    assert "testing-secret" not in message
    assert "Contents" not in s3.list_objects_v2(
        Bucket=bucket
    )  # nothing half-made under the real key


def test_small_file_is_sent_again_after_an_outage(tmp_path, s3_proxy, s3, bucket) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"x" * 1000)
    s3_proxy.stop()
    import threading

    threading.Timer(2.0, s3_proxy.start).start()
    attempts = put_until(
        _storage(s3_proxy.endpoint), path, f"s3://{bucket}/log.txt", time.monotonic() + 10, log=LOG
    )
    assert attempts > 1
    assert s3.get_object(Bucket=bucket, Key="log.txt")["Body"].read() == b"x" * 1000


def test_missing_bucket_fails_at_once(tmp_path, s3_proxy, s3_env) -> None:
    path = tmp_path / "model.tar.gz"
    _blob(path, 6 * MiB)
    started = time.monotonic()
    with pytest.raises(BucketMissing):
        put_until(
            _storage(s3_proxy.endpoint),
            path,
            "s3://no-such-bucket-here/model.tar.gz",
            started + 30,
            log=LOG,
            part_size=5 * MiB,
        )
    assert time.monotonic() - started < 5


def test_deadline_storage_retries_only_once_a_deadline_is_set(tmp_path, s3_proxy, bucket) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"line\n")
    storage = DeadlineStorage(lambda: _storage(s3_proxy.endpoint), log=LOG)
    s3_proxy.stop()
    started = time.monotonic()
    with pytest.raises(Exception):
        storage.put_file(path, f"s3://{bucket}/job.log")  # one try, as the periodic uploads do
    assert time.monotonic() - started < 8
    storage.set_deadline(time.monotonic() + 2)
    with pytest.raises(UploadIncomplete, match="job.log"):
        storage.put_file(path, f"s3://{bucket}/job.log")

"""Checkpoint restore (agent/sync/restore.py) through LiveSync.restore."""

from __future__ import annotations

import time

import pytest

from agent.errors import UnsafePathError
from agent.sync import LiveSync
from tests.sync.helpers import LOG, all_versions, make_job


def test_restore_finds_checkpoints_and_does_not_send_them_back(tmp_path, s3_server, s3, versioned):
    s3.put_object(Bucket=versioned, Key="ckpt/epoch-1.pt", Body=b"one" * 1000)
    s3.put_object(Bucket=versioned, Key="ckpt/sub/epoch-2.pt", Body=b"two" * 1000)
    s3.put_object(Bucket=versioned, Key="ckpt2/other.pt", Body=b"not mine")  # a sibling prefix
    job = make_job(tmp_path, s3_server.endpoint, checkpoint_uri=f"s3://{versioned}/ckpt")
    sync = LiveSync(job, log=LOG)
    assert sync.restore() == 2
    local = tmp_path / "checkpoints"
    assert (local / "epoch-1.pt").read_bytes() == b"one" * 1000
    assert (local / "sub" / "epoch-2.pt").read_bytes() == b"two" * 1000
    assert not (local / "other.pt").exists()
    sync.start()
    assert sync.close(time.monotonic() + 60) == []
    assert len(all_versions(s3, versioned)) == 3  # nothing uploaded again
    assert sync.counters.uploads == 0


def test_restore_into_an_empty_prefix_restores_nothing(tmp_path, s3_server, bucket):
    job = make_job(tmp_path, s3_server.endpoint, checkpoint_uri=f"s3://{bucket}/none")
    assert LiveSync(job, log=LOG).restore() == 0


def test_restore_refuses_a_key_that_escapes_the_folder(tmp_path, s3_server, s3, bucket):
    s3.put_object(Bucket=bucket, Key="ckpt/../../evil", Body=b"x")
    job = make_job(tmp_path, s3_server.endpoint, checkpoint_uri=f"s3://{bucket}/ckpt")
    with pytest.raises(UnsafePathError, match="evil"):
        LiveSync(job, log=LOG).restore()
    assert not (tmp_path.parent / "evil").exists()

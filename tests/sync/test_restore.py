"""Checkpoint restore (agent/sync/restore.py) through LiveSync.restore."""

from __future__ import annotations

import os
import time

import pytest

from agent.errors import UnsafePathError
from agent.sync import LiveSync, RestoreStopped
from tests.helpers import raises_once_stopped
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


def test_a_stop_request_starts_no_new_checkpoint_file(tmp_path, s3_proxy, s3, bucket):
    """A stop asked for while the checkpoints are restored (a signal to the agent, a spot reclaim)
    starts no new file: the files under way end, RestoreStopped is raised, and every file in
    place is whole. 24 x 256 KiB at 1 MiB/s would take 6 s; the stop comes after 1 s."""
    shards = {f"ckpt/shard-{i:02d}.pt": os.urandom(256 * 1024) for i in range(24)}
    for key, body in shards.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3_proxy.rate = 1024 * 1024
    job = make_job(
        tmp_path,
        s3_proxy.endpoint,
        checkpoint_uri=f"s3://{bucket}/ckpt",
        setting_sync_workers=2,
    )
    took = raises_once_stopped(RestoreStopped, 1.0, LiveSync(job, log=LOG).restore)
    assert took < 4.0, f"the restore went on for {took:.1f} s"
    local = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir() if p.is_file()}
    assert 0 < len(local) < len(shards)
    assert all(shards[f"ckpt/{name}"] == body for name, body in local.items())


def test_a_stop_request_ends_a_big_checkpoint_file_under_way(tmp_path, s3_proxy, s3, bucket):
    """One 12 MiB checkpoint at 1 MiB/s (12 s): a stop after 1 s ends it between two reads, with
    neither the file nor a .part left (before, the file under way finished: 11.6 s for a job's
    SIGTERM, past docker stop's 10 s)."""
    s3.put_object(Bucket=bucket, Key="ckpt/model.pt", Body=os.urandom(12 * 1024 * 1024))
    s3_proxy.rate = 1024 * 1024
    job = make_job(tmp_path, s3_proxy.endpoint, checkpoint_uri=f"s3://{bucket}/ckpt")
    took = raises_once_stopped(RestoreStopped, 1.0, LiveSync(job, log=LOG).restore)
    assert took < 3.0, f"the restore went on for {took:.1f} s"
    assert [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()] == []

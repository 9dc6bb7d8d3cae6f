"""File mode against the real moto server: nested keys, empty prefixes, manifests, sharding, hostile
keys,
full disks, resumption after an outage, worker processes and ranged GETs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import pytest

from agent.data import Listing, prepare_channels
from agent.data.listing import Entry
from agent.data.staging import StageOptions, StagingStopped, stage
from agent.errors import (
    ChannelError,
    DiskFullError,
    EndpointUnreachable,
    StorageError,
    UnsafePathError,
)
from agent.job import Channel
from agent.storage import JobStorage
from tests.conftest import free_port
from tests.data.helpers import make_job, random_objects, tree, upload
from tests.helpers import raises_once_stopped

LOG = logging.getLogger("test.data")


def test_nested_prefix_is_staged_byte_identical(s3_server, bucket, s3, tmp_path, caplog):
    objects = random_objects("train/", 30, 0)
    objects["train/deep/er/still/x.txt"] = b"hello"
    objects["other/not-mine.bin"] = b"no"
    upload(s3, bucket, objects)
    job = make_job(
        tmp_path, [Channel("train", f"s3://{bucket}/train/")], endpoint=s3_server.endpoint
    )
    with caplog.at_level(logging.INFO):
        handle = prepare_channels(job, log=LOG)
    staged = tree(tmp_path / "input/data/train")
    assert staged == {k[len("train/") :]: v for k, v in objects.items() if k.startswith("train/")}
    assert handle.staged["train"].fetched == 31
    assert f"channel 'train': listed 31 object(s) under s3://{bucket}/train/ in" in caplog.text
    assert "staged 31 files" in caplog.text
    assert "testing-secret" not in caplog.text
    assert not list((tmp_path / "input/data/train").rglob("*.part"))
    handle.stop(1)


def test_prefix_without_slash_and_single_object(s3_server, bucket, s3, tmp_path):
    upload(
        s3, bucket, {"data/a/1": b"1", "data/a/2": b"22", "data/ab": b"no", "one/file.csv": b"x,y"}
    )
    job = make_job(
        tmp_path,
        [Channel("a", f"s3://{bucket}/data/a"), Channel("one", f"s3://{bucket}/one/file.csv")],
        endpoint=s3_server.endpoint,
    )
    prepare_channels(job, log=LOG)
    # keys under the folder the prefix names lose it; names it only starts keep theirs (relative to
    # data/)
    assert tree(tmp_path / "input/data/a") == {"1": b"1", "2": b"22", "ab": b"no"}
    assert tree(tmp_path / "input/data/one") == {"file.csv": b"x,y"}


def test_empty_prefix_is_a_clear_channel_error(s3_server, bucket, tmp_path):
    job = make_job(
        tmp_path, [Channel("train", f"s3://{bucket}/nothing/here/")], endpoint=s3_server.endpoint
    )
    with pytest.raises(
        ChannelError, match=r"channel 'train': s3://.*/nothing/here/ matched no objects"
    ):
        prepare_channels(job, log=LOG)


def test_manifest_channel(s3_server, bucket, s3, tmp_path):
    objects = random_objects("imgs/", 6, 1000, nested=False)
    upload(s3, bucket, objects)
    manifest = [{"prefix": f"s3://{bucket}/imgs/"}, "0001.bin", "0004.bin", "0002.bin"]
    s3.put_object(Bucket=bucket, Key="m.json", Body=json.dumps(manifest).encode())
    job = make_job(
        tmp_path,
        [Channel("m", f"s3://{bucket}/m.json", s3_data_type="ManifestFile")],
        endpoint=s3_server.endpoint,
    )
    prepare_channels(job, log=LOG)
    assert tree(tmp_path / "input/data/m") == {
        k: objects[f"imgs/{k}"] for k in ("0001.bin", "0002.bin", "0004.bin")
    }


def test_manifest_that_is_not_a_manifest(s3_server, bucket, s3, tmp_path):
    s3.put_object(Bucket=bucket, Key="m.json", Body=b'["a", "b"]')
    job = make_job(
        tmp_path,
        [Channel("m", f"s3://{bucket}/m.json", s3_data_type="ManifestFile")],
        endpoint=s3_server.endpoint,
    )
    with pytest.raises(ChannelError, match="first element"):
        prepare_channels(job, log=LOG)


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_sharded_by_s3_key_splits_without_overlap(s3_server, bucket, s3, tmp_path, hosts):
    objects = random_objects("s/", 20, 64)
    upload(s3, bucket, objects)
    names = [f"algo-{i + 1}" for i in range(hosts)]
    seen: list[str] = []
    for i, host in enumerate(names):
        job = make_job(
            tmp_path / host,
            [Channel("t", f"s3://{bucket}/s/", distribution="ShardedByS3Key")],
            endpoint=s3_server.endpoint,
            host=host,
            hosts=names,
        )
        prepare_channels(job, log=LOG)
        mine = tree(tmp_path / host / "input/data/t")
        expected = [k for n, k in enumerate(sorted(objects)) if n % hosts == i]
        assert sorted(mine) == sorted(k[2:] for k in expected)
        assert all(objects["s/" + k] == v for k, v in mine.items())
        seen += list(mine)
    assert sorted(seen) == sorted(
        k[2:] for k in objects
    )  # the union is the whole set, no key twice


def test_fully_replicated_gives_every_host_everything(s3_server, bucket, s3, tmp_path):
    upload(s3, bucket, random_objects("s/", 5, 10))
    for host in ("algo-1", "algo-2"):
        job = make_job(
            tmp_path / host,
            [Channel("t", f"s3://{bucket}/s/")],
            endpoint=s3_server.endpoint,
            host=host,
            hosts=("algo-1", "algo-2"),
        )
        prepare_channels(job, log=LOG)
        assert len(tree(tmp_path / host / "input/data/t")) == 5


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../b"])
def test_hostile_keys_are_refused_and_nothing_is_written(s3_server, bucket, s3, tmp_path, key):
    upload(s3, bucket, {"p/ok.txt": b"fine", "p/" + key: b"evil"})
    root = tmp_path / "root"
    job = make_job(root, [Channel("t", f"s3://{bucket}/p/")], endpoint=s3_server.endpoint)
    with pytest.raises(UnsafePathError, match=repr(key).replace("(", r"\(")[:4]):
        prepare_channels(job, log=LOG)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_resume_skips_complete_files(s3_server, bucket, s3, tmp_path, caplog):
    objects = random_objects("r/", 12, 2048)
    upload(s3, bucket, objects)
    job = make_job(tmp_path, [Channel("t", f"s3://{bucket}/r/")], endpoint=s3_server.endpoint)
    assert prepare_channels(job, log=LOG).staged["t"].fetched == 12
    folder = tmp_path / "input/data/t"
    (folder / "0/0000.bin").unlink()
    (folder / "1/0001.bin").write_bytes(b"truncated")
    (folder / "2/0002.bin.part").write_bytes(b"leftover of a crash")
    result = prepare_channels(job, log=LOG).staged["t"]
    assert (result.fetched, result.skipped, result.files) == (2, 10, 12)
    assert tree(folder) == {k[2:]: v for k, v in objects.items()}


def test_worker_processes_and_ranged_gets(s3_server, bucket, s3, tmp_path):
    objects = random_objects("w/", 40, 3000)
    objects["w/big.bin"] = os.urandom(3 * 1024 * 1024 + 17)
    upload(s3, bucket, objects)
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/w/")],
        endpoint=s3_server.endpoint,
        data_processes=2,
        data_threads=4,
        data_range_threshold=1024 * 1024,
        data_range_size=1024 * 1024,
    )
    result = prepare_channels(job, log=LOG).staged["t"]
    assert result.processes == 2 and result.fetched == 41
    assert tree(tmp_path / "input/data/t") == {k[2:]: v for k, v in objects.items()}


def test_file_uri_source_and_fastfile_fallback(tmp_path, caplog):
    src = tmp_path / "src"
    (src / "x/y").mkdir(parents=True)
    (src / "x/y/z.txt").write_bytes(b"zz")
    (src / "top.txt").write_bytes(b"t")
    job = make_job(
        tmp_path / "root", [Channel("f", f"file://{src}", input_mode="FastFile")], endpoint=None
    )
    with caplog.at_level(logging.WARNING):
        prepare_channels(job, log=LOG)
    assert tree(tmp_path / "root/input/data/f") == {"x/y/z.txt": b"zz", "top.txt": b"t"}
    assert caplog.text.count("FastFile") == 1


def test_channel_without_uri_is_left_alone(tmp_path):
    job = make_job(tmp_path, [Channel("t", None)], endpoint=None)
    handle = prepare_channels(job, log=LOG)
    assert handle.staged == {} and not (tmp_path / "input/data/t").exists()
    handle.stop(1)


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs (needs root): {done.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_fails_with_the_folder_named(s3_server, bucket, s3, tmp_path, small_disk):
    upload(s3, bucket, random_objects("big/", 8, 512 * 1024, nested=False))
    job = make_job(
        small_disk,
        [Channel("t", f"s3://{bucket}/big/")],
        endpoint=s3_server.endpoint,
        data_threads=4,
    )
    with pytest.raises(DiskFullError, match=str(small_disk / "input/data/t")):
        prepare_channels(job, log=LOG)
    folder = small_disk / "input/data/t"
    assert not list(folder.rglob("*.part"))
    for path in folder.rglob("*.bin"):  # whatever is under a real name is complete
        assert path.stat().st_size == 512 * 1024


def test_restart_of_the_server_mid_staging_then_rerun(s3_server, bucket, s3, tmp_path):
    objects = random_objects("o/", 120, 32 * 1024)
    upload(s3, bucket, objects)
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/o/")],
        endpoint=s3_server.endpoint,
        data_threads=2,
        data_processes=1,
        data_attempts=2,
    )
    folder = tmp_path / "input/data/t"
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            prepare_channels(job, log=LOG)
        except BaseException as err:
            outcome.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(folder.rglob("*.bin"))) < 10:
        time.sleep(0.01)
    s3_server.stop()
    try:
        worker.join(180)
        assert not worker.is_alive()
        assert outcome and isinstance(outcome[0], (EndpointUnreachable, StorageError)), outcome
        assert "testing-secret" not in str(outcome[0])
        partial = len(list(folder.rglob("*.bin")))
        assert 10 <= partial < 120
    finally:
        s3_server.start()
    s3.create_bucket(Bucket=bucket)  # moto forgets everything when it stops
    upload(s3, bucket, objects)
    result = prepare_channels(job, log=LOG).staged["t"]
    assert result.files == 120 and result.skipped == partial and result.fetched == 120 - partial
    assert tree(folder) == {k[2:]: v for k, v in objects.items()}


def test_stage_refuses_two_keys_for_one_path(tmp_path):
    entries = [Entry("file:///a", "x"), Entry("file:///b", "x/y")]
    with pytest.raises(ChannelError, match="needs it as a folder"):
        stage(entries, tmp_path / "d", options=StageOptions(), log=LOG)


def test_an_abandoned_listing_stops_retrying_at_once(tmp_path, dummy_creds, caplog):
    """A job that fails before it stages abandons its channel listing: against an endpoint that
    is down, the listing thread stops in its backoff instead of retrying while the job ends,
    and logs no listing."""
    job = make_job(
        tmp_path,
        [Channel("t", "s3://bucket/o/")],
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens: every page is refused
        data_attempts=8,
    )
    with caplog.at_level(logging.DEBUG):
        listing = Listing(job, log=LOG, storages=JobStorage.from_settings(job.settings))
        time.sleep(1.0)
        assert listing.running()  # 8 attempts with backoff: several seconds of retries left
        listing.abandon()
        deadline = time.monotonic() + 2
        while listing.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not listing.running()
    assert "listed" not in caplog.text


# The stop asked for after 1 s; staging the whole channel through the capped proxy takes ~12 s.
_STOP_AFTER = 1.0


@pytest.mark.parametrize(
    "path",
    [
        {},  # the multiplexed GETs
        {"data_small_size": 0},  # every object on the threads
        {"data_processes": 2},  # worker processes
    ],
    ids=["multiplexed", "threads", "processes"],
)
def test_a_stop_request_ends_staging_at_the_next_tick(s3_proxy, bucket, s3, tmp_path, path):
    """A stop asked for while a slow channel stages (a signal to the agent) ends the staging at the
    next progress tick instead of after the last object: StagingStopped, no new GET, the worker
    processes ended; what was renamed into place is whole, and the fetchers in this process leave
    no .part file."""
    objects = random_objects("slow/", 48, 256 * 1024, nested=False)
    upload(s3, bucket, objects)
    s3_proxy.rate = 1024 * 1024  # 12 MiB at 1 MiB/s
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/slow/")],
        endpoint=s3_proxy.endpoint,
        data_threads=4,  # an object in flight takes ~1 s to finish at a quarter of the rate
        **path,
    )
    took = raises_once_stopped(
        StagingStopped,
        _STOP_AFTER,
        lambda asked: prepare_channels(job, log=LOG, stop=asked.is_set),
        match="channel 't': staging stopped on request",
    )
    assert took < _STOP_AFTER + 4.0, f"staging went on for {took:.1f} s"
    folder = tmp_path / "input/data/t"
    staged = tree(folder)
    staged = {k: v for k, v in staged.items() if not k.endswith(".part")}
    assert len(staged) < len(objects)
    assert all(objects["slow/" + name] == body for name, body in staged.items())
    if "data_processes" not in path:  # a worker ended by SIGTERM may leave its .part behind
        assert not list(folder.rglob("*.part"))


def test_a_failure_while_no_stop_was_asked_is_still_the_failure(s3_proxy, bucket, s3, tmp_path):
    """``stop`` is asked but never says yes: an object that cannot be fetched fails the staging
    with its own error, not StagingStopped."""
    upload(s3, bucket, random_objects("gone/", 6, 1000, nested=False))
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/gone/")],
        endpoint=s3_proxy.endpoint,
        data_attempts=2,
    )
    listing = Listing(job, log=LOG, storages=JobStorage.from_settings(job.settings))
    planned = listing.result(lambda: False)
    s3_proxy.stop()  # down for good once listed
    with pytest.raises(StorageError):
        prepare_channels(job, log=LOG, planned=planned, stop=lambda: False)


def test_a_stop_request_ends_the_wait_for_a_listing(tmp_path, dummy_creds):
    """The job waits for its channel listing with the stop asked every 0.2 s: against an endpoint
    that is down, a stop ends the wait at once and abandons the listing."""
    job = make_job(
        tmp_path,
        [Channel("t", "s3://bucket/o/")],
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens: every page is refused
        data_attempts=8,
    )
    listing = Listing(job, log=LOG, storages=JobStorage.from_settings(job.settings))
    asked = time.monotonic() + 0.5
    start = time.monotonic()
    with pytest.raises(StagingStopped, match="listing stopped on request"):
        listing.result(lambda: time.monotonic() >= asked)
    assert time.monotonic() - start < 2.0
    deadline = time.monotonic() + 2
    while listing.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not listing.running()


@pytest.mark.parametrize("connections", [3, 24])
def test_the_small_objects_go_over_data_small_connections(
    s3_proxy, bucket, s3, tmp_path, connections
) -> None:
    """The one thread that fetches the small objects keeps up to data_small_connections connections
    open at once (64 by default; it was data_threads, 16, before 64 measured faster): the server
    never sees more at a time, besides the listing's, and sees that many when the objects are
    plenty."""
    objects = random_objects("many/", 120, 4 * 1024, nested=False)
    upload(s3, bucket, objects)
    job = make_job(
        tmp_path,
        [Channel("t", f"s3://{bucket}/many/")],
        endpoint=s3_proxy.endpoint,
        data_small_connections=connections,
    )
    prepare_channels(job, log=LOG)
    assert len(tree(tmp_path / "input/data/t")) == len(objects)
    assert connections <= s3_proxy.peak <= connections + 1

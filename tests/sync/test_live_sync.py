"""LiveSync against the real moto server: live uploads, no half-written objects, outages, close."""

from __future__ import annotations

import logging
import os
import signal
import struct
import time

from agent.sync import LiveSync
from tests.sync.helpers import (
    LOG,
    all_versions,
    body,
    checked_blob,
    is_whole,
    keys,
    make_job,
    spawn,
    started_sync,
    wait_for,
)

# --- live uploads
# -------------------------------------------------------------------------------------

CHECKPOINTER = """
    import hashlib, os, sys, time
    folder, size = sys.argv[1], int(sys.argv[2])
    n = 0
    while True:
        n += 1
        payload = hashlib.sha256(str(n).encode()).digest() * (size // 32)
        blob = payload + hashlib.sha256(payload).digest()
        tmp = os.path.join(folder, f"ckpt-{n:04d}.pt.tmp")
        with open(tmp, "wb") as out:          # written in pieces, as a big torch.save would be
            for i in range(0, len(blob), 65536):
                out.write(blob[i:i + 65536])
                out.flush()
                time.sleep(0.002)
        os.replace(tmp, os.path.join(folder, f"ckpt-{n:04d}.pt"))
        print("saved", n, flush=True)
        time.sleep(1.0)
"""


def test_checkpoints_every_second_then_sigterm_last_one_arrives_whole(
    tmp_path, s3_server, s3, versioned
):
    job = make_job(tmp_path, s3_server.endpoint, checkpoint_uri=f"s3://{versioned}/ckpt")
    sync = LiveSync(job, log=LOG)
    sync.restore()
    sync.start()
    local = tmp_path / "checkpoints"
    child = spawn(CHECKPOINTER, str(local), str(2 * 1024 * 1024))
    try:
        wait_for(lambda: "ckpt/ckpt-0002.pt" in keys(s3, versioned, "ckpt/"), timeout=90)
        wait_for(lambda: len(list(local.glob("ckpt-*.pt"))) >= 4, timeout=90)
    finally:
        os.killpg(child.pid, signal.SIGTERM)  # the spot-instance stop: no warning, mid-write
        child.wait(30)
    left = sync.close(time.monotonic() + 60)
    assert left == []
    finals = sorted(p.name for p in local.glob("ckpt-*.pt"))
    remote = keys(s3, versioned, "ckpt/")
    assert f"ckpt/{finals[-1]}" in remote  # the last complete checkpoint is in S3
    assert set(remote) == {f"ckpt/{name}" for name in finals}  # and no .tmp, nothing partial
    for key, version in all_versions(s3, versioned):  # every version the server ever held is whole
        assert is_whole(body(s3, versioned, key, version)), key


SLOW_WRITER = """
    import sys, time
    path, blob_path = sys.argv[1], sys.argv[2]
    blob = open(blob_path, "rb").read()
    pieces = [blob[i:i + len(blob) // 8] for i in range(0, len(blob), len(blob) // 8)]
    with open(path, "wb") as out:
        for i, piece in enumerate(pieces):
            out.write(piece)
            out.flush()
            print("piece", i, flush=True)
            time.sleep(3.0 if i == 3 else 0.3)   # one pause longer than the stability window
"""


def test_a_file_written_slowly_in_pieces_is_never_uploaded_half_written(
    tmp_path, s3_server, s3, versioned
):
    sync = started_sync(tmp_path, s3_server.endpoint, versioned, setting_sync_stable=0.5)
    blob = checked_blob(3 * 1024 * 1024, 7)
    (tmp_path / "blob").write_bytes(blob)
    child = spawn(SLOW_WRITER, str(tmp_path / "checkpoints" / "model.pt"), str(tmp_path / "blob"))
    try:
        while child.poll() is None:  # look at what the server holds while the file is being written
            for key, version in all_versions(s3, versioned):
                assert is_whole(body(s3, versioned, key, version)), (
                    "a half-written object was uploaded"
                )
            time.sleep(0.2)
        assert child.returncode == 0, child.stdout.read()
        data = wait_for(
            lambda: "ckpt/model.pt" in keys(s3, versioned) and body(s3, versioned, "ckpt/model.pt")
        )
        assert data == blob
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        sync.close(time.monotonic() + 60)
    assert [key for key, _ in all_versions(s3, versioned)] == ["ckpt/model.pt"]


def test_deletes_are_mirrored_and_bursts_become_few_uploads(tmp_path, s3_server, s3, versioned):
    sync = started_sync(tmp_path, s3_server.endpoint, versioned, setting_sync_settle=0.5)
    local = tmp_path / "checkpoints"
    (local / "old.pt").write_bytes(b"old")
    wait_for(lambda: "ckpt/old.pt" in keys(s3, versioned))
    (local / "old.pt").unlink()
    wait_for(lambda: "ckpt/old.pt" not in keys(s3, versioned))
    for i in range(50):  # 50 open-append-close cycles in a burst
        with open(local / "log.txt", "ab") as out:
            out.write(b"line %d\n" % i)
    wait_for(
        lambda: (
            body(s3, versioned, "ckpt/log.txt").count(b"\n") == 50
            if "ckpt/log.txt" in keys(s3, versioned)
            else False
        )
    )
    assert sync.close(time.monotonic() + 60) == []
    log_versions = [k for k, _ in all_versions(s3, versioned) if k == "ckpt/log.txt"]
    assert 1 <= len(log_versions) <= 10, len(log_versions)


def test_unchanged_file_is_not_uploaded_again(tmp_path, s3_server, s3, versioned):
    sync = started_sync(tmp_path, s3_server.endpoint, versioned)
    path = tmp_path / "checkpoints" / "a.pt"
    path.write_bytes(b"a" * 100)
    wait_for(lambda: "ckpt/a.pt" in keys(s3, versioned))
    with open(path, "rb") as handle:  # read, not written: no upload
        handle.read()
    with open(path, "ab"):  # opened for writing, closed, nothing changed: no upload
        pass
    time.sleep(1.0)
    assert sync.close(time.monotonic() + 60) == []
    assert len(all_versions(s3, versioned)) == 1


def test_large_file_goes_multipart_and_arrives_whole(tmp_path, s3_server, s3, bucket):
    sync = started_sync(
        tmp_path, s3_server.endpoint, bucket, setting_sync_part_size=5 * 1024 * 1024
    )
    blob = checked_blob(12 * 1024 * 1024, 3)
    (tmp_path / "checkpoints" / "big.pt").write_bytes(blob)
    wait_for(lambda: "ckpt/big.pt" in keys(s3, bucket))
    assert sync.close(time.monotonic() + 60) == []
    head = s3.head_object(Bucket=bucket, Key="ckpt/big.pt")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert body(s3, bucket, "ckpt/big.pt") == blob
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_intermediate_outputs_go_under_the_job_output_prefix(tmp_path, s3_server, s3, bucket):
    job = make_job(tmp_path, s3_server.endpoint, output_path=f"s3://{bucket}/out")
    sync = LiveSync(job, log=LOG)
    sync.start()
    folder = tmp_path / "output" / "intermediate" / "plots"
    folder.mkdir(parents=True)
    (folder / "loss.png").write_bytes(b"png")
    wait_for(lambda: "out/job-1/output/intermediate/plots/loss.png" in keys(s3, bucket))
    assert sync.close(time.monotonic() + 60) == []


def test_close_uploads_files_written_before_start(tmp_path, s3_server, s3, bucket):
    job = make_job(tmp_path, s3_server.endpoint, checkpoint_uri=f"s3://{bucket}/c")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "early.pt").write_bytes(b"e")
    sync = LiveSync(job, log=LOG)
    assert sync.close(time.monotonic() + 60) == []
    assert keys(s3, bucket) == {"c/early.pt": 1}


def test_file_uri_destination(tmp_path, s3_server):
    dest = tmp_path / "remote"
    job = make_job(tmp_path / "root", s3_server.endpoint, checkpoint_uri=f"file://{dest}")
    sync = LiveSync(job, log=LOG)
    sync.start()
    (tmp_path / "root" / "checkpoints" / "x.pt").write_bytes(b"xyz")
    wait_for((dest / "x.pt").exists)
    assert sync.close(time.monotonic() + 60) == []
    assert (dest / "x.pt").read_bytes() == b"xyz"
    assert sorted(os.listdir(dest)) == ["x.pt"]


# --- TensorBoard
# --------------------------------------------------------------------------------------

TB_WRITER = """
    import sys, time
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(sys.argv[1], flush_secs=1)
    step = 0
    while True:
        writer.add_scalar("loss", 1.0 / (step + 1), step)
        writer.flush()
        step += 1
        time.sleep(0.2)
"""


def count_records(blob: bytes) -> int:
    """TFRecord framing: u64 length, u32 crc, data, u32 crc; a cut-off last record is not
    counted."""
    count, at = 0, 0
    while at + 12 <= len(blob):
        (length,) = struct.unpack("<Q", blob[at : at + 8])
        if at + 12 + length + 4 > len(blob):
            break
        at += 12 + length + 4
        count += 1
    return count


def test_tensorboard_events_visible_while_the_writer_runs(tmp_path, s3_server, s3, bucket):
    # The writer flushes every 0.2 s, never pausing for the 1 s stability window: it is sent anyway
    # (at least every 5 x sync_stable), since TensorBoard keeps its event file open and growing.
    job = make_job(
        tmp_path, s3_server.endpoint, tensorboard_uri=f"s3://{bucket}/tb", setting_sync_stable=1.0
    )
    sync = LiveSync(job, log=LOG)
    sync.start()
    child = spawn(TB_WRITER, str(tmp_path / "output" / "tensorboard"))
    try:

        def grown() -> bool:
            found = [k for k in keys(s3, bucket, "tb/") if "tfevents" in k]
            return bool(found) and count_records(body(s3, bucket, found[0])) >= 5

        wait_for(grown, timeout=120, every=0.3)
        assert child.poll() is None, child.stdout.read()  # the writer is still running
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(30)
    assert sync.close(time.monotonic() + 60) == []
    [event_file] = list((tmp_path / "output" / "tensorboard").glob("*tfevents*"))
    assert body(s3, bucket, f"tb/{event_file.name}") == event_file.read_bytes()
    # SummaryWriter reopens and closes its file on each flush (5 a second here): at most one upload
    # a second
    assert sync.counters.uploads <= 2 + count_records(event_file.read_bytes()) // 5


OPEN_APPENDER = """
    import sys, time
    with open(sys.argv[1], "ab") as out:   # kept open, a record per flush, like TensorFlow's writer
        n = 0
        while True:
            data = b"record %06d" % n
            out.write(len(data).to_bytes(8, "little") + b"crc!" + data + b"crc!")
            out.flush()
            n += 1
            time.sleep(0.2)
"""


def test_an_event_file_kept_open_and_growing_is_sent_while_it_grows(
    tmp_path, s3_server, s3, bucket
):
    job = make_job(
        tmp_path, s3_server.endpoint, tensorboard_uri=f"s3://{bucket}/tb", setting_sync_stable=1.0
    )  # never 1 s without a write: sent every 5 s anyway
    sync = LiveSync(job, log=LOG)
    sync.start()
    path = tmp_path / "output" / "tensorboard" / "events.out.tfevents.1"
    child = spawn(OPEN_APPENDER, str(path))
    try:

        def grown() -> bool:
            return (
                "tb/events.out.tfevents.1" in keys(s3, bucket)
                and count_records(body(s3, bucket, "tb/events.out.tfevents.1")) >= 5
            )

        wait_for(grown, timeout=120, every=0.3)
        assert child.poll() is None, child.stdout.read()
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(30)
    assert sync.close(time.monotonic() + 60) == []
    assert body(s3, bucket, "tb/events.out.tfevents.1") == path.read_bytes()
    assert sync.counters.uploads <= 10  # a few snapshots, not one per record


# --- faults
# -------------------------------------------------------------------------------------------


def test_server_stopped_and_restarted_everything_arrives(tmp_path, s3_server, s3, bucket):
    sync = started_sync(tmp_path, s3_server.endpoint, bucket, setting_sync_retry_max=1.0)
    local = tmp_path / "checkpoints"
    (local / "before.pt").write_bytes(checked_blob(100_000, 1))
    wait_for(lambda: "ckpt/before.pt" in keys(s3, bucket))
    s3_server.stop()
    try:
        (local / "during.pt").write_bytes(checked_blob(100_000, 2))
        (local / "big-during.pt").write_bytes(checked_blob(17 * 1024 * 1024, 3))
        wait_for(lambda: sync.counters.retries >= 2, timeout=60)
        assert sync.counters.uploads == 1  # nothing reported as uploaded that was not
    finally:
        s3_server.start()
        s3.create_bucket(Bucket=bucket)  # moto forgets its buckets on restart
    (local / "after.pt").write_bytes(checked_blob(100_000, 4))
    assert sync.close(time.monotonic() + 120) == []
    remote = keys(s3, bucket, "ckpt/")
    # before.pt was lost with the server's memory; close() saw that in the listing and sent it again
    assert set(remote) == {
        "ckpt/before.pt",
        "ckpt/during.pt",
        "ckpt/big-during.pt",
        "ckpt/after.pt",
    }
    for key in remote:
        assert body(s3, bucket, key) == (local / key.split("/")[1]).read_bytes()


def test_close_reports_what_it_could_not_send(tmp_path, s3_server, s3, bucket, caplog):
    sync = started_sync(tmp_path, s3_server.endpoint, bucket)
    s3_server.stop()
    try:
        (tmp_path / "checkpoints" / "stuck.pt").write_bytes(b"s" * 1000)
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            left = sync.close(time.monotonic() + 5)
    finally:
        s3_server.start()
    assert left == [str(tmp_path / "checkpoints" / "stuck.pt")]
    assert "stuck.pt was not uploaded" in caplog.text
    assert "testing-secret" not in caplog.text

"""agent/storage.py against a real S3 server and a local folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import BucketMissing, EndpointUnreachable, ObjectMissing, StorageError
from agent.storage import FileStorage, S3Storage, make_s3_client, open_storage, parse_uri, redact


def test_parse_uri_forms():
    assert parse_uri("s3://b/p/q").bucket == "b"
    assert parse_uri("s3://b/p/q").key == "p/q"
    assert parse_uri("file:///tmp/x").key == "/tmp/x"
    assert parse_uri("/tmp/x").scheme == "file"
    with pytest.raises(StorageError, match="no bucket"):
        parse_uri("s3:///key")
    with pytest.raises(StorageError, match="three slashes"):
        parse_uri("file://host/x")
    with pytest.raises(StorageError, match="neither"):
        parse_uri("http://x/y")


def test_redact_hides_userinfo():
    assert "secret" not in redact("http://user:secret@host:9000/x failed")


def test_s3_roundtrip_list_range_and_multipart(s3_env, bucket, tmp_path, s3):
    store = open_storage(f"s3://{bucket}/")
    assert isinstance(store, S3Storage)
    for i in range(3):
        store.put_bytes(f"object {i}".encode(), f"s3://{bucket}/data/n/{i}.txt")
    store.put_bytes(b"other", f"s3://{bucket}/data2/x")
    listed = list(store.list(f"s3://{bucket}/data/"))
    assert [o.key for o in listed] == [f"data/n/{i}.txt" for i in range(3)]
    assert all(o.size == 8 for o in listed)
    assert store.get_bytes(f"s3://{bucket}/data/n/1.txt", 2, 5) == b"jec"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(70 * 1024 * 1024))
    store.put_file(big, f"s3://{bucket}/big.bin")
    assert s3.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"').endswith("-5")
    dest = tmp_path / "out" / "big.bin"
    assert (
        store.get_file(f"s3://{bucket}/big.bin", dest, expected_size=big.stat().st_size)
        == big.stat().st_size
    )
    assert dest.read_bytes() == big.read_bytes()
    assert not (tmp_path / "out" / "big.bin.part").exists()


def test_short_read_is_refused(s3_env, bucket, tmp_path):
    store = open_storage(f"s3://{bucket}/")
    store.put_bytes(b"12345", f"s3://{bucket}/k")
    with pytest.raises(StorageError, match="short read"):
        store.get_file(f"s3://{bucket}/k", tmp_path / "k", expected_size=6)
    assert list(tmp_path.iterdir()) == []


def test_errors_name_the_uri_and_fix(s3_env, bucket):
    store = open_storage("s3://x/")
    with pytest.raises(BucketMissing, match="no-such-bucket-zz"):
        list(store.list("s3://no-such-bucket-zz/p"))
    with pytest.raises(ObjectMissing, match="missing-key"):
        store.get_bytes(f"s3://{bucket}/missing-key")
    assert store.head(f"s3://{bucket}/missing-key") is None
    store.delete(f"s3://{bucket}/missing-key")


def test_unreachable_endpoint(monkeypatch):
    from tests.conftest import DUMMY_CREDS, free_port

    for k, v in DUMMY_CREDS.items():
        monkeypatch.setenv(k, v)
    client = make_s3_client(f"http://127.0.0.1:{free_port()}")
    client.meta.config.retries["max_attempts"] = 1
    store = S3Storage(client)
    with pytest.raises(EndpointUnreachable, match="AWS_ENDPOINT_URL"):
        list(store.list("s3://b/p"))


def test_file_storage(tmp_path):
    root = tmp_path / "bucket"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c.txt").write_text("hello")
    (root / "top.txt").write_text("x")
    store = open_storage(f"file://{root}")
    assert isinstance(store, FileStorage)
    assert [Path(o.key).name for o in store.list(f"file://{root}")] == ["c.txt", "top.txt"]
    assert store.get_bytes(f"file://{root}/a/b/c.txt", 1, 3) == b"el"
    store.put_bytes(b"new", f"file://{tmp_path}/dest/n.txt")
    assert (tmp_path / "dest" / "n.txt").read_bytes() == b"new"
    with pytest.raises(ObjectMissing):
        store.get_bytes(f"file://{root}/nope")

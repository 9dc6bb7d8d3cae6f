"""agent/storage against a real S3 server and a local folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from agent.errors import BucketMissing, EndpointUnreachable, ObjectMissing, StorageError
from agent.storage import FileStorage, S3Storage, make_s3_client, open_storage, parse_uri, redact
from tests.helpers import raises_once_stopped


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


def test_unreachable_endpoint(dummy_creds):
    from tests.conftest import free_port

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


# --- the seams: one client per job, the retry policy, the failure kinds, botocore's privates -----


def test_job_storage_makes_one_client_and_shares_it(s3_env, bucket):
    from agent.storage import ONE_TRY, JobStorage

    storages = JobStorage()
    first = storages.for_uri(f"s3://{bucket}/a")
    assert storages.for_uri(f"s3://{bucket}/b") is first
    uploads = storages.for_uploads(f"s3://{bucket}/c")
    assert isinstance(uploads, S3Storage) and uploads.client is first.client
    assert uploads.policy == ONE_TRY and first.policy.attempts > 1
    assert isinstance(storages.for_uri("/tmp/x"), FileStorage)
    uploads.put_bytes(b"x", f"s3://{bucket}/c")
    assert first.get_bytes(f"s3://{bucket}/c") == b"x"


def test_botocore_private_attributes_are_where_the_lean_get_reads_them(s3_env, s3_server):
    from agent.storage import botocore_private
    from agent.storage.lean import LeanGetter

    client = make_s3_client(s3_server.endpoint)
    missing = botocore_private.check_client(client)
    assert not missing, (
        f"botocore no longer has {missing}: agent/storage/botocore_private.py reads them for the "
        "lean GET; find where this botocore keeps the signing credentials and TLS verify setting, "
        "and update that module"
    )
    credentials = botocore_private.signing_credentials(client)
    assert credentials.get_frozen_credentials().access_key == s3_env["AWS_ACCESS_KEY_ID"]
    assert botocore_private.tls_verify(client) in (True, False) or isinstance(
        botocore_private.tls_verify(client), str
    )
    assert LeanGetter.from_client(client) is not None

    class Renamed:  # what a botocore that moved the attributes would look like
        meta = client.meta

    assert botocore_private.check_client(Renamed()) == [
        "client._request_signer._credentials",
        "client._endpoint.http_session._verify",
    ]
    assert LeanGetter.from_client(Renamed()) is None  # the lean path is off, boto3 does the GETs


def test_retry_policy_retries_only_what_may_heal():
    from agent.storage import RetryPolicy, ShortRead, retryable, with_retries
    from agent.storage.retry import TransientError

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ShortRead("short read: s3://b/k gave 1 of 2 bytes")
        return "ok"

    fast = RetryPolicy(attempts=5, backoff=0.001)
    assert with_retries(flaky, fast, what="s3://b/k") == ("ok", 3)

    calls.clear()

    def missing() -> None:
        calls.append(1)
        raise ObjectMissing("s3://b/k does not exist")

    with pytest.raises(ObjectMissing):
        with_retries(missing, fast, what="s3://b/k")
    assert len(calls) == 1  # not retried

    calls.clear()

    def down() -> None:
        calls.append(1)
        raise EndpointUnreachable("cannot reach the endpoint")

    with pytest.raises(EndpointUnreachable):
        with_retries(down, RetryPolicy(attempts=3, backoff=0.001), what="s3://b/k")
    assert len(calls) == 3

    import time

    with pytest.raises(UploadIncompleteLike, match="deadline after 1"):
        with_retries(
            down,
            RetryPolicy(attempts=0, backoff=5.0, jitter=False),
            what="s3://b/k",
            deadline=time.monotonic() + 1.0,
            give_up=lambda err, n: UploadIncompleteLike(f"deadline after {n}"),
        )

    assert retryable(TransientError("503 SlowDown")) and retryable(ConnectionResetError())
    assert not retryable(StorageError("access denied")) and not retryable(PermissionError())
    assert not retryable(BucketMissing("no bucket"))


class UploadIncompleteLike(Exception):
    pass


def test_failure_kinds_from_a_real_server(s3_env, bucket, s3):
    from agent.storage import CheckedRead, ReadOptions, ShortRead, retryable
    from tests.conftest import free_port

    store = open_storage(f"s3://{bucket}/")
    s3.put_object(Bucket=bucket, Key="kinds/k", Body=b"12345")
    with pytest.raises(ObjectMissing) as missing:
        store.get_checked(f"s3://{bucket}/kinds/absent")
    assert not retryable(missing.value)
    with pytest.raises(ShortRead, match="listing said 6") as short:
        store.get_checked(f"s3://{bucket}/kinds/k", size=6)
    assert retryable(short.value)
    for lean in (True, False):
        body = store.get_checked(f"s3://{bucket}/kinds/k", options=ReadOptions(lean=lean))
        assert body.read_all() == b"12345"
    body = store.get_checked(f"s3://{bucket}/kinds/k", options=ReadOptions(lean=False))
    body.etag = "0" * 32  # as if the body did not match its plain-MD5 ETag
    with pytest.raises(ShortRead, match="checksum mismatch"):
        body.read_all()
    spoiled = CheckedRead("s3://b/k", io.BytesIO(b"12345"), 5, None, checksum=("crc32", b"\0" * 4))
    with pytest.raises(ShortRead, match="checksum mismatch: s3://b/k has CRC32"):
        spoiled.read_all()
    with pytest.raises(ShortRead, match="short read: s3://b/k gave 4 of 5"):
        CheckedRead("s3://b/k", io.BytesIO(b"1234"), 5, None).read_all()
    dead = S3Storage(make_s3_client(f"http://127.0.0.1:{free_port()}", max_attempts=1))
    for lean in (True, False):
        with pytest.raises(EndpointUnreachable, match="AWS_ENDPOINT_URL") as lost:
            dead.get_checked(f"s3://{bucket}/kinds/k", options=ReadOptions(lean=lean))
        assert retryable(lost.value)


@pytest.mark.parametrize(
    ("variables", "lean"),
    [
        ({}, True),
        ({"HTTP_PROXY": "http://198.18.9.9:3128"}, False),
        ({"http_proxy": "http://198.18.9.9:3128"}, False),
        ({"http_proxy": "http://198.18.9.9:3128", "no_proxy": "127.0.0.1"}, True),
        ({"HTTPS_PROXY": "http://198.18.9.9:3128"}, True),  # an http:// endpoint: not its scheme
    ],
)
def test_the_lean_get_steps_aside_for_a_proxy_variable(monkeypatch, variables, lean) -> None:
    """A proxy named by a *_proxy variable is boto3's to use (the lean GET does not speak to
    proxies); with no such variable the check answers without loading urllib.request."""
    from agent.storage.lean import LeanGetter

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    getter = LeanGetter.from_endpoint("http://127.0.0.1:9000")
    assert (getter is not None) is lean


def test_no_proxy_variable_keeps_urllib_request_off_the_listing_path() -> None:
    """urllib.request (~3 ms with tempfile) was loaded by every job's first listing to learn that
    there is no proxy."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test-secret")
    env.pop("AWS_PROFILE", None)
    code = (
        "import sys\n"
        "from agent.storage.lean import LeanGetter\n"
        "assert LeanGetter.from_endpoint('http://127.0.0.1:9000') is not None\n"
        "print('urllib.request' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def _slow_object(s3, bucket: str, s3_proxy, size: int) -> S3Storage:
    s3.put_object(Bucket=bucket, Key="big.bin", Body=os.urandom(size))
    s3_proxy.rate = 1024 * 1024
    return S3Storage(make_s3_client(s3_proxy.endpoint))


def test_a_cancelled_download_ends_between_two_reads(s3_env, s3_proxy, s3, bucket, tmp_path):
    """A stop asked of the agent while a big object downloads (a source archive, a checkpoint):
    the download ends at its next read, not after its last byte, and leaves no file behind.
    12 MiB at 1 MiB/s would take 12 s; the stop comes after 1 s."""
    from agent.storage import DownloadStopped

    store = _slow_object(s3, bucket, s3_proxy, 12 * 1024 * 1024)
    took = raises_once_stopped(
        DownloadStopped,
        1.0,
        lambda stop: store.get_file(f"s3://{bucket}/big.bin", tmp_path / "big.bin", cancel=stop),
    )
    assert took < 3.0, f"the download went on for {took:.1f} s"
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part


def test_a_cancel_ends_the_pause_between_two_tries(s3_env, s3_proxy, s3, bucket, tmp_path):
    """S3 down, the download pausing before its next try: the stop ends the pause at once with
    DownloadStopped (a stop, not the outage's error), instead of waiting out the retries."""
    from agent.storage import DownloadStopped, RetryPolicy, retryable

    s3.put_object(Bucket=bucket, Key="k.bin", Body=b"x" * 1000)
    s3_proxy.stop()
    store = S3Storage(make_s3_client(s3_proxy.endpoint)).with_policy(
        RetryPolicy(attempts=0, backoff=5.0, max_pause=5.0, jitter=False)
    )
    took = raises_once_stopped(
        DownloadStopped,
        1.0,
        lambda stop: store.get_file(f"s3://{bucket}/k.bin", tmp_path / "k.bin", cancel=stop),
    )
    assert took < 3.0
    assert list(tmp_path.iterdir()) == []
    assert not retryable(DownloadStopped("s3://b/k.bin"))  # a stop is never tried again

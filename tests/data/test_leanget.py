"""The lean GET path against the real moto server, directly and through a misbehaving HTTP proxy in
front of it
(truncated bodies, flipped bytes, wrong ETags, error statuses): byte-identical results, bad bodies
retried and
finally refused, errors translated, and the SigV4 signature equal to botocore's own."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import logging
import subprocess
import sys
import threading
import urllib.parse
import zlib
from pathlib import Path

import pytest

from agent.data.listing import Entry
from agent.data.staging import StageOptions, stage
from agent.errors import EndpointUnreachable, ObjectMissing, StorageError
from agent.storage import make_s3_client
from agent.storage.lean import LeanGetter, sign_get
from tests.data.helpers import random_objects, tree, upload

LOG = logging.getLogger("test.data")


@pytest.mark.parametrize(
    "key", ["a/b.bin", "sp ace+plus=é%~!*'()&$@,;:.bin", "x//y/./z", "ünï/cødé"]
)
def test_signature_equals_botocores(key):
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    path = urllib.parse.quote("/bkt/" + key, safe="/~")
    request = AWSRequest(
        method="GET", url="http://127.0.0.1:9000" + path, headers={"x-amz-checksum-mode": "ENABLED"}
    )
    request.context["payload_signing_enabled"] = True
    S3SigV4Auth(Credentials("AKID", "SECRET", "TOKEN"), "s3", "eu-west-1").add_auth(request)
    mine = sign_get(
        "127.0.0.1:9000",
        path,
        "eu-west-1",
        "AKID",
        "SECRET",
        "TOKEN",
        request.headers["X-Amz-Date"],
    )
    assert mine["Authorization"] == request.headers["Authorization"]


def test_lean_get_is_byte_identical_and_reports_checks(s3_server, bucket, s3):
    objects = {"p/one.bin": b"x" * 70000, "p/empty": b"", "p/odd key+é.bin": b"odd"}
    upload(s3, bucket, objects)
    getter = LeanGetter.from_client(make_s3_client(s3_server.endpoint))
    assert getter is not None
    for key, body in objects.items():
        resp = getter.open(bucket, key)
        assert resp is not None and resp.length == len(body)
        assert resp.read() == body
        resp.close()
        assert resp.etag == hashlib.md5(body).hexdigest() and resp.md5
        if resp.checksum is not None:  # moto returns the CRC32 botocore sent on upload
            assert resp.checksum == ("crc32", zlib.crc32(body).to_bytes(4, "big"))
    assert getter.open(bucket, "p/missing") is None  # a 404: the caller's boto3 path translates it


class _Proxy:
    """An HTTP proxy to the moto server that spoils the first ``bad`` GETs of object bodies in one
    way."""

    def __init__(self, upstream: str, mode: str, bad: int) -> None:
        self.mode, self.bad, self.gets = mode, bad, 0
        self.lock = threading.Lock()
        up = urllib.parse.urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

            def _forward(self, method: str) -> None:
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(method, self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                out = [
                    (k, v)
                    for k, v in resp.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection")
                ]
                spoil = None
                if method == "GET" and "list-type" not in self.path and "?" not in self.path:
                    with proxy.lock:
                        proxy.gets += 1
                        if proxy.bad > 0:
                            proxy.bad -= 1
                            spoil = proxy.mode
                if spoil == "deny":
                    body = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                        b"<Message>Access Denied</Message></Error>"
                    )
                    self.send_response(403)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if spoil == "flip" and body:
                    body = bytes([body[0] ^ 1]) + body[1:]
                if spoil == "etag":  # a wrong MD5 ETag and no CRC: only the MD5 check can see it
                    out = [(k, v) for k, v in out if not k.lower().startswith("x-amz-checksum")]
                    out = [
                        (k, '"' + "0" * 32 + '"') if k.lower() == "etag" else (k, v) for k, v in out
                    ]
                self.send_response(resp.status)
                for k, v in out:
                    self.send_header(k, v)
                self.end_headers()
                if spoil == "short":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def proxy_to(s3_server):
    made: list[_Proxy] = []

    def make(mode: str, bad: int) -> _Proxy:
        made.append(_Proxy(s3_server.endpoint, mode, bad))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def _entries(bucket: str, objects: dict[str, bytes], prefix: str) -> list[Entry]:
    return [
        Entry(f"s3://{bucket}/{k}", k[len(prefix) :], len(v), hashlib.md5(v).hexdigest())
        for k, v in sorted(objects.items())
    ]


@pytest.mark.parametrize("mode", ["short", "flip", "etag"])
def test_spoiled_bodies_are_retried_until_right(s3_server, bucket, s3, tmp_path, proxy_to, mode):
    objects = random_objects("s/", 6, 5000, nested=False)
    objects["s/big.bin"] = (
        bytes(range(256)) * 4096
    )  # 1 MiB: read in 64 KiB pieces into the reused buffer
    upload(s3, bucket, objects)
    proxy = proxy_to(mode, 4)
    options = StageOptions(
        endpoint_url=proxy.endpoint,
        threads=2,
        backoff=0.01,
        attempts=6,
        read_size=64 * 1024,
        large_size=512 * 1024,
    )
    result = stage(_entries(bucket, objects, "s/"), tmp_path / "d", options=options, log=LOG)
    assert result.fetched == 7
    assert tree(tmp_path / "d") == {k[2:]: v for k, v in objects.items()}
    assert proxy.gets == 7 + 4  # every spoiled GET was made again


@pytest.mark.parametrize(
    "mode,message",
    [
        ("flip", "checksum mismatch"),
        ("etag", "checksum mismatch: .* MD5"),
        ("short", "cannot reach .* for s3://"),
    ],
)
def test_a_body_that_stays_wrong_is_refused(
    s3_server, bucket, s3, tmp_path, proxy_to, mode, message
):
    objects = {"w/one.bin": b"payload" * 1000}
    upload(s3, bucket, objects)
    proxy = proxy_to(mode, 100)
    options = StageOptions(endpoint_url=proxy.endpoint, threads=1, backoff=0.01, attempts=3)
    with pytest.raises(StorageError, match=message) as caught:
        stage(_entries(bucket, objects, "w/"), tmp_path / "d", options=options, log=LOG)
    if mode == "short":
        assert isinstance(caught.value, EndpointUnreachable)
    assert "testing-secret" not in str(caught.value) and "AKID" not in str(caught.value)
    assert [
        p.name for p in (tmp_path / "d").rglob("*")
    ] == []  # nothing under its name, no .part left
    assert proxy.gets == 3


def test_error_statuses_fall_back_and_are_translated(s3_server, bucket, s3, tmp_path, proxy_to):
    upload(s3, bucket, {"e/here.bin": b"here"})
    missing = [Entry(f"s3://{bucket}/e/gone.bin", "gone.bin", 4)]
    with pytest.raises(ObjectMissing, match=f"s3://{bucket}/e/gone.bin does not exist"):
        stage(
            missing,
            tmp_path / "a",
            options=StageOptions(endpoint_url=s3_server.endpoint, backoff=0.01),
            log=LOG,
        )
    proxy = proxy_to("deny", 100)
    here = [Entry(f"s3://{bucket}/e/here.bin", "here.bin", 4)]
    with pytest.raises(StorageError, match="access denied to .*here.bin.*AccessDenied") as caught:
        stage(
            here,
            tmp_path / "b",
            options=StageOptions(endpoint_url=proxy.endpoint, backoff=0.01),
            log=LOG,
        )
    assert "testing-secret" not in str(caught.value)
    proxy.bad = 0  # the server recovers: the same stage now works
    stage(
        here,
        tmp_path / "b",
        options=StageOptions(endpoint_url=proxy.endpoint, backoff=0.01),
        log=LOG,
    )
    assert (tmp_path / "b/here.bin").read_bytes() == b"here"


def test_lean_and_boto3_paths_stage_the_same_bytes(s3_server, bucket, s3, tmp_path):
    objects = random_objects("same/", 25, 0)
    objects["same/big.bin"] = bytes(range(256)) * 8192
    upload(s3, bucket, objects)
    entries = _entries(bucket, objects, "same/")
    for lean in (True, False):
        options = StageOptions(
            endpoint_url=s3_server.endpoint, lean=lean, read_size=256 * 1024, threads=4
        )
        stage(entries, tmp_path / str(lean), options=options, log=LOG)
        assert tree(tmp_path / str(lean)) == {k[5:]: v for k, v in objects.items()}
    # a rerun over either folder skips everything: the ETag is recorded the same way on both paths
    again = stage(
        entries, tmp_path / "True", options=StageOptions(endpoint_url=s3_server.endpoint), log=LOG
    )
    assert (again.fetched, again.skipped) == (0, 26)


def test_unreachable_endpoint_is_named(s3_env, tmp_path):
    from tests.conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    entries = [Entry("s3://bkt/k.bin", "k.bin", 3)]
    with pytest.raises(EndpointUnreachable, match=f"cannot reach {endpoint} for s3://bkt/k.bin"):
        stage(
            entries,
            tmp_path / "d",
            options=StageOptions(endpoint_url=endpoint, backoff=0.01, attempts=2),
            log=LOG,
        )
    assert not list(Path(tmp_path / "d").rglob("*"))


@pytest.mark.parametrize("mode", ["short", "flip", "etag"])
def test_object_reader_retries_spoiled_bodies_on_the_lean_path(
    s3_server, bucket, s3, proxy_to, mode
):
    from agent.data.reading import ObjectReader

    objects = random_objects("r/", 3, 3000, nested=False)
    upload(s3, bucket, objects)
    proxy = proxy_to(mode, 2)
    reader = ObjectReader(endpoint_url=proxy.endpoint, backoff=0.01, attempts=4)
    for key, body in sorted(objects.items()):
        assert reader.read(Entry(f"s3://{bucket}/{key}", key, len(body))) == body
    assert proxy.gets == 3 + 2
    proxy.bad = 100
    with pytest.raises(StorageError, match="checksum mismatch|short read|cannot reach"):
        reader.read(Entry(f"s3://{bucket}/r/0000.bin", "0000.bin", 3000))
    plain = ObjectReader(endpoint_url=s3_server.endpoint, lean=False)
    assert plain.read(Entry(f"s3://{bucket}/r/0001.bin", "0001.bin", 3000)) == objects["r/0001.bin"]


def test_lean_list_head_and_put_agree_with_boto3(s3_server, bucket, s3):
    odd = ["l/sp ace+plus=é%~!*'()&$@,;:.bin", "l/x//y/./z", "l/ünï/cødé", "l/<amp&>.txt"]
    objects = {f"l/{i:04d}": b"v" * (i % 7) for i in range(1003)} | dict.fromkeys(odd, b"odd")
    upload(s3, bucket, objects, threads=16)
    getter = LeanGetter.from_client(make_s3_client(s3_server.endpoint))
    assert getter is not None
    lean, token, pages = [], None, 0
    while True:
        page = getter.list_page(bucket, "l/", token)
        assert page is not None
        lean += page.items
        pages += 1
        token = page.token
        if not token:
            break
    assert pages == 2  # 1,007 keys: the continuation token works
    want = [
        (item["Key"], item["Size"], item["ETag"].strip('"'), item["LastModified"].timestamp())
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="l/")
        for item in page["Contents"]
    ]
    assert lean == want
    found = getter.head(bucket, odd[0])
    assert isinstance(found, tuple) and found[:2] == (3, hashlib.md5(b"odd").hexdigest())
    mtime = next(item[3] for item in want if item[0] == odd[0])
    assert found[2] is not None and abs(found[2] - mtime) < 1.5
    assert getter.head(bucket, "l/absent") is False
    assert getter.put(bucket, "l/new é.bin", b"fresh")
    assert s3.get_object(Bucket=bucket, Key="l/new é.bin")["Body"].read() == b"fresh"
    assert getter.put(bucket, "l/empty", b"")
    assert s3.head_object(Bucket=bucket, Key="l/empty")["ContentLength"] == 0


def test_a_job_storage_with_an_endpoint_needs_no_boto3(s3_env, s3_server, bucket, s3):
    s3.put_object(Bucket=bucket, Key="nb/a.bin", Body=b"a" * 1000)
    script = f"""
import sys
from agent.storage import JobStorage
store = JobStorage({s3_server.endpoint!r}).for_uri("s3://{bucket}/")
assert [o.key for o in store.list("s3://{bucket}/nb/")] == ["nb/a.bin"]
assert store.get_bytes("s3://{bucket}/nb/a.bin") == b"a" * 1000
store.put_bytes(b"b", "s3://{bucket}/nb/b.bin")
assert store.head("s3://{bucket}/nb/b.bin").size == 1
assert store.head("s3://{bucket}/nb/absent") is None
print("boto3" in sys.modules, "botocore" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    assert s3.get_object(Bucket=bucket, Key="nb/b.bin")["Body"].read() == b"b"

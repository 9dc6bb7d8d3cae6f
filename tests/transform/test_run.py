"""`torchbay transform` against moto and a real gunicorn: splitting, batching, joins, retries,
failures, resume."""

from __future__ import annotations

import io
import json
import logging

from agent.transform import main


def _spec(
    bucket: str,
    *,
    prefix: str = "in/",
    out: str = "out/",
    content_type: str = "text/csv",
    split: str = "Line",
    strategy: str = "MultiRecord",
    accept: str = "text/csv",
    **extra,
) -> str:
    spec = {
        "TransformJobName": "job-1",
        "ModelName": "echo",
        "BatchStrategy": strategy,
        "MaxConcurrentTransforms": 3,
        "TransformInput": {
            "DataSource": {
                "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{bucket}/{prefix}"}
            },
            "ContentType": content_type,
            "SplitType": split,
        },
        "TransformOutput": {
            "S3OutputPath": f"s3://{bucket}/{out}",
            "Accept": accept,
            "AssembleWith": "Line",
        },
    }
    for key, value in extra.items():
        spec[key] = value
    return json.dumps(spec)


def _run(spec: str, server, s3_env: dict, *extra: str) -> int:
    return main(
        ["--job", spec, "--endpoint", f"http://127.0.0.1:{server.port}", *extra],
        env=dict(s3_env, TORCHBAY_TRANSFORM_PROGRESS_INTERVAL="0.5"),
    )


def _csv(rows: int, start: int = 0, width: int = 3) -> bytes:
    return "".join(
        ",".join(str((start + i) * 10 + j) for j in range(width)) + "\n" for i in range(rows)
    ).encode()


def _outputs(s3, bucket: str, prefix: str = "out/") -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_csv_multirecord_equals_single_records(echo, bucket, s3, s3_env, capsys) -> None:
    server = echo
    objects = {
        "in/a.csv": _csv(40),
        "in/sub/b.csv": _csv(25, 100),
        "in/c.csv": _csv(7, 500) + b"\n\n",
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    assert _run(_spec(bucket), server, s3_env) == 0
    multi = echo.requests()
    assert sorted(n for _, n in multi) == [7, 25, 40]  # one request per object: all its lines fit
    assert "3 of 3 objects written" in capsys.readouterr().out
    assert _run(_spec(bucket, strategy="SingleRecord", out="single/"), server, s3_env) == 0
    assert len(echo.requests()) == 3 + 72
    got = _outputs(s3, bucket)
    assert set(got) == {"out/a.csv.out", "out/sub/b.csv.out", "out/c.csv.out"}
    single = _outputs(s3, bucket, "single/")
    for key, body in got.items():
        assert single["single/" + key[4:]] == body  # byte-identical to one request per record
    first = got["out/a.csv.out"].decode().splitlines()
    assert first[1] == "%r,3" % (10.0 + 11.0 + 12.0) and len(first) == 40


def test_multirecord_respects_max_payload(echo, bucket, s3, s3_env, caplog) -> None:
    server = echo
    echo.slow(0.6)  # long enough for a progress line (every 0.5 s here)
    body = _csv(70000)  # ~1.4 MB: two requests under MaxPayloadInMB 1
    s3.put_object(Bucket=bucket, Key="in/big.csv", Body=body)
    with caplog.at_level(logging.INFO, logger="torchbay.transform"):
        assert _run(_spec(bucket, MaxPayloadInMB=1), server, s3_env) == 0
    assert (
        "records read so far, 0 of 1 objects written (0 skipped)" in caplog.text
        and "ETA" in caplog.text
    )
    sizes = [n for _, n in echo.requests()]
    assert len(sizes) == 2 and sum(sizes) == 70000
    lines = _outputs(s3, bucket)["out/big.csv.out"].decode().splitlines()
    assert len(lines) == 70000 and lines[-1] == f"{float(699990 + 699991 + 699992)!r},3"


def test_json_lines_multirecord_equals_single_records(echo, bucket, s3, s3_env) -> None:
    server = echo
    for n in range(2):
        rows = "".join(json.dumps({"features": [n, i, 0.5]}) + "\n" for i in range(30))
        s3.put_object(Bucket=bucket, Key=f"in/part-{n}.jsonl", Body=rows.encode())
    kwargs = {"content_type": "application/jsonlines", "accept": "application/jsonlines"}
    assert _run(_spec(bucket, **kwargs), server, s3_env) == 0
    assert (
        _run(_spec(bucket, out="single/", strategy="SingleRecord", **kwargs), server, s3_env) == 0
    )
    assert len(echo.requests()) == 2 + 60
    multi, single = _outputs(s3, bucket), _outputs(s3, bucket, "single/")
    assert multi["out/part-1.jsonl.out"] == single["single/part-1.jsonl.out"]
    assert json.loads(multi["out/part-1.jsonl.out"].splitlines()[2]) == {"score": 3.5}


def test_split_none_sends_each_image_whole(echo, bucket, s3, s3_env) -> None:
    from PIL import Image

    server = echo
    for name, size in (("a.png", (7, 5)), ("b.png", (3, 9))):
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"images/{name}", Body=buf.getvalue())
    spec = _spec(
        bucket, prefix="images", content_type="image/png", split="None", accept="application/json"
    )
    assert _run(spec, server, s3_env) == 0
    out = _outputs(s3, bucket)
    assert json.loads(out["out/b.png.out"]) == {"size": [3, 9], "mode": "RGB"}
    assert out["out/a.png.out"].endswith(b"\n")  # AssembleWith Line


def test_join_source_input_with_filters(echo, bucket, s3, s3_env) -> None:
    server = echo
    s3.put_object(Bucket=bucket, Key="in/rows.csv", Body=b"id-1,1,2\nid-2,3,4\n")
    spec = _spec(
        bucket,
        DataProcessing={"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,3]"},
    )
    assert _run(spec, server, s3_env) == 0
    assert _outputs(s3, bucket)["out/rows.csv.out"] == b"id-1,3.0\nid-2,7.0\n"
    s3.put_object(
        Bucket=bucket,
        Key="json/rows.jsonl",
        Body=b'{"id": "a", "features": [1, 2]}\n{"id": "b", "features": [5]}\n',
    )
    spec = _spec(
        bucket,
        prefix="json/",
        out="joined/",
        content_type="application/jsonlines",
        accept="application/jsonlines",
        DataProcessing={
            "InputFilter": "$.features",
            "JoinSource": "Input",
            "OutputFilter": "$['id','SageMakerOutput']",
        },
    )
    assert _run(spec, server, s3_env) == 0
    lines = _outputs(s3, bucket, "joined/")["joined/rows.jsonl.out"].splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "a", "SageMakerOutput": {"score": 3}},
        {"id": "b", "SageMakerOutput": {"score": 5}},
    ]


def test_failed_requests_are_retried(echo, bucket, s3, s3_env, capsys) -> None:
    server = echo
    echo.flaky()
    for n in range(3):
        s3.put_object(Bucket=bucket, Key=f"in/{n}.csv", Body=_csv(10, n * 10))
    assert _run(_spec(bucket), server, s3_env) == 0
    assert "(3 retried)" in capsys.readouterr().out
    assert len(_outputs(s3, bucket)) == 3


def test_a_record_failing_for_good_is_named_and_the_rest_uploaded(
    echo, bucket, s3, s3_env, caplog
) -> None:
    server = echo
    s3.put_object(Bucket=bucket, Key="in/a.csv", Body=_csv(20))
    poisoned = _csv(12, 100).splitlines(keepends=True)
    poisoned[6] = b"1,666,3\n"
    s3.put_object(Bucket=bucket, Key="in/b.csv", Body=b"".join(poisoned))
    s3.put_object(Bucket=bucket, Key="in/c.csv", Body=_csv(5, 300))
    with caplog.at_level(logging.ERROR, logger="torchbay.transform"):
        assert _run(_spec(bucket), server, s3_env) == 65
    assert f"s3://{bucket}/in/b.csv record 7: the endpoint answered 400" in caplog.text
    assert set(_outputs(s3, bucket)) == {"out/a.csv.out", "out/c.csv.out"}

    # The rerun after the fix sends only the object that is not done yet.
    before = len(echo.requests())
    s3.put_object(Bucket=bucket, Key="in/b.csv", Body=_csv(12, 100))
    assert _run(_spec(bucket), server, s3_env) == 0
    assert echo.requests()[before:] == [("csv", 12)]
    assert set(_outputs(s3, bucket)) == {"out/a.csv.out", "out/b.csv.out", "out/c.csv.out"}
    # A changed spec (another Accept) is other work: nothing is skipped.
    assert _run(_spec(bucket, accept="text/csv; charset=utf-8"), server, s3_env) == 0
    assert len(echo.requests()) == before + 1 + 3


def test_unknown_spec_key_is_refused(capsys, caplog) -> None:
    spec = json.loads(_spec("b"))
    spec["TransformInput"]["Splitype"] = "Line"
    with caplog.at_level(logging.ERROR):
        assert main(["--job", json.dumps(spec), "--endpoint", "http://127.0.0.1:9"]) == 65
    assert "unknown key 'TransformInput.Splitype'" in caplog.text


def test_rerun_after_sigterm_sends_only_the_rest(echo, bucket, s3, s3_env) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    server = echo
    echo.slow(0.4)
    for n in range(6):
        s3.put_object(Bucket=bucket, Key=f"in/{n}.csv", Body=_csv(3, n * 10))
    spec = _spec(bucket, MaxConcurrentTransforms=1)
    argv = [
        sys.executable,
        "-m",
        "agent",
        "transform",
        "--job",
        spec,
        "--endpoint",
        f"http://127.0.0.1:{server.port}",
    ]
    env = dict(os.environ, **s3_env, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while len(_outputs(s3, bucket)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out.decode()[-2000:]
    assert b"interrupted" in out
    done = len(_outputs(s3, bucket))
    assert 2 <= done < 6
    sent_before = len(echo.requests())
    rerun = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert len(_outputs(s3, bucket)) == 6
    assert len(echo.requests()) - sent_before == 6 - done  # only the objects not written before
    assert f"{done} skipped as already done".encode() in rerun.stdout


def test_started_server_file_uris_manifest_and_resume(tmp_path, capsys) -> None:
    """No endpoint given: the job starts `torchbay serve` itself; file:// in and out; a manifest; a
    rerun skips."""
    from tests.transform.conftest import write_hooks

    root = tmp_path / "ml"
    write_hooks(root)
    (tmp_path / "control").mkdir()
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "one.csv").write_bytes(_csv(4))
    (data / "sub" / "two.csv").write_bytes(_csv(3, 50))
    (data / "ignored.csv").write_bytes(b"1,666\n")  # not in the manifest: never sent
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"prefix": f"{data}/"}, "one.csv", "sub/two.csv"]))
    spec = json.loads(_spec("unused"))
    spec["TransformInput"]["DataSource"]["S3DataSource"] = {
        "S3DataType": "ManifestFile",
        "S3Uri": f"file://{manifest}",
    }
    spec["TransformOutput"]["S3OutputPath"] = f"file://{tmp_path}/out"
    env = {
        "REQUEST_LOG": str(tmp_path / "requests.log"),
        "CONTROL_DIR": str(tmp_path / "control"),
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        "PATH": __import__("os").environ["PATH"],
    }
    argv = ["--job", json.dumps(spec), "--root", str(root)]
    assert main(argv, env=env) == 0
    assert (tmp_path / "out" / "sub" / "two.csv.out").read_bytes().decode().splitlines()[
        0
    ] == f"{1503.0!r},3"
    assert (tmp_path / "out" / "one.csv.out").exists() and not (
        tmp_path / "out" / "ignored.csv.out"
    ).exists()
    assert main(argv, env=env) == 0
    assert "2 skipped as already done" in capsys.readouterr().out
    assert len((tmp_path / "requests.log").read_text().splitlines()) == 2  # the rerun sent nothing


def test_gzip_objects_are_unpacked_before_splitting(echo, bucket, s3, s3_env) -> None:
    import gzip

    s3.put_object(Bucket=bucket, Key="in/a.csv.gz", Body=gzip.compress(_csv(9)))
    spec = json.loads(_spec(bucket))
    spec["TransformInput"]["CompressionType"] = "Gzip"
    assert _run(json.dumps(spec), echo, s3_env) == 0
    assert echo.requests() == [("csv", 9)]
    assert _outputs(s3, bucket)["out/a.csv.gz.out"].decode().splitlines()[8] == "%r,3" % (
        80.0 + 81 + 82
    )

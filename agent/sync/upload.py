"""Checked uploads: a file is sent only if every byte came from it unchanged.

Small files are one PUT of a snapshot; large ones are a multipart upload (parts streamed with CRC32)
completed only when every part came from the same unchanged file, so no half-written object ever
appears under a real key.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.storage import S3Storage, Storage, parse_uri, translate_s3_error
from agent.sync.folders import Sig, file_sig

__all__ = ["PART_THREADS", "put_checked", "run_parallel"]

PART_THREADS = 4
_S3_MIN_PART = 5 * 1024 * 1024


def put_checked(
    storage: Storage, path: Path, uri: str, expected: Sig, *, part_size: int, log: logging.Logger
) -> bool:
    """Send ``path`` to ``uri`` only if every byte came from the file as ``expected``; False if it
    changed."""
    if isinstance(storage, S3Storage):
        return _put_s3(storage, path, uri, expected, part_size, log)
    return _put_local(path, uri, expected)


def _put_s3(
    storage: S3Storage, path: Path, uri: str, expected: Sig, part_size: int, log: logging.Logger
) -> bool:
    client = storage.client
    loc = parse_uri(uri)
    size = expected[0]
    part_size = max(part_size, _S3_MIN_PART)
    where = str(getattr(client.meta, "endpoint_url", "the S3 endpoint"))
    if size < part_size:
        with open(path, "rb") as handle:
            data = handle.read()
        if len(data) != size or file_sig(path) != expected:
            return False
        try:
            client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as err:  # botocore's exception classes are made at run time
            raise translate_s3_error(err, uri, where) from err
        return True
    try:
        upload_id = client.create_multipart_upload(
            Bucket=loc.bucket, Key=loc.key, ChecksumAlgorithm="CRC32"
        )["UploadId"]
    except Exception as err:
        raise translate_s3_error(err, uri, where) from err
    completed = False
    try:
        offsets = list(range(0, size, part_size))
        parts: dict[int, dict[str, Any]] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def send(index_offset: tuple[int, int]) -> None:
            from s3transfer.utils import ReadFileChunk  # streamed like boto3's own transfers

            number, offset = index_offset
            length = min(part_size, size - offset)
            body = ReadFileChunk.from_filename(str(path), offset, length, enable_callbacks=False)
            try:
                if len(body) != length:
                    raise _Changed()
                resp = client.upload_part(
                    Bucket=loc.bucket,
                    Key=loc.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumAlgorithm="CRC32",
                )
            except _Changed:
                raise
            except Exception as err:
                raise translate_s3_error(err, uri, where) from err
            finally:
                body.close()
            part = {"PartNumber": number, "ETag": resp["ETag"]}
            if "ChecksumCRC32" in resp:
                part["ChecksumCRC32"] = resp["ChecksumCRC32"]
            with lock:
                parts[number] = part

        run_parallel(send, list(enumerate(offsets, start=1)), PART_THREADS, errors)
        if any(isinstance(err, _Changed) for err in errors):
            return False
        if errors:
            raise errors[0]
        if file_sig(path) != expected:
            return False
        try:
            client.complete_multipart_upload(
                Bucket=loc.bucket,
                Key=loc.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]},
            )
        except Exception as err:
            raise translate_s3_error(err, uri, where) from err
        completed = True
        return True
    finally:
        if not completed:
            try:
                client.abort_multipart_upload(Bucket=loc.bucket, Key=loc.key, UploadId=upload_id)
            except (
                Exception
            ):  # best effort: an unreachable endpoint keeps the parts until its lifecycle rule
                log.debug("live sync: could not abort multipart upload of %s", uri)


class _Changed(Exception):
    """The file changed while a part was being read."""


def _put_local(path: Path, uri: str, expected: Sig) -> bool:
    dest = parse_uri(uri).key
    os.makedirs(os.path.dirname(dest) or "/", exist_ok=True)
    tmp = dest + ".torchbay-part"
    try:
        shutil.copyfile(path, tmp)
        if os.path.getsize(tmp) != expected[0] or file_sig(path) != expected:
            os.unlink(tmp)
            return False
        os.replace(tmp, dest)
    except FileNotFoundError:
        if not os.path.exists(path):
            raise
        raise StorageError(f"cannot write {uri}: its folder vanished; check the destination")
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if err.filename and str(err.filename) == str(path):
            raise
        raise StorageError(
            f"cannot write {uri}: {err.strerror}; check the path and free space"
        ) from err
    return True


def run_parallel(
    fn: Callable[[Any], None], items: list, threads: int, errors: list[BaseException]
) -> None:
    """Run ``fn`` over ``items`` on up to ``threads`` daemon threads; exceptions are appended to
    ``errors``."""
    if not items:
        return
    work: queue.Queue[Any] = queue.Queue()
    for item in items:
        work.put(item)

    def loop() -> None:
        while not errors:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            try:
                fn(item)
            except BaseException as err:  # handed back to the caller, which raises it
                errors.append(err)

    if threads <= 1 or len(items) == 1:
        loop()
        return
    pool = [threading.Thread(target=loop, daemon=True) for _ in range(min(threads, len(items)))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

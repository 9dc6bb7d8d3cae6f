"""Checked uploads: a file is sent only if every byte came from it unchanged.

Small files are one PUT of a snapshot; large ones are a multipart upload (parts streamed with CRC32)
completed only when every part came from the same unchanged file, so no half-written object ever
appears under a real key.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from agent.errors import StorageError
from agent.storage import ONE_TRY, S3Storage, Storage, parse_uri
from agent.storage.multipart import (
    PART_THREADS,
    S3_MIN_PART,
    FileChanged,
    MultipartUpload,
    run_parallel,
)
from agent.sync.folders import Sig, file_sig

__all__ = ["PART_THREADS", "put_checked", "run_parallel"]


def put_checked(
    storage: Storage, path: Path, uri: str, expected: Sig, *, part_size: int, log: logging.Logger
) -> bool:
    """Send ``path`` to ``uri`` only if every byte came from the file as ``expected``; False if it
    changed. One try: the scheduler retries with its own backoff."""
    if isinstance(storage, S3Storage):
        return _put_s3(storage.with_policy(ONE_TRY), path, uri, expected, part_size, log)
    return _put_local(path, uri, expected)


def _put_s3(
    storage: S3Storage, path: Path, uri: str, expected: Sig, part_size: int, log: logging.Logger
) -> bool:
    size = expected[0]
    if size < max(part_size, S3_MIN_PART):
        with open(path, "rb") as handle:
            data = handle.read()
        if len(data) != size or file_sig(path) != expected:
            return False
        storage.put_bytes(data, uri)
        return True
    upload = MultipartUpload(
        storage,
        path,
        uri,
        part_size,
        size=size,
        unchanged=lambda: file_sig(path) == expected,
        log=log,
    )
    try:
        upload.attempt()
    except FileChanged:
        return False
    finally:
        upload.abort()  # only does anything when it did not complete
    return True


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
        raise StorageError(
            f"cannot write {uri}: its folder vanished; check the destination"
        ) from None
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if err.filename and str(err.filename) == str(path):
            raise
        raise StorageError(
            f"cannot write {uri}: {err.strerror}; check the path and free space"
        ) from err
    return True

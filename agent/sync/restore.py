"""Checkpoint restore: the checkpoint prefix downloaded into the local folder before the script
starts."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from agent.errors import DiskFullError, StoppedOnRequest, StorageError
from agent.safety import safe_join
from agent.storage import DownloadStopped, Storage
from agent.sync.folders import Folder, Sig, file_sig, folder_prefix, remote_rel
from agent.sync.upload import run_parallel

__all__ = ["RestoreStopped", "restore_folder"]


class RestoreStopped(StoppedOnRequest):
    """The restore ended early because a stop was asked for (a signal to the agent): no new file
    was started and those under way ended without a partial file; the files restored stay, a rerun
    fetches the rest."""


def restore_folder(
    folder: Folder,
    storage: Storage,
    *,
    workers: int,
    done: dict[Path, Sig],
    log: logging.Logger,
    stop: threading.Event | None = None,
) -> int:
    """Download every object under the folder's prefix that is missing locally; returns files
    restored.

    Files already present with the object's size are kept. Every file kept or fetched is recorded in
    ``done`` with its signature (so it is not uploaded again). Raises StorageError (or a subclass)
    when
    the listing or a download fails, DiskFullError / StorageError naming the file on local errors,
    UnsafePathError for a key that would land outside the folder. ``stop`` (a stop asked of the
    agent) is looked at before each file and between two reads of one: once it is set no new file
    starts, those under way end without leaving a partial file, and RestoreStopped is raised.
    """
    prefix = folder_prefix(folder.remote)
    folder.local.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[str, Path, int]] = []
    for info in storage.list(prefix.uri):
        rel = remote_rel(info, prefix)
        if not rel or rel.endswith("/"):
            continue
        dest = safe_join(folder.local, rel, what=f"checkpoint key {info.key!r}")
        if dest.is_file() and dest.stat().st_size == info.size:
            done[dest] = file_sig(dest)
            continue
        todo.append((info.uri, dest, info.size))
    if not todo:
        log.info("checkpoint restore: nothing to fetch from %s", prefix.uri)
        return 0
    started = time.monotonic()
    errors: list[BaseException] = []
    lock = threading.Lock()

    stopped = f"checkpoint restore from {prefix.uri} stopped on request"

    def fetch(item: tuple[str, Path, int]) -> None:
        uri, dest, size = item
        if stop is not None and stop.is_set():
            raise RestoreStopped(stopped)
        try:
            storage.get_file(uri, dest, expected_size=size, cancel=stop)
        except DownloadStopped:
            raise RestoreStopped(stopped) from None
        except PermissionError as err:
            raise StorageError(
                f"cannot write {dest} while restoring {uri}: permission denied; make "
                f"{folder.local} writable by uid {os.getuid()}"
            ) from err
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"disk full while restoring {dest} from {uri}; free space on "
                    f"{folder.local} or use a bigger volume"
                ) from err
            raise StorageError(
                f"cannot write {dest} while restoring {uri}: {err.strerror}; check {folder.local}"
            ) from err
        sig = file_sig(dest)
        with lock:
            done[dest] = sig

    run_parallel(fetch, todo, workers, errors)
    if errors:
        raise errors[0]
    total = sum(size for _, _, size in todo)
    log.info(
        "checkpoint restore: %d files (%d bytes) from %s into %s in %.2f s",
        len(todo),
        total,
        prefix.uri,
        folder.local,
        time.monotonic() - started,
    )
    return len(todo)

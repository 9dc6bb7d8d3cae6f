"""The folders live sync mirrors: which local folder goes to which prefix, and how local files are
seen."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.job import Job
from agent.storage import Location, ObjectInfo, parse_uri

__all__ = [
    "Folder",
    "Sig",
    "file_sig",
    "file_size",
    "folder_prefix",
    "plan_folders",
    "rel_path",
    "remote_rel",
    "walk_files",
]

# (size, mtime_ns, inode): what "unchanged" means for a local file.
Sig = tuple[int, int, int]


@dataclass(frozen=True)
class Folder:
    """One watched folder and the prefix it mirrors to."""

    name: str
    local: Path
    remote: Location
    wait_for_close: (
        bool  # True: upload on close only (checkpoints, intermediate); False: also when stable
    )

    def uri_for(self, rel: str) -> str:
        return self.remote.child(rel).uri


def plan_folders(job: Job, log: logging.Logger) -> tuple[Folder, ...]:
    """The checkpoint, intermediate and TensorBoard folders the job asks to mirror (none on
    SageMaker)."""
    if job.on_sagemaker:
        log.info("live sync: on SageMaker the platform syncs checkpoints and outputs; not watching")
        return ()
    layout = job.layout
    folders: list[Folder] = []
    if job.checkpoint_uri:
        local = Path(job.checkpoint_local_path or layout.checkpoints_dir)
        folders.append(Folder("checkpoints", local, parse_uri(job.checkpoint_uri), True))
    if job.job_output_uri:
        folders.append(
            Folder(
                "intermediate",
                Path(layout.intermediate_dir),
                parse_uri(job.job_output_uri.rstrip("/") + "/intermediate"),
                True,
            )
        )
    if job.tensorboard_uri:
        local = Path(job.tensorboard_local_path or layout.tensorboard_dir)
        folders.append(Folder("tensorboard", local, parse_uri(job.tensorboard_uri), False))
    return tuple(folders)


def file_sig(path: Path) -> Sig:
    """The file's (size, mtime_ns, inode); raises OSError."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def file_size(path: Path) -> int:
    """The file's size, 0 when it cannot be read."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def rel_path(folder: Folder, path: Path) -> str:
    """``path`` relative to the folder, with forward slashes."""
    return path.relative_to(folder.local).as_posix()


def folder_prefix(loc: Location) -> Location:
    """The location as a folder: a trailing slash so that ``ckpt`` does not match ``ckpt2/``."""
    if loc.scheme == "s3":
        key = loc.key if (not loc.key or loc.key.endswith("/")) else loc.key + "/"
        return Location("s3", loc.bucket, key)
    return loc


def remote_rel(info: ObjectInfo, prefix: Location) -> str:
    """A listed object's key relative to the folder prefix it was listed under."""
    return (
        info.key[len(prefix.key) :]
        if info.location.scheme == "s3"
        else os.path.relpath(info.key, prefix.key)
    )


def walk_files(root: Path) -> Iterable[Path]:
    """Every regular file (not a link) under ``root``."""
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return found

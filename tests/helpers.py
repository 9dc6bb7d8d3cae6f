"""Small helpers shared by tests in several folders."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Callable, Mapping

import pytest

__all__ = ["raises_once_stopped", "tar_gz"]


def tar_gz(files: Mapping[str, bytes], links: Mapping[str, str] = {}) -> bytes:
    """A .tar.gz in memory: ``files`` (name -> content), then ``links`` (name -> symlink target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buf.getvalue()


def raises_once_stopped(
    expected: type[BaseException],
    after: float,
    work: Callable[[threading.Event], object],
    match: str = "stopped on request",
) -> float:
    """``work(stop)`` with ``stop`` set ``after`` seconds in: checks it raised ``expected`` (its
    message matching ``match``) and returns the seconds it took in all."""
    stop = threading.Event()
    timer = threading.Timer(after, stop.set)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(expected, match=match):
            work(stop)
    finally:
        timer.cancel()
    return time.monotonic() - start

"""Small helpers shared by tests in several folders."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping

__all__ = ["tar_gz"]


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

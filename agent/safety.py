"""Writing untrusted names safely: object keys and archive members never land outside their target."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, Optional, Union

from agent.errors import UnsafePathError

__all__ = ["safe_join", "safe_extract_tar"]


def safe_join(root: Union[str, Path], relative: str, *, what: str = "key") -> Path:
    """``root/relative``, refusing names that are absolute, contain ``..`` or NUL, or resolve outside ``root``.

    Raises UnsafePathError naming the offending ``what`` (e.g. ``key 'a/../../etc'``).
    """
    if not relative or "\x00" in relative:
        raise UnsafePathError(f"{what} {relative!r} is empty or contains a NUL byte; refusing to write it")
    if relative.startswith("/") or relative.startswith("\\"):
        raise UnsafePathError(f"{what} {relative!r} is an absolute path; refusing to write outside {root}")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if any(part == ".." for part in parts):
        raise UnsafePathError(f"{what} {relative!r} contains '..'; refusing to write outside {root}")
    root_path = Path(root).resolve()
    target = (root_path / Path(*parts)).resolve() if parts else root_path
    if target != root_path and root_path not in target.parents:
        raise UnsafePathError(f"{what} {relative!r} resolves to {target}, outside {root_path}; refusing to write it")
    if target == root_path:
        raise UnsafePathError(f"{what} {relative!r} names the target folder itself; refusing to write it")
    return target


def safe_extract_tar(source: Union[str, Path, IO[bytes]], dest: Union[str, Path], *, what: str = "archive") -> int:
    """Extract a (possibly gzipped) tar into ``dest`` and return the number of members.

    Every member is checked before anything is written: absolute names, ``..``, links that point
    outside ``dest``, and device files raise UnsafePathError naming the member.
    """
    dest_path = Path(dest)
    dest_path.mkdir(parents=True, exist_ok=True)
    root = dest_path.resolve()
    try:
        if isinstance(source, (str, Path)):
            archive = tarfile.open(str(source), "r:*")
        else:
            archive = tarfile.open(fileobj=source, mode="r|*")
    except tarfile.TarError as err:
        raise UnsafePathError(f"{what} is not a readable tar archive ({err}); rebuild it with tar -czf") from err
    with archive:
        if isinstance(source, (str, Path)):
            members = archive.getmembers()
            for member in members:
                _check_member(member, root, what)
            _extract(archive, members, root)
            return len(members)
        # A stream can be read once: check each member just before it is written.
        count = 0
        for member in archive:
            _check_member(member, root, what)
            _extract(archive, [member], root)
            count += 1
        return count


def _check_member(member: tarfile.TarInfo, root: Path, what: str) -> None:
    name = member.name
    if name in (".", "./"):
        return
    target = safe_join(root, name, what=f"{what} member")
    if member.isdev() or member.isfifo():
        raise UnsafePathError(f"{what} member {name!r} is a device or FIFO; refusing to extract it")
    if member.issym() or member.islnk():
        link = member.linkname
        if member.issym():
            base = target.parent
            resolved = (base / link).resolve() if not link.startswith("/") else Path(link).resolve()
        else:
            resolved = (root / link).resolve()
        if link.startswith("/") or (resolved != root and root not in resolved.parents):
            raise UnsafePathError(
                f"{what} member {name!r} links to {link!r}, outside the target folder; refusing to extract it"
            )


def _extract(archive: tarfile.TarFile, members: list, root: Path) -> None:
    data_filter: Optional[object] = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            archive.extractall(root, members=members, filter="data")
        except tarfile.FilterError as err:  # type: ignore[attr-defined]
            raise UnsafePathError(f"archive member refused: {err}") from err
    else:  # Python without PEP 706 filters: members were checked above
        for member in members:
            member.mode = member.mode & 0o755 if member.isfile() else member.mode
        archive.extractall(root, members=members)

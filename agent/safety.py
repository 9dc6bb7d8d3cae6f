"""Writing untrusted names safely: object keys and archive members never land outside their
target."""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any

from agent.errors import ArchiveError, UnsafePathError

__all__ = ["safe_extract_tar", "safe_join", "safe_join_empty"]


def safe_join(root: str | Path, relative: str, *, what: str = "key") -> Path:
    """``root/relative``, refusing names that are absolute, contain ``..`` or NUL, or resolve
    outside ``root``.

    Raises UnsafePathError naming the offending ``what`` (e.g. ``key 'a/../../etc'``).
    """
    parts = _parts(root, relative, what)
    root_path = Path(root).resolve()
    target = (root_path / Path(*parts)).resolve() if parts else root_path
    if target != root_path and root_path not in target.parents:
        raise UnsafePathError(
            f"{what} {relative!r} resolves to {target}, outside {root_path}; refusing to write it"
        )
    if target == root_path:
        raise UnsafePathError(
            f"{what} {relative!r} names the target folder itself; refusing to write it"
        )
    return target


def safe_join_empty(root: str, relative: str, *, what: str = "key") -> str:
    """:func:`safe_join` for a ``root`` that is already resolved and still empty: nothing in it
    can be a link, so the checks are on the name alone (no system call per name)."""
    parts = [part for part in _parts(root, relative, what) if part != "."]
    if not parts:
        raise UnsafePathError(
            f"{what} {relative!r} names the target folder itself; refusing to write it"
        )
    return os.path.join(root, *parts)


def _parts(root: str | Path, relative: str, what: str) -> tuple[str, ...]:
    if not relative or "\x00" in relative:
        raise UnsafePathError(
            f"{what} {relative!r} is empty or contains a NUL byte; refusing to write it"
        )
    if relative.startswith(("/", "\\")):
        raise UnsafePathError(
            f"{what} {relative!r} is an absolute path; refusing to write outside {root}"
        )
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if any(part == ".." for part in parts):
        raise UnsafePathError(
            f"{what} {relative!r} contains '..'; refusing to write outside {root}"
        )
    return parts


def safe_extract_tar(
    source: str | Path | IO[bytes],
    dest: str | Path,
    *,
    what: str = "archive",
    max_bytes: int | None = None,
    max_members: int | None = None,
    limit_names: tuple[str, str] = ("TORCHBAY_SOURCE_MAX_BYTES", "TORCHBAY_SOURCE_MAX_MEMBERS"),
) -> int:
    """Extract a (possibly gzipped) tar into ``dest`` and return the number of members.

    Every member is checked before anything is written: absolute names, ``..``, links that point
    outside ``dest``, and device files raise UnsafePathError naming the member. A truncated or
    corrupt archive raises ArchiveError naming the byte offset reached and the last member read;
    more than ``max_members`` members or ``max_bytes`` unpacked bytes (a gzip bomb) raise
    ArchiveError before those bytes are written (``limit_names`` are the settings named in that
    message).
    """
    dest_path = Path(dest)
    dest_path.mkdir(parents=True, exist_ok=True)
    root = dest_path.resolve()
    raw: Any = open(source, "rb") if isinstance(source, (str, Path)) else source
    tally = _Tally(what, raw, max_bytes, max_members, limit_names)
    try:
        try:
            archive = tarfile.open(
                fileobj=raw, mode="r:*" if isinstance(source, (str, Path)) else "r|*"
            )
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise ArchiveError(
                f"{what} is not a readable tar archive ({err}); rebuild it with tar -czf"
            ) from err
        with archive:
            if isinstance(source, (str, Path)):
                members = []
                for member in tally.members(archive):
                    _check_member(member, root, what)
                    members.append(member)
                _extract(archive, members, root, tally)
                return len(members)
            # A stream can be read once: check each member just before it is written.
            count = 0
            for member in tally.members(archive):
                _check_member(member, root, what)
                _extract(archive, [member], root, tally)
                count += 1
            return count
    finally:
        if raw is not source:
            raw.close()


_CORRUPT = (tarfile.ReadError, tarfile.CompressionError, tarfile.HeaderError, EOFError, zlib.error)


class _Tally:
    """Counts members and unpacked bytes against the limits; turns read errors into ArchiveError."""

    def __init__(
        self,
        what: str,
        raw: Any,
        max_bytes: int | None,
        max_members: int | None,
        limit_names: tuple[str, str],
    ) -> None:
        self.what = what
        self.raw = raw
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.limit_names = limit_names
        self.count = 0
        self.bytes = 0
        self.reading: str | None = None

    def members(self, archive: tarfile.TarFile) -> Any:
        while True:
            try:
                member = archive.next()
            except _CORRUPT as err:
                raise self.corrupt(err) from err
            if member is None:
                return
            self.count += 1
            self.bytes += member.size if member.isfile() else 0
            if self.max_members is not None and self.count > self.max_members:
                raise ArchiveError(
                    f"{self.what} holds more than {self.max_members} members; raise "
                    f"{self.limit_names[1]} if that is expected, or ship fewer files"
                )
            if self.max_bytes is not None and self.bytes > self.max_bytes:
                raise ArchiveError(
                    f"{self.what} unpacks to more than {self.max_bytes} bytes (member "
                    f"{member.name!r} alone is {member.size}); refusing to extract it: raise "
                    f"{self.limit_names[0]} if that is expected"
                )
            self.reading = member.name
            yield member

    def corrupt(self, err: BaseException) -> ArchiveError:
        try:
            offset = f"byte {self.raw.tell()} of the file"
        except (OSError, ValueError, AttributeError):
            offset = "an unknown byte"
        after = f" while reading member {self.reading!r}" if self.reading else ""
        return ArchiveError(
            f"{self.what} is truncated or corrupt: it ends or breaks at {offset}{after} "
            f"({type(err).__name__}: {err or 'unexpected end of data'}); upload it again, or "
            "rebuild "
            "it with tar -czf"
        )


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
                f"{what} member {name!r} links to {link!r}, outside the target folder; refusing to "
                "extract it"
            )


def _extract(
    archive: tarfile.TarFile, members: list[tarfile.TarInfo], root: Path, tally: _Tally
) -> None:
    data_filter: object | None = getattr(tarfile, "data_filter", None)
    try:
        if data_filter is not None:
            try:
                archive.extractall(root, members=members, filter="data")
            except tarfile.FilterError as err:
                raise UnsafePathError(f"archive member refused: {err}") from err
        else:  # Python without PEP 706 filters: members were checked above
            for member in members:
                member.mode = member.mode & 0o755 if member.isfile() else member.mode
            archive.extractall(root, members=members)
    except _CORRUPT as err:
        raise tally.corrupt(err) from err

"""agent/safety.py: hostile keys and tar members never write outside their target."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from agent.errors import UnsafePathError
from agent.safety import safe_extract_tar, safe_join


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/\x00b", "", "..", "\\abs"])
def test_safe_join_refuses(tmp_path: Path, key: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, key)


def test_safe_join_refuses_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(root, "link/escaped")


def test_safe_join_accepts_nested(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b/c.txt") == (tmp_path / "a" / "b" / "c.txt").resolve()


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


@pytest.mark.parametrize("member", [
    _file("../evil.txt"),
    _file("/tmp/evil-abs.txt"),
    _file("ok/../../evil.txt"),
    _link("sneaky", "/etc/passwd"),
    _link("sneaky", "../../outside"),
    _link("hard", "../outside", tarfile.LNKTYPE),
])
def test_hostile_tar_refused_and_nothing_written(tmp_path: Path, member) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar([_file("good.txt", b"good"), member]))
    dest = tmp_path / "out" / "code"
    with pytest.raises(UnsafePathError, match="member"):
        safe_extract_tar(archive, dest)
    # Checked before anything is written: not even the good member lands.
    assert not (dest / "good.txt").exists()
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_stream_extract_and_inner_links(tmp_path: Path) -> None:
    data = _tar([_file("pkg/a.py", b"print(1)"), _link("pkg/b.py", "a.py")])
    n = safe_extract_tar(io.BytesIO(data), tmp_path / "dest")
    assert n == 2
    assert (tmp_path / "dest" / "pkg" / "a.py").read_bytes() == b"print(1)"
    assert (tmp_path / "dest" / "pkg" / "b.py").read_bytes() == b"print(1)"


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"not a tar at all")
    with pytest.raises(UnsafePathError, match="not a readable tar"):
        safe_extract_tar(bad, tmp_path / "d")

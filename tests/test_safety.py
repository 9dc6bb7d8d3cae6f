"""agent/safety.py: hostile keys and tar members never write outside their target."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from agent.errors import ArchiveError, UnsafePathError
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


@pytest.mark.parametrize(
    "member",
    [
        _file("../evil.txt"),
        _file("/tmp/evil-abs.txt"),
        _file("ok/../../evil.txt"),
        _link("sneaky", "/etc/passwd"),
        _link("sneaky", "../../outside"),
        _link("hard", "../outside", tarfile.LNKTYPE),
    ],
)
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
    with pytest.raises(ArchiveError, match="not a readable tar"):
        safe_extract_tar(bad, tmp_path / "d")


@pytest.mark.parametrize("stream", [False, True])
def test_truncated_archive_names_the_offset_and_member(tmp_path: Path, stream: bool) -> None:
    import os

    whole = _tar(
        [(tarfile.TarInfo("a.txt"), b"a" * 100), (tarfile.TarInfo("big.bin"), os.urandom(300_000))]
    )
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        ArchiveError, match=r"truncated or corrupt: it ends or breaks at byte \d+ .*'big.bin'"
    ):
        if stream:
            with open(cut, "rb") as handle:
                safe_extract_tar(handle, tmp_path / "d", what="model archive")
        else:
            safe_extract_tar(cut, tmp_path / "d", what="model archive")


def test_corrupt_gzip_data(tmp_path: Path) -> None:
    whole = bytearray(_tar([(tarfile.TarInfo("a.txt"), b"hello " * 5000)]))
    whole[40:60] = b"\xff" * 20
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(whole))
    with pytest.raises(ArchiveError, match="archive"):
        safe_extract_tar(bad, tmp_path / "d")


def test_size_limit_stops_a_bomb_before_writing(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(
        _tar(
            [(tarfile.TarInfo("small.txt"), b"s"), (tarfile.TarInfo("zeros.bin"), bytes(8_000_000))]
        )
    )
    with pytest.raises(
        ArchiveError, match="unpacks to more than 1000000 bytes .*'zeros.bin'.*SOURCE_MAX_BYTES"
    ):
        safe_extract_tar(bomb, tmp_path / "d", max_bytes=1_000_000)
    assert (
        not (tmp_path / "d" / "zeros.bin").exists() and not (tmp_path / "d" / "small.txt").exists()
    )


def test_member_count_limit(tmp_path: Path) -> None:
    many = tmp_path / "many.tar.gz"
    many.write_bytes(_tar([(tarfile.TarInfo(f"f{i}"), b"x") for i in range(20)]))
    with pytest.raises(ArchiveError, match="more than 10 members.*TORCHBAY_SOURCE_MAX_MEMBERS"):
        safe_extract_tar(many, tmp_path / "d", max_members=10)
    assert safe_extract_tar(many, tmp_path / "e", max_members=20, max_bytes=20) == 20

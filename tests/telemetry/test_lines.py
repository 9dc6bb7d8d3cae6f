"""LineSplitter: whole lines only, partial last line held, long lines cut into marked pieces."""

from __future__ import annotations

import random

import pytest

from agent.telemetry.lines import CUT_MARK, LineSplitter


def _feed_all(splitter: LineSplitter, data: bytes, sizes: list[int]) -> bytes:
    out = []
    pos = 0
    for size in sizes:
        out.append(splitter.feed(data[pos : pos + size]))
        pos += size
    out.append(splitter.feed(data[pos:]))
    out.append(splitter.finish())
    return b"".join(out)


def _rejoin(pieces: list[bytes]) -> list[bytes]:
    """Undo the cutting: a piece ending with CUT_MARK continues on the next one."""
    lines: list[bytes] = []
    current = b""
    for piece in pieces:
        if current and piece.startswith(CUT_MARK):
            piece = piece[len(CUT_MARK) :]
        if piece.endswith(CUT_MARK):
            current += piece[: -len(CUT_MARK)]
            continue
        lines.append(current + piece)
        current = b""
    assert current == b""
    return lines


def test_chunks_cut_anywhere_give_back_the_same_lines():
    rng = random.Random(7)
    lines = [b"x" * rng.randrange(0, 300) + b" %d" % i for i in range(3000)]
    data = b"\n".join(lines) + b"\n"
    sizes = [rng.randrange(1, 4096) for _ in range(400)]
    out = _feed_all(LineSplitter(65536), data, sizes)
    assert out == data


def test_blocks_hold_only_complete_lines():
    splitter = LineSplitter(1024)
    assert splitter.feed(b"abc") == b""
    assert splitter.pending == 3
    assert splitter.feed(b"def\ngh") == b"abcdef\n"
    assert splitter.feed(b"i\n\nj") == b"ghi\n\n"
    assert splitter.finish() == b"j\n"
    assert splitter.finish() == b""


def test_a_long_line_is_cut_into_marked_pieces_never_dropped():
    max_line = 100
    long = bytes(range(33, 127)) * 30  # 2820 bytes, no newline
    data = b"short\n" + long + b"\nafter\n"
    rng = random.Random(1)
    out = _feed_all(LineSplitter(max_line), data, [rng.randrange(1, 70) for _ in range(60)])
    pieces = out.split(b"\n")[:-1]
    assert pieces[0] == b"short" and pieces[-1] == b"after"
    assert len(pieces) > 3
    for piece in pieces:
        assert len(piece) <= max_line + 2 * len(CUT_MARK)
    assert _rejoin(pieces) == [b"short", long, b"after"]


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_long_line_in_one_chunk_or_many(chunk):
    long = b"a" * 1000
    data = long + b"\n" + long  # the second one has no newline: finish() emits it
    splitter = LineSplitter(64)
    out = _feed_all(splitter, data, [chunk] * (len(data) // chunk))
    assert _rejoin(out.split(b"\n")[:-1]) == [long, long]


def test_a_cut_never_splits_a_utf8_character():
    text = ("é" * 500).encode()  # 2 bytes each
    out = _feed_all(LineSplitter(99), text + b"\n", [])
    for piece in out.split(b"\n")[:-1]:
        piece.replace(CUT_MARK, b"").decode("utf-8")  # raises if a character was split


def test_max_line_too_small_is_refused():
    with pytest.raises(ValueError, match="at least 8"):
        LineSplitter(3)


def test_long_line_found_anywhere_in_a_big_block():
    max_line = 64
    for position in (0, 500, 9000 - 200):
        lines = [b"k" * 30] * 300
        data = bytearray(b"\n".join(lines) + b"\n")
        data[position : position + 100] = (
            b"L" * 100
        )  # overwrites newlines: one line of at least 100 bytes
        out = LineSplitter(max_line).feed(bytes(data))
        assert max(map(len, out.split(b"\n"))) <= max_line + 2 * len(CUT_MARK)
        assert _rejoin(out.split(b"\n")[:-1]) == bytes(data).split(b"\n")[:-1]

"""A byte-oriented line splitter: whole lines out, the partial last line held, long lines cut and
marked.

Fed raw chunks as ``os.read`` returns them (cut anywhere, even inside a UTF-8
character), :class:`LineSplitter` returns blocks of complete lines only, so the
caller can prefix every line of a block with one ``bytes.replace``. A line longer
than ``max_line`` bytes is never dropped: it is cut into pieces of at most
``max_line`` bytes; every piece but the last ends with :data:`CUT_MARK` and every
piece but the first starts with it, so the original line is the pieces' contents
joined with the marks removed.
"""

from __future__ import annotations

__all__ = ["CUT_MARK", "LineSplitter"]

CUT_MARK = b"[...]"
_NL = b"\n"


def _cut_point(data: bytes, limit: int) -> int:
    """An index <= limit that does not fall inside a UTF-8 character (when the data is UTF-8)."""
    point = limit
    while point > limit - 3 and point > 1 and (data[point] & 0xC0) == 0x80:
        point -= 1
    return point


class LineSplitter:
    """Turn a byte stream into blocks of complete, newline-terminated lines (see the module doc)."""

    __slots__ = ("_carry", "_cont", "_max")

    def __init__(self, max_line: int = 65536) -> None:
        if max_line < 8:
            raise ValueError(f"max_line must be at least 8 bytes, got {max_line}")
        self._max = max_line
        self._carry = b""
        self._cont = False  # the held partial line continues a line already cut

    @property
    def pending(self) -> int:
        """Bytes held back (the partial last line)."""
        return len(self._carry)

    def feed(self, data: bytes) -> bytes:
        """Take the next chunk; return the complete lines it finishes (possibly ``b""``)."""
        buf = self._carry + data if self._carry else data
        end = buf.rfind(_NL) + 1
        block = buf[:end]
        self._carry = buf[end:]
        if block:
            if self._cont:
                block = CUT_MARK + block
                self._cont = False
            if len(block) > self._max and self._may_hold_long_line(block):
                block = self._cut_block(block)
        if len(self._carry) > self._max:
            block += self._cut_carry()
        return block

    def finish(self) -> bytes:
        """The held partial line, terminated with a newline (``b""`` if none); the splitter is
        reset."""
        if not self._carry:
            self._cont = False
            return b""
        line = (CUT_MARK if self._cont else b"") + self._carry + _NL
        self._carry = b""
        self._cont = False
        if len(line) - 1 > self._max:
            line = self._cut_block(line)
        return line

    def _may_hold_long_line(self, block: bytes) -> bool:
        """False when no line can be longer than max_line: every aligned window of max_line // 2
        bytes has a newline.

        A line longer than max_line covers at least one whole window, so this is exact in that
        direction and costs one short ``find`` per window instead of a split into lines.
        """
        half = self._max // 2
        find = block.find
        for start in range(0, len(block) - half + 1, half):
            if find(_NL, start, start + half) < 0:
                return max(map(len, block.split(_NL))) > self._max
        return False

    def _cut_block(self, block: bytes) -> bytes:
        out = []
        for line in block[:-1].split(_NL):
            out.append(self._cut_line(line) if len(line) > self._max else line)
        return _NL.join(out) + _NL

    def _cut_line(self, line: bytes) -> bytes:
        pieces = []
        while len(line) > self._max:
            point = _cut_point(line, self._max)
            pieces.append(line[:point])
            line = line[point:]
        pieces.append(line)
        return (CUT_MARK + _NL + CUT_MARK).join(pieces)

    def _cut_carry(self) -> bytes:
        out = []
        carry = self._carry
        while len(carry) > self._max:
            point = _cut_point(carry, self._max)
            out.append((CUT_MARK if self._cont else b"") + carry[:point] + CUT_MARK + _NL)
            carry = carry[point:]
            self._cont = True
        self._carry = carry
        return b"".join(out)

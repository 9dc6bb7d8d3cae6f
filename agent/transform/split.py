"""An input object into records (per ``SplitType``) and records into requests (per
``BatchStrategy``).

``None``: the whole object is one record. ``Line``: one record per line (``\\n`` or ``\\r\\n``;
empty lines are
skipped but keep their number, so errors name the line an editor shows). ``RecordIO``: MXNet
RecordIO
records (magic ``0xced7230a``; a record split over several parts stays one record) with their
framing kept,
so a request is valid RecordIO. ``TFRecord``: length-framed TFRecord records, framing kept (the CRCs
are
not checked). MultiRecord requests hold as many whole records as fit in ``MaxPayloadInMB``; records
of a
Line split are joined with ``\\n``.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from agent.errors import TransformError

__all__ = ["Batch", "Record", "decompress", "pack", "split_records"]

_RECORDIO_MAGIC = 0xCED7230A
_LENGTH_MASK = (1 << 29) - 1


@dataclass(frozen=True)
class Record:
    """One record: its number in the object (1-based; the line number for Line) and its bytes."""

    number: int
    data: bytes


@dataclass(frozen=True)
class Batch:
    """The records of one request and the body sent for them."""

    records: tuple[Record, ...]
    body: bytes


def decompress(data: bytes, compression: str, what: str) -> bytes:
    """The object's bytes after ``CompressionType`` (None or Gzip)."""
    if compression != "Gzip":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise TransformError(
            f"{what} is not gzip data ({err}); set CompressionType to None or fix the object"
        ) from None


def split_records(data: bytes, split_type: str, what: str) -> list[Record]:
    """The records of ``data``; raises TransformError naming the object and the offset of bad
    framing."""
    if split_type == "None":
        return [Record(1, data)] if data else []
    if split_type == "Line":
        return list(_lines(data))
    if split_type == "RecordIO":
        return list(_recordio(data, what))
    if split_type == "TFRecord":
        return list(_tfrecord(data, what))
    raise TransformError(
        f"SplitType {split_type!r} is unknown; use None, Line, RecordIO or TFRecord"
    )


def _lines(data: bytes) -> Iterator[Record]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            yield Record(number, line)


def _recordio(data: bytes, what: str) -> Iterator[Record]:
    pos, number, start = 0, 0, None
    while pos < len(data):
        if len(data) - pos < 8:
            raise TransformError(
                f"{what}: RecordIO data ends inside a record header at byte {pos}; the object "
                "is cut short or not RecordIO"
            )
        magic, lrecord = struct.unpack_from("<II", data, pos)
        if magic != _RECORDIO_MAGIC:
            raise TransformError(
                f"{what}: no RecordIO magic at byte {pos} (found {magic:#010x}); set SplitType "
                "to match the data"
            )
        flag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        end = pos + 8 + length + (-length % 4)
        if end > len(data):
            raise TransformError(
                f"{what}: RecordIO record at byte {pos} says {length} bytes but the object ends "
                "first"
            )
        if flag in (0, 1) and start is None:
            start = pos
        if flag in (0, 3):
            number += 1
            yield Record(number, data[start if start is not None else pos : end])
            start = None
        pos = end
    if start is not None:
        raise TransformError(
            f"{what}: the last RecordIO record (from byte {start}) has no end part"
        )


def _tfrecord(data: bytes, what: str) -> Iterator[Record]:
    pos, number = 0, 0
    while pos < len(data):
        if len(data) - pos < 12:
            raise TransformError(f"{what}: TFRecord data ends inside a record header at byte {pos}")
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 16 + length
        if end > len(data):
            raise TransformError(
                f"{what}: TFRecord record at byte {pos} says {length} bytes but the object ends "
                "first; set SplitType to match the data"
            )
        number += 1
        yield Record(number, data[pos:end])
        pos = end


def pack(
    records: Sequence[Record], split_type: str, multi: bool, max_bytes: int, what: str
) -> list[Batch]:
    """Requests for ``records``: one record each (SingleRecord) or as many as fit in
    ``max_bytes``."""
    joiner = b"\n" if split_type == "Line" else b""
    batches: list[Batch] = []
    current: list[Record] = []
    size = 0
    for record in records:
        if len(record.data) > max_bytes:
            raise TransformError(
                f"{what} record {record.number} has {len(record.data)} bytes, over MaxPayloadInMB "
                f"({max_bytes} bytes); raise MaxPayloadInMB or split the input (SplitType)"
            )
        extra = len(record.data) + (len(joiner) if current else 0)
        if current and (not multi or size + extra > max_bytes):
            batches.append(Batch(tuple(current), joiner.join(r.data for r in current)))
            current, size, extra = [], 0, len(record.data)
        current.append(record)
        size += extra
    if current:
        batches.append(Batch(tuple(current), joiner.join(r.data for r in current)))
    return batches

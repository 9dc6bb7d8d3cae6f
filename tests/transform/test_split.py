"""agent/transform/split.py: records per SplitType, framing errors named, MultiRecord packing under
the limit."""

from __future__ import annotations

import gzip
import struct

import pytest

from agent.errors import TransformError
from agent.transform.split import Record, decompress, pack, split_records


def _recordio(payload: bytes, flag: int = 0) -> bytes:
    return (
        struct.pack("<II", 0xCED7230A, (flag << 29) | len(payload))
        + payload
        + b"\0" * (-len(payload) % 4)
    )


def _tfrecord(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4


def test_lines_keep_their_numbers_and_skip_empty_ones() -> None:
    records = split_records(b"a,1\r\n\nb,2\n  \nc,3", "Line", "x")
    assert [(r.number, r.data) for r in records] == [(1, b"a,1"), (3, b"b,2"), (5, b"c,3")]
    assert split_records(b"whole\nobject", "None", "x") == [Record(1, b"whole\nobject")]
    assert split_records(b"", "None", "x") == []


def test_recordio_records_keep_their_framing_and_multipart_records_stay_whole() -> None:
    one, two = _recordio(b"abcde"), _recordio(b"xy", 1) + _recordio(b"zz", 2) + _recordio(b"w", 3)
    records = split_records(one + two, "RecordIO", "s3://b/r.rec")
    assert [r.data for r in records] == [one, two]
    with pytest.raises(TransformError, match=r"s3://b/r.rec: no RecordIO magic at byte 16"):
        split_records(one + b"garbage!", "RecordIO", "s3://b/r.rec")
    with pytest.raises(TransformError, match="ends first"):
        split_records(one[:-4], "RecordIO", "s3://b/r.rec")


def test_tfrecord_records_and_a_cut_object() -> None:
    data = _tfrecord(b"first") + _tfrecord(b"second!")
    assert [r.data for r in split_records(data, "TFRecord", "t")] == [
        _tfrecord(b"first"),
        _tfrecord(b"second!"),
    ]
    with pytest.raises(TransformError, match="TFRecord record at byte 21"):
        split_records(data[:-3], "TFRecord", "t")


def test_gzip_is_unpacked_and_a_bad_archive_named() -> None:
    assert decompress(gzip.compress(b"1,2\n"), "Gzip", "o") == b"1,2\n"
    with pytest.raises(TransformError, match="o is not gzip data"):
        decompress(b"plain", "Gzip", "o")


def test_multirecord_packs_whole_records_under_the_limit() -> None:
    records = [Record(i + 1, b"x" * 4) for i in range(10)]
    batches = pack(records, "Line", True, 14, "o")  # 3 records and 2 newlines = 14 bytes
    assert [len(b.records) for b in batches] == [3, 3, 3, 1]
    assert batches[0].body == b"xxxx\nxxxx\nxxxx"
    assert [len(b.records) for b in pack(records, "Line", False, 14, "o")] == [1] * 10
    with pytest.raises(TransformError, match="o record 2 has 9 bytes, over MaxPayloadInMB"):
        pack([Record(1, b"a"), Record(2, b"b" * 9)], "Line", True, 8, "o")

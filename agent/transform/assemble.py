"""Records in, ``<key>.out`` bytes out: ``InputFilter`` before sending,
``JoinSource``/``OutputFilter``/``AssembleWith`` after.

As SageMaker does it: a CSV record is an array of its columns, a JSON (or JSON Lines) record the
value on
its line. ``JoinSource: Input`` appends each record's output to its input: to the columns of a CSV
row, or
as ``SageMakerOutput`` of a JSON object (a JSON record that is not an object becomes
``{"SageMakerInput": ..., "SageMakerOutput": ...}``). Joining or an output filter needs one output
per
record: a response to a MultiRecord request must then hold one line per record (CSV, JSON Lines) or
a JSON
array with one element per record. ``AssembleWith: Line`` ends each response (each joined record)
with a
newline; ``None`` concatenates them as they came.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from agent.errors import TransformError
from agent.transform.jsonpath import JsonPathError, compile_path
from agent.transform.split import Record

__all__ = ["Assembler", "record_format"]

_JSON_TYPES = (
    "application/json",
    "application/jsonlines",
    "application/x-jsonlines",
    "application/jsonl",
)


def record_format(content_type: str | None) -> str | None:
    """``csv``, ``json`` or None (opaque bytes) for a media type."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "text/csv":
        return "csv"
    if kind in _JSON_TYPES:
        return "json"
    return None


class Assembler:
    """Per job: filters records on the way in and builds each object's output from its responses."""

    def __init__(
        self,
        *,
        content_type: str | None,
        accept: str | None,
        input_filter: str,
        output_filter: str,
        join_source: str,
        assemble_with: str,
    ) -> None:
        self.input_format = record_format(content_type)
        self._input_path = compile_path(input_filter)
        self._output_path = compile_path(output_filter)
        self._join = join_source == "Input"
        self._line = assemble_with == "Line"
        self._accept = accept
        if self.input_format is None and not (
            self._input_path.is_root and self._output_path.is_root and not self._join
        ):
            raise TransformError(
                f"InputFilter, OutputFilter and JoinSource need CSV or JSON records; ContentType "
                f"is {content_type!r}; set ContentType to text/csv, application/json or "
                "application/jsonlines, or drop the filters"
            )

    @property
    def per_record(self) -> bool:
        """True when each record's own output must be found in the responses."""
        return self._join or not self._output_path.is_root

    def filter_input(self, record: Record, what: str) -> Record:
        """The record after ``InputFilter`` (the same record for ``$``)."""
        if self._input_path.is_root:
            return record
        value = self._parse(record.data, self.input_format, what, record.number)
        try:
            selected = self._input_path.apply(value)
        except JsonPathError as err:
            raise TransformError(f"{what} record {record.number}: InputFilter {err}") from None
        return Record(record.number, self._dump(selected, self.input_format))

    def assemble(
        self, responses: Sequence[tuple[Sequence[Record], bytes, str]], what: str
    ) -> bytes:
        """The object's output from (original records, response body, response Content-Type), in
        order."""
        if not self.per_record:
            parts = []
            for _, body, _ in responses:
                parts.append(body)
                if self._line and not body.endswith(b"\n"):
                    parts.append(b"\n")
            return b"".join(parts)
        out = []
        for records, body, out_type in responses:
            outputs = self._split_outputs(body, out_type, len(records), what, records[0].number)
            for record, output in zip(records, outputs, strict=False):
                out.append(self._finish(record, output, out_type, what))
                if self._line:
                    out.append(b"\n")
        return b"".join(out)

    # --- per record ------------------------------------------------------------------------------
    def _split_outputs(
        self, body: bytes, out_type: str, count: int, what: str, first: int
    ) -> list[Any]:
        fmt = record_format(out_type) or record_format(self._accept)
        if fmt is None:
            raise TransformError(
                f"{what}: JoinSource/OutputFilter need CSV or JSON responses; the server answered "
                f"{out_type!r}; set TransformOutput.Accept to text/csv or application/json"
            )
        text = body.decode("utf-8", errors="replace")
        lines = (
            [line.rstrip("\r") for line in text.rstrip("\n").split("\n")] if text.strip() else []
        )
        if fmt == "json" and count > 1 and len(lines) != count:
            try:
                whole = json.loads(text)
            except ValueError:
                whole = None
            if isinstance(whole, list) and len(whole) == count:
                return whole
        elif fmt == "json" and count == 1:
            return [self._parse(body, "json", what, first)]
        if len(lines) != count:
            raise TransformError(
                f"{what}: a response to records {first}..{first + count - 1} holds {len(lines)} "
                f"outputs for {count} records, so they cannot be joined; answer one line (or one "
                "array element) per record, or use BatchStrategy SingleRecord"
            )
        return [self._parse(line.encode(), fmt, what, first + i) for i, line in enumerate(lines)]

    def _finish(self, record: Record, output: Any, out_type: str, what: str) -> bytes:
        fmt = (
            self.input_format
            if self._join
            else (record_format(out_type) or record_format(self._accept) or "json")
        )
        if self._join:
            value = self._parse(record.data, self.input_format, what, record.number)
            if self.input_format == "csv":
                joined: Any = list(value) + (list(output) if isinstance(output, list) else [output])
            elif isinstance(value, dict):
                joined = dict(value, SageMakerOutput=output)
            else:
                joined = {"SageMakerInput": value, "SageMakerOutput": output}
        else:
            joined = output
        try:
            selected = self._output_path.apply(joined)
        except JsonPathError as err:
            raise TransformError(f"{what} record {record.number}: OutputFilter {err}") from None
        return self._dump(selected, fmt or "json")

    @staticmethod
    def _parse(data: bytes, fmt: str | None, what: str, number: int) -> Any:
        try:
            text = data.decode("utf-8")
            if fmt == "csv":
                rows = list(csv.reader(io.StringIO(text)))
                return rows[0] if rows else []
            return json.loads(text)
        except (UnicodeDecodeError, ValueError, csv.Error) as err:
            raise TransformError(
                f"{what} record {number} is not {fmt} ({err}); fix the record or ContentType"
            ) from None

    @staticmethod
    def _dump(value: Any, fmt: str | None) -> bytes:
        if fmt == "csv":
            row = value if isinstance(value, list) else [value]
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(
                [v if isinstance(v, str) else json.dumps(v) for v in row]
            )
            return buf.getvalue().encode("utf-8")
        return json.dumps(value).encode("utf-8")

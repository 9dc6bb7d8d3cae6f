"""SageMaker-style metric definitions: a name and a regex whose first capture group is the value.

:class:`MetricMatcher` runs every definition over blocks of complete log lines and
returns numeric points. Values are parsed leniently (``1``, ``-2.5``, ``1e-3``,
``.5``, ``nan``, ``inf``, ``-Infinity``, and a number followed by junk such as
``0.25,``); a capture that holds no number is reported once per definition, as is
a regex with no capture group (at construction) and one that never matched (by
:meth:`MetricMatcher.never_matched`, at close). The regexes were compiled when the job was
read (a :class:`~agent.job.MetricDefinition` holds its compiled ``pattern``); the JSON form
(``parse_definitions``) is read by agent.job.spec.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.job.shapes import MetricDefinition
from agent.job.spec import parse_definitions

__all__ = ["MetricMatcher", "MetricPoint", "parse_definitions", "parse_number"]

_NUMBER = re.compile(
    r"\s*([+-]?(?:(?:\d+(?:_\d+)*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf(?:inity)?))",
    re.IGNORECASE,
)


def parse_number(text: str) -> float | None:
    """The number at the start of ``text`` (ints, floats, exponents, nan, inf), or None if there is
    none."""
    try:
        return float(text)
    except ValueError:
        pass
    match = _NUMBER.match(text)
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


@dataclass(frozen=True)
class MetricPoint:
    """One value of a metric, stamped with wall time (seconds since the epoch), host and global
    rank."""

    name: str
    value: float
    time: float
    host: str
    rank: int

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe dict; non-finite values are the strings ``nan``, ``inf`` and ``-inf``."""
        value: object = self.value
        if not math.isfinite(self.value):
            value = "nan" if math.isnan(self.value) else ("inf" if self.value > 0 else "-inf")
        return {
            "time": round(self.time, 6),
            "name": self.name,
            "value": value,
            "host": self.host,
            "rank": self.rank,
        }


class MetricMatcher:
    """Compiled metric definitions, applied to text; warns through ``log`` about bad definitions."""

    def __init__(self, definitions: Sequence[MetricDefinition], *, log: logging.Logger) -> None:
        self._log = log
        self._defs: list[tuple[str, re.Pattern[str]]] = []
        self._matched: set[str] = set()
        self._warned_value: set[str] = set()
        for definition in definitions:
            pattern = definition.pattern
            if pattern.groups == 0:
                log.warning(
                    "metric %r: regex %r has no capture group, so it can never give a value; "
                    "put the number in parentheses, e.g. 'loss=(\\S+)'",
                    definition.name,
                    definition.regex,
                )
                continue
            self._defs.append((definition.name, pattern))

    def __bool__(self) -> bool:
        return bool(self._defs)

    def scan(self, text: str, *, time: float, host: str, rank: int) -> list[MetricPoint]:
        """Every match in ``text`` (complete lines), as points; a match never spans two lines."""
        points: list[MetricPoint] = []
        for name, pattern in self._defs:
            for match in pattern.finditer(text):
                raw = match.group(1)
                if "\n" in match.group(0):
                    raw = self._within_line(pattern, text, match.start())
                if raw is None:
                    continue
                value = parse_number(raw)
                if value is None:
                    if name not in self._warned_value:
                        self._warned_value.add(name)
                        self._log.warning(
                            "metric %r: captured %r, which is not a number; the value is skipped "
                            "(metrics are numbers only)",
                            name,
                            raw[:80],
                        )
                    continue
                self._matched.add(name)
                points.append(MetricPoint(name, value, time, host, rank))
        return points

    def never_matched(self) -> list[str]:
        """Names of definitions that have not produced a single value yet."""
        return [name for name, _ in self._defs if name not in self._matched]

    def warn_never_matched(self) -> None:
        """Log one warning per definition that never produced a value (call at close)."""
        for name in self.never_matched():
            regex = next(p.pattern for n, p in self._defs if n == name)
            self._log.warning(
                "metric %r: regex %r never matched a log line with a number; check it against "
                "the job log",
                name,
                regex,
            )

    @staticmethod
    def _within_line(pattern: re.Pattern[str], text: str, start: int) -> str | None:
        line_end = text.find("\n", start)
        line = text[start : line_end if line_end >= 0 else len(text)]
        match = pattern.search(line)
        return match.group(1) if match else None

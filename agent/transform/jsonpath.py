"""The JSONPath subset SageMaker batch transform documents for ``InputFilter`` and ``OutputFilter``.

    $                 the whole record
    $.name  $['name'] a key of an object (``$.features``)
    $['a','b']        an object holding only these keys (``$['id','SageMakerOutput']``)
    $[2]              one element of an array (a CSV row is an array of its columns)
    $[1:]  $[:-1]     a slice (Python's rules; ``$[1:]`` drops the first column)
    $[0,5:]           several indexes and slices, in order (``$[0,2]``: columns 0 and 2)
    $[*]  $.*         everything at this level

Steps chain (``$.features[1:]``). An index outside the array or a missing key is an error, as in
SageMaker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonPath", "JsonPathError", "compile_path"]


class JsonPathError(ValueError):
    """An expression outside the subset, or a record it cannot be applied to."""


@dataclass(frozen=True)
class _Slice:
    start: int | None
    stop: int | None


_Selector = int | str | _Slice | None  # None: '*'
_NAME = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*|\*)")
_INT = re.compile(r"-?\d+$")


@dataclass(frozen=True)
class JsonPath:
    """A compiled expression; ``apply(record)`` returns the selected part."""

    text: str
    steps: tuple[tuple[_Selector, ...], ...]

    @property
    def is_root(self) -> bool:
        return not self.steps

    def apply(self, record: Any) -> Any:
        value = record
        for step in self.steps:
            value = _apply_step(value, step, self.text)
        return value


def compile_path(text: str) -> JsonPath:
    """Parse ``text``; raises JsonPathError naming the part that is not understood."""
    text = text.strip()
    if not text.startswith("$"):
        raise JsonPathError("a path starts with '$' (examples: $, $[1:], $.features, $[0,2])")
    steps: list[tuple[_Selector, ...]] = []
    pos = 1
    while pos < len(text):
        match = _NAME.match(text, pos)
        if match:
            name = match.group(1)
            steps.append((None,) if name == "*" else (name,))
            pos = match.end()
            continue
        if text[pos] == "[":
            end = _closing(text, pos)
            steps.append(
                tuple(
                    _selector(part.strip(), text)
                    for part in _split_commas(text[pos + 1 : end], text)
                )
            )
            pos = end + 1
            continue
        raise JsonPathError(
            f"cannot read {text[pos:]!r}; use .name, ['name'], [n], [a:b] or [n,a:b]"
        )
    return JsonPath(text, tuple(steps))


def _closing(text: str, start: int) -> int:
    quote = None
    for i in range(start + 1, len(text)):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "]":
            return i
    raise JsonPathError(f"{text!r} has a '[' without its ']'")


def _split_commas(inner: str, text: str) -> list[str]:
    parts, current, quote = [], "", None
    for ch in inner:
        if quote:
            current += ch
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current += ch
        elif ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if any(not part.strip() for part in parts):
        raise JsonPathError(f"{text!r} has an empty selector between brackets or commas")
    return parts


def _selector(part: str, text: str) -> _Selector:
    if part == "*":
        return None
    if len(part) >= 2 and part[0] == part[-1] and part[0] in "'\"":
        return part[1:-1]
    if _INT.match(part):
        return int(part)
    if ":" in part:
        bits = part.split(":")
        if len(bits) != 2 or not all(not b.strip() or _INT.match(b.strip()) for b in bits):
            raise JsonPathError(
                f"slice {part!r} in {text!r} is not start:stop (steps are not supported)"
            )
        return _Slice(*(int(b) if b.strip() else None for b in bits))
    raise JsonPathError(
        f"selector {part!r} in {text!r} is not an index, a slice, '*' or a quoted name"
    )


def _apply_step(value: Any, step: tuple[_Selector, ...], text: str) -> Any:
    if len(step) == 1 and not isinstance(step[0], _Slice) and step[0] is not None:
        return _one(value, step[0], text)
    if isinstance(value, dict):
        if any(isinstance(s, (int, _Slice)) for s in step):
            raise JsonPathError(
                f"{text}: indexes and slices select from arrays; the record here is an object"
            )
        if None in step:
            return dict(value)
        names = [name for name in step if isinstance(name, str)]  # ints and slices refused above
        return {name: _one(value, name, text) for name in names}
    if isinstance(value, list):
        out: list[Any] = []
        for selector in step:
            if selector is None:
                out.extend(value)
            elif isinstance(selector, _Slice):
                out.extend(value[selector.start : selector.stop])
            elif isinstance(selector, int):
                out.append(_one(value, selector, text))
            else:
                raise JsonPathError(
                    f"{text}: name {selector!r} selects from objects; the record here is an array"
                )
        return out
    raise JsonPathError(f"{text}: cannot select from {type(value).__name__} {str(value)[:40]!r}")


def _one(value: Any, selector: int | str, text: str) -> Any:
    if isinstance(selector, int):
        if not isinstance(value, list):
            raise JsonPathError(
                f"{text}: index [{selector}] needs an array, the record here is "
                f"{type(value).__name__}"
            )
        if not -len(value) <= selector < len(value):
            raise JsonPathError(
                f"{text}: index [{selector}] is outside the record's {len(value)} elements"
            )
        return value[selector]
    if not isinstance(value, dict):
        raise JsonPathError(
            f"{text}: key {selector!r} needs an object, the record here is {type(value).__name__}"
        )
    if selector not in value:
        raise JsonPathError(
            f"{text}: the record has no key {selector!r} (keys: {', '.join(map(str, value))[:80]})"
        )
    return value[selector]

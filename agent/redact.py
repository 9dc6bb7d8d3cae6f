"""Masking secrets in what the agent writes: log lines, the failure file, captured output, argv
shown in logs.

A :class:`Redactor` knows which names look secret (the ``TORCHBAY_SECRET_NAMES`` pattern, searched
in the name lower-cased with camelCase, ``-`` and ``.`` turned into ``_``) and the secret values it
has learnt (hyperparameters and environment variables with such names, and the password of any
``scheme://user:password@host`` URL among their values). :meth:`Redactor.text` replaces every known
value of at least :data:`MIN_SECRET_LENGTH` characters with ``****`` and hides URL passwords;
:meth:`Redactor.argv` masks the value after a secret-named ``--flag`` whatever its length. The
user's process still gets every argument and variable unchanged: only what is written is masked.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_SECRET_NAMES",
    "MASK",
    "MIN_SECRET_LENGTH",
    "RedactingFilter",
    "Redactor",
    "looks_secret",
    "normalize_name",
    "redact_urls",
]

MASK = "****"
MIN_SECRET_LENGTH = (
    4  # shorter values are masked only where their name shows (argv), never as substrings
)
DEFAULT_SECRET_NAMES = (
    r"password|passwd|passphrase|secret|credential|api_?key|private_?key"
    r"|(^|_)(token|auth|cookie)(_|$)|(^|_)key$"
)
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
# Both start with a literal "://", so a long value without one is scanned once (no quadratic
# backtracking).
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)([^/\s@]+)(@)")
_URL_USERINFO = re.compile(r"(://)([^/\s@]+)(@)")


def normalize_name(name: str) -> str:
    """``apiToken`` -> ``api_token``, ``SM_HP_API-TOKEN`` -> ``sm_hp_api_token``: the form the
    pattern sees."""
    return re.sub(r"[-.\s]+", "_", _CAMEL.sub(r"\1_\2", str(name))).lower()


def looks_secret(name: str, pattern: str = DEFAULT_SECRET_NAMES) -> bool:
    """Whether ``name`` (a hyperparameter, variable or JSON field name) looks like it holds a
    secret."""
    return re.search(pattern, normalize_name(name)) is not None


def redact_urls(text: str) -> str:
    """Hide the user-info of URLs (``s3://key:secret@host`` -> ``s3://***@host``)."""
    return _URL_USERINFO.sub(r"\1***\3", text)


class Redactor:
    """Secret names and values, learnt once at start; masks text. Safe to share between threads."""

    def __init__(self, pattern: str = DEFAULT_SECRET_NAMES) -> None:
        self._pattern = re.compile(pattern)
        self._values: tuple[str, ...] = ()
        self._bytes: tuple[tuple[bytes, bytes], ...] = ()
        self._lock = threading.Lock()

    def set_pattern(self, pattern: str) -> None:
        """Use another name pattern (the job's ``TORCHBAY_SECRET_NAMES``) from now on."""
        self._pattern = re.compile(pattern)

    def is_secret(self, name: str) -> bool:
        return self._pattern.search(normalize_name(name)) is not None

    def learn(self, named: Mapping[str, Any]) -> int:
        """Remember the values of secret-looking names in ``named`` (and URL passwords in any
        value); returns how many values are known now."""
        found: list[str] = []
        for name, value in named.items():
            texts = _forms(value)
            if self.is_secret(name):
                found.extend(texts)
            for text in texts:
                if "://" in text:
                    found.extend(m.group(2) for m in _URL_PASSWORD.finditer(text))
        self.add(found)
        return len(self._values)

    def add(self, values: Iterable[str]) -> None:
        """Remember these literal values as secrets (too-short ones are ignored)."""
        with self._lock:
            known = set(self._values)
            known.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH)
            self._values = tuple(
                sorted(known, key=len, reverse=True)
            )  # longest first: no partial leftovers
            self._bytes = tuple((v.encode("utf-8", "replace"), MASK.encode()) for v in self._values)

    @property
    def active(self) -> bool:
        """Whether any secret value is known (else :meth:`data` is the identity)."""
        return bool(self._values)

    def text(self, text: str) -> str:
        """``text`` with every known secret value and URL password masked."""
        if "@" in text and "://" in text:
            text = redact_urls(text)
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def data(self, block: bytes) -> bytes:
        """The byte form of :meth:`text` for captured output (no URL rewriting: the script's bytes
        stay)."""
        for value, mask in self._bytes:
            if value in block:
                block = block.replace(value, mask)
        return block

    def argv(self, argv: Sequence[str]) -> list[str]:
        """A copy of ``argv`` for logging: values after secret-named flags (``--password x``,
        ``--api-token=x``) masked, then :meth:`text` applied to every word."""
        out: list[str] = []
        hide_next = False
        for word in argv:
            if hide_next:
                out.append(MASK)
                hide_next = False
                continue
            if word.startswith("-") and len(word) > 1:
                name, eq, _value = word.lstrip("-").partition("=")
                if self.is_secret(name):
                    if eq:
                        out.append(word.split("=", 1)[0] + "=" + MASK)
                        continue
                    hide_next = True
            out.append(self.text(word))
        return out


def _forms(value: Any) -> list[str]:
    """The spellings a value takes where it is written: raw, ``str()`` of the JSON-decoded value
    (argv), and its JSON encoding (SM_HPS, SM_TRAINING_ENV)."""
    if value is None:
        return []
    forms = [value] if isinstance(value, str) else [str(value)]
    decoded = value
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = value
    if not isinstance(decoded, str):
        forms.append(str(decoded))
    encoded = json.dumps(decoded)
    forms.append(encoded[1:-1] if isinstance(decoded, str) else encoded)
    if isinstance(decoded, dict):  # argv spells a dict k1=v1,k2=v2
        forms.extend(str(v) for v in decoded.values())
    return list(dict.fromkeys(f for f in forms if f))


class RedactingFilter(logging.Filter):
    """A handler filter: masks secrets in each record (message, arguments and traceback) and caps
    its length."""

    def __init__(self, redactor: Redactor, max_chars: int | None = 16384) -> None:
        super().__init__()
        self.redactor = redactor
        self.max_chars = max_chars

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.redactor.text(record.getMessage())
        if self.max_chars is not None and len(message) > self.max_chars:
            cut = len(message) - self.max_chars
            message = f"{message[: self.max_chars]} [... {cut} more characters cut]"
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.text(record.exc_text)
        return True

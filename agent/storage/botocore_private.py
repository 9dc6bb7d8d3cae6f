"""The only place that reads botocore's private attributes (for the lean GET, agent.storage.lean).

The lean GET signs requests itself with the credentials a boto3 client signs with and opens TLS
connections that verify as that client does. botocore exposes neither publicly, so they are read
here from ``client._request_signer._credentials`` and ``client._endpoint.http_session._verify``.
:func:`check_client` says what is missing; tests/test_storage.py calls it on a real client, so a
botocore release that renames them fails that test with this module named, and at run time the lean
path is simply off (staging falls back to boto3, with one warning).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["check_client", "signing_credentials", "tls_verify"]

_log = logging.getLogger("torchbay.storage")
_warned: set[str] = set()
_MISSING = object()


def _read(client: Any, *names: str) -> Any:
    value = client
    for name in names:
        value = getattr(value, name, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def check_client(client: Any) -> list[str]:
    """The private attributes this module reads that ``client`` lacks (empty when all are there)."""
    missing = []
    signer = _read(client, "_request_signer")
    if signer is _MISSING or not hasattr(signer, "_credentials"):
        missing.append("client._request_signer._credentials")
    if _read(client, "_endpoint", "http_session", "_verify") is _MISSING:
        missing.append("client._endpoint.http_session._verify")
    return missing


def _changed(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        _log.warning(
            "botocore no longer has %s (agent/storage/botocore_private.py reads it); the lean GET "
            "is off and every GET goes through boto3",
            what,
        )


def signing_credentials(client: Any) -> Any:
    """The botocore Credentials ``client`` signs with, or None (unsigned, or botocore changed)."""
    signer = _read(client, "_request_signer")
    if signer is _MISSING or not hasattr(signer, "_credentials"):
        _changed("client._request_signer._credentials")
        return None
    return signer._credentials


def tls_verify(client: Any) -> bool | str | None:
    """How ``client`` verifies TLS: False (not at all), a CA bundle path, True (the default), or
    None when botocore changed where it keeps that."""
    verify = _read(client, "_endpoint", "http_session", "_verify")
    if verify is _MISSING:
        _changed("client._endpoint.http_session._verify")
        return None
    if verify is False or isinstance(verify, str):
        return verify
    return True

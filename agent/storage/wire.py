"""What the lean path (agent.storage.lean) puts on and reads off the wire: SigV4 signatures and
the ListObjectsV2 XML."""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import hmac
import urllib.parse
from xml.etree import ElementTree

__all__ = [
    "EMPTY_SHA256",
    "EnvCredentials",
    "ListPage",
    "http_date",
    "parse_list",
    "quote",
    "sign_get",
    "sign_request",
]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def sign_get(
    host: str,
    path: str,
    region: str,
    access_key: str,
    secret_key: str,
    token: str | None,
    amz_date: str,
    key_cache: dict[tuple[str, str, str], bytes] | None = None,
) -> dict[str, str]:
    """SigV4 headers for ``GET path`` (``path`` already URI-encoded, no query) with an empty
    payload, asking for the object's checksum."""
    return sign_request(
        "GET",
        host,
        path,
        "",
        region,
        (access_key, secret_key, token),
        amz_date,
        EMPTY_SHA256,
        {"x-amz-checksum-mode": "ENABLED"},
        key_cache,
    )


def sign_request(
    method: str,
    host: str,
    path: str,
    query: str,
    region: str,
    credentials: tuple[str, str, str | None],
    amz_date: str,
    payload: str,
    extra: dict[str, str],
    key_cache: dict[tuple[str, str, str], bytes] | None = None,
) -> dict[str, str]:
    """SigV4 headers for ``method path?query`` (both already URI-encoded, the query in canonical
    order) with a payload whose SHA-256 is ``payload``; ``extra`` headers are signed too."""
    access_key, secret_key, token = credentials
    datestamp = amz_date[:8]
    signing_key = key_cache.get((secret_key, datestamp, region)) if key_cache is not None else None
    if signing_key is None:
        signing_key = ("AWS4" + secret_key).encode()
        for part in (datestamp, region, "s3", "aws4_request"):
            signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
        if key_cache is not None:
            if len(key_cache) > 16:
                key_cache.clear()
            key_cache[(secret_key, datestamp, region)] = signing_key
    headers = {
        "host": host,
        "x-amz-content-sha256": payload,
        "x-amz-date": amz_date,
        **{name.lower(): value for name, value in extra.items()},
    }
    if token:
        headers["x-amz-security-token"] = token
    names = sorted(headers)
    signed = ";".join(names)
    canonical = (
        f"{method}\n{path}\n{query}\n"
        + "".join(f"{n}:{headers[n].strip()}\n" for n in names)
        + "\n"
        + signed
        + "\n"
        + payload
    )
    scope = f"{datestamp}/{region}/s3/aws4_request"
    to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    )
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
        f"Signature={signature}"
    )
    return headers


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


class EnvCredentials:
    """Credentials from the environment, shaped like botocore's frozen ones."""

    __slots__ = ("access_key", "secret_key", "token")

    def __init__(self, access_key: str, secret_key: str, token: str | None) -> None:
        self.access_key, self.secret_key, self.token = access_key, secret_key, token

    def get_frozen_credentials(self) -> EnvCredentials:
        return self


class ListPage:
    """One ListObjectsV2 page: ``items`` are (key, size, etag, mtime); ``token`` continues it."""

    __slots__ = ("items", "token")

    def __init__(
        self, items: list[tuple[str, int, str | None, float | None]], token: str | None
    ) -> None:
        self.items, self.token = items, token


_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def parse_list(raw: bytes) -> ListPage | None:
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError:
        return None
    ns = _NS if root.tag.startswith(_NS) else ""
    if root.tag != ns + "ListBucketResult":
        return None
    encoded = (root.findtext(ns + "EncodingType") or "") == "url"
    items = []
    for item in root.iterfind(ns + "Contents"):
        key = item.findtext(ns + "Key")
        size = item.findtext(ns + "Size")
        if key is None or size is None:
            return None
        etag = (item.findtext(ns + "ETag") or "").strip('"') or None
        items.append(
            (
                urllib.parse.unquote_plus(key) if encoded else key,
                int(size),
                etag,
                _iso_date(item.findtext(ns + "LastModified")),
            )
        )
    truncated = (root.findtext(ns + "IsTruncated") or "false").lower() == "true"
    token = root.findtext(ns + "NextContinuationToken") if truncated else None
    if truncated and not token:
        return None
    return ListPage(items, token)


def _iso_date(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def http_date(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None

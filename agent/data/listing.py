"""What a channel holds: one listing of an ``S3Prefix`` or a ``ManifestFile``, and this host's share
of it.

Each object becomes an :class:`Entry` whose ``relative`` path is where it lands under the channel
folder. Paths are relative to the prefix when the prefix names a folder (``s3://b/train/`` or
``s3://b/train`` with keys ``train/...``); a prefix that only matches the start of names
(``s3://b/tr`` matching ``train/x``) keeps the names relative to the prefix's parent folder.

Sharding (``ShardedByS3Key``): the full keys are sorted and host *i* of *n* takes every key whose
index in that order is ``i`` modulo ``n``. ``FullyReplicated``: every host takes every key.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.errors import ChannelError, StorageError
from agent.storage import Storage, parse_uri

__all__ = [
    "SKEW_WARN_RATIO",
    "Entry",
    "list_channel",
    "list_manifest",
    "list_prefix",
    "select_shard",
]

SKEW_WARN_RATIO = 2.0  # warn when the largest shard holds this many times the bytes of the smallest


@dataclass(frozen=True)
class Entry:
    """One object to fetch: its URI, its path under the channel folder, and what the listing said of
    it."""

    uri: str
    relative: str
    size: int | None = (
        None  # None when no listing gave it (manifest keys); the GET's Content-Length is used
    )
    etag: str | None = None


def _relative(key: str, prefix: str) -> str:
    if key == prefix:
        return posixpath.basename(key) or key
    if not prefix or prefix.endswith("/"):
        return key[len(prefix) :]
    if key.startswith(prefix + "/"):
        return key[len(prefix) + 1 :]
    parent = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    return key[len(parent) :]


def list_prefix(
    storage: Storage, uri: str, *, abandoned: threading.Event | None = None
) -> list[Entry]:
    """Every object under ``uri`` from one paginated listing (sizes and ETags from the listing, no
    HEADs). ``abandoned`` set: the listing stops at the next object or failed page request, with
    what it had."""
    loc = parse_uri(uri)
    entries = []
    for info in storage.list(uri, cancel=abandoned):
        entries.append(Entry(info.uri, _relative(info.key, loc.key), info.size, info.etag))
        if abandoned is not None and abandoned.is_set():
            break
    return entries


def list_manifest(storage: Storage, uri: str, *, channel: str = "?") -> list[Entry]:
    """The objects a manifest names: a JSON array ``[{"prefix": "s3://b/p/"}, "rel/key1", ...]``, in
    its order."""
    try:
        raw = storage.get_bytes(uri)
    except StorageError as err:
        raise ChannelError(f"channel {channel!r}: cannot read manifest {uri}: {err}") from err
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise ChannelError(
            f"channel {channel!r}: manifest {uri} is not JSON ({err}); "
            'write it as [{"prefix": "s3://bucket/p/"}, "key1", ...]'
        ) from err
    if (
        not isinstance(doc, list)
        or not doc
        or not isinstance(doc[0], dict)
        or "prefix" not in doc[0]
    ):
        raise ChannelError(
            f"channel {channel!r}: manifest {uri} must be a JSON array whose first element is "
            '{"prefix": "s3://bucket/p/"}; got ' + repr(raw[:80])
        )
    prefix = str(doc[0]["prefix"])
    try:
        base = parse_uri(prefix)
    except StorageError as err:
        raise ChannelError(f"channel {channel!r}: manifest {uri} has a bad prefix: {err}") from err
    if base.scheme != parse_uri(uri).scheme:
        raise ChannelError(
            f"channel {channel!r}: manifest {uri} names prefix {prefix} in another store; "
            "keep the manifest and the data in the same store"
        )
    entries = []
    for item in doc[1:]:
        if not isinstance(item, str) or not item:
            raise ChannelError(
                f"channel {channel!r}: manifest {uri} has entry {item!r}; entries must be key "
                "strings"
            )
        if base.scheme == "s3":
            full_uri = f"s3://{base.bucket}/{base.key}{item}"
        else:
            full_uri = "file://" + base.key + item
        entries.append(Entry(full_uri, item))
    return entries


def list_channel(
    storage: Storage,
    uri: str,
    s3_data_type: str,
    *,
    channel: str,
    abandoned: threading.Event | None = None,
) -> list[Entry]:
    """The channel's objects; raises ChannelError when there are none or the data type is
    unsupported. ``abandoned``: see :func:`list_prefix` (the caller checks it)."""
    if s3_data_type == "S3Prefix":
        entries = list_prefix(storage, uri, abandoned=abandoned)
    elif s3_data_type == "ManifestFile":
        entries = list_manifest(storage, uri, channel=channel)
    else:
        raise ChannelError(
            f"channel {channel!r}: S3DataType {s3_data_type!r} is not supported; "
            "use S3Prefix or ManifestFile"
        )
    if not entries:
        raise ChannelError(
            f"channel {channel!r}: {uri} matched no objects; check the prefix and the endpoint"
        )
    return entries


def select_shard(
    entries: Sequence[Entry],
    distribution: str,
    host_index: int,
    host_count: int,
    *,
    channel: str = "?",
    log: logging.Logger | None = None,
) -> list[Entry]:
    """This host's entries: all of them (``FullyReplicated``) or every key whose sorted index is
    ``host_index`` mod ``host_count`` (``ShardedByS3Key``), kept in the listing's order."""
    if distribution == "FullyReplicated" or host_count <= 1:
        return list(entries)
    if distribution != "ShardedByS3Key":
        raise ChannelError(
            f"channel {channel!r}: S3DataDistributionType {distribution!r} is unknown; "
            "use FullyReplicated or ShardedByS3Key"
        )
    if not 0 <= host_index < host_count:
        raise ChannelError(
            f"channel {channel!r}: host index {host_index} is outside 0..{host_count - 1}"
        )
    order = sorted(range(len(entries)), key=lambda i: entries[i].uri)
    shards: list[list[int]] = [[] for _ in range(host_count)]
    for rank, index in enumerate(order):
        shards[rank % host_count].append(index)
    if log is not None:
        _warn_about_shards(entries, shards, host_count, channel, log)
    mine = sorted(shards[host_index])
    return [entries[i] for i in mine]


def _warn_about_shards(
    entries: Sequence[Entry],
    shards: Iterable[list[int]],
    host_count: int,
    channel: str,
    log: logging.Logger,
) -> None:
    if host_count > len(entries):
        log.warning(
            "channel %r: %d hosts share %d objects with ShardedByS3Key, so %d host(s) get nothing; "
            "use fewer hosts or split the data into more objects",
            channel,
            host_count,
            len(entries),
            host_count - len(entries),
        )
        return
    if any(entry.size is None for entry in entries):
        return
    sizes = [sum(entries[i].size or 0 for i in shard) for shard in shards]
    small, large = min(sizes), max(sizes)
    if large > 0 and (small == 0 or large / small >= SKEW_WARN_RATIO):
        log.warning(
            "channel %r: ShardedByS3Key shards are uneven: %d to %d bytes per host (ratio %.1f); "
            "objects are never split, so make them similar in size",
            channel,
            small,
            large,
            large / small if small else float("inf"),
        )

"""Listing rules: paths relative to the prefix, the sharding rule and its warnings."""

from __future__ import annotations

import logging

import pytest

from agent.data.listing import Entry, _relative, select_shard
from agent.errors import ChannelError

LOG = logging.getLogger("test.data.listing")


def test_relative_paths():
    assert _relative("train/a/b.txt", "train/") == "a/b.txt"
    assert _relative("train/a/b.txt", "train") == "a/b.txt"
    assert _relative("data/trainX/b", "data/train") == "trainX/b"
    assert _relative("one/file.csv", "one/file.csv") == "file.csv"
    assert _relative("k", "") == "k"


def _entries(sizes):
    return [Entry(f"s3://b/k{i:03d}", f"k{i:03d}", size) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("hosts", [1, 2, 3, 5])
def test_shards_cover_everything_once_and_follow_the_rule(hosts):
    entries = _entries([10] * 17)[::-1]  # listing order must not matter
    shards = [select_shard(entries, "ShardedByS3Key", i, hosts) for i in range(hosts)]
    everything = sorted(e.uri for shard in shards for e in shard)
    assert everything == sorted(e.uri for e in entries)
    ordered = sorted(e.uri for e in entries)
    for i, shard in enumerate(shards):
        assert {e.uri for e in shard} == {uri for n, uri in enumerate(ordered) if n % hosts == i}


def test_more_hosts_than_objects_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert select_shard(_entries([1, 1]), "ShardedByS3Key", 2, 3, channel="c", log=LOG) == []
    assert "3 hosts share 2 objects" in caplog.text


def test_uneven_shards_warn(caplog):
    with caplog.at_level(logging.WARNING):
        select_shard(_entries([1000, 1, 1000, 1]), "ShardedByS3Key", 0, 2, channel="c", log=LOG)
    assert "uneven" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        select_shard(_entries([10, 11, 10, 11]), "ShardedByS3Key", 0, 2, channel="c", log=LOG)
    assert caplog.text == ""


def test_unknown_distribution():
    with pytest.raises(ChannelError, match="Sharded"):
        select_shard(_entries([1, 2]), "Sharded", 0, 2)

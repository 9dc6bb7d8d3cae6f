"""Streaming datasets over an ``s3://`` or ``file://`` prefix, for scripts that would rather not
stage.

``S3IterableDataset`` shards the sorted keys across ranks and DataLoader workers: reader *r* of *R*
(``r = rank * workers + worker_id``, ``R = world_size * workers``) takes every key whose index is
*r* mod
*R*, so each object is read exactly once per epoch. It fetches ``prefetch`` objects ahead in
parallel and
yields ``(key, bytes)`` in order, ``key`` being the object's path relative to the prefix (as File
mode
would stage it), or ``transform(key, bytes)``. ``S3MapDataset`` indexes the same listing for
samplers.
Every object's byte count (and MD5 where the ETag is one) is checked; short reads are retried.

This module imports torch; the agent itself never imports it.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.distributed as dist
import torch.utils.data

from agent.data.listing import Entry, list_prefix
from agent.data.reading import ObjectReader
from agent.errors import ChannelError

__all__ = ["S3IterableDataset", "S3MapDataset"]

Transform = Callable[[str, bytes], Any]


def _list(uri: str, reader: ObjectReader) -> list[Entry]:
    entries = sorted(list_prefix(reader.storage_for(uri), uri), key=lambda e: e.uri)
    if not entries:
        raise ChannelError(f"{uri} matched no objects; check the prefix and the endpoint")
    return entries


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (
            dist.get_world_size() if world_size is None else world_size
        )
    return rank or 0, world_size or 1


class S3IterableDataset(torch.utils.data.IterableDataset[Any]):  # items: the transform's
    """Every object under ``uri`` once per epoch, split across ranks and DataLoader workers.

    ``rank``/``world_size`` default to torch.distributed's when it is initialized, else 0 and 1.
    ``shuffle_seed`` shuffles the order (the same split, a new order per ``set_epoch``).
    """

    def __init__(
        self,
        uri: str,
        *,
        transform: Transform | None = None,
        endpoint_url: str | None = None,
        prefetch: int = 8,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_seed: int | None = None,
        attempts: int = 5,
        verify_md5: bool = True,
    ) -> None:
        super().__init__()
        self.uri = uri
        self._transform = transform
        self._endpoint_url = endpoint_url
        self._prefetch = max(1, prefetch)
        self._rank = rank
        self._world_size = world_size
        self._seed = shuffle_seed
        self._epoch = 0
        self._entries: list[Entry] | None = None
        self._reader = ObjectReader(
            endpoint_url=endpoint_url,
            attempts=attempts,
            verify_md5=verify_md5,
            max_pool_connections=self._prefetch + 2,
        )

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle order of the next pass (no effect without ``shuffle_seed``)."""
        self._epoch = epoch

    def _shard(self) -> list[Entry]:
        if self._entries is None:
            self._entries = _list(self.uri, self._reader)
        rank, world = _rank_and_world(self._rank, self._world_size)
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        readers, reader = world * workers, rank * workers + worker
        mine = self._entries[reader::readers]
        if self._seed is not None:
            mine = list(mine)
            random.Random(hash((self._seed, self._epoch, reader))).shuffle(mine)
        return mine

    def __iter__(self) -> Iterator[Any]:
        with ThreadPoolExecutor(self._prefetch, thread_name_prefix="s3dataset") as pool:
            ahead: deque[tuple[Entry, Future[bytes]]] = deque()
            upcoming = iter(self._shard())
            try:
                for entry in upcoming:
                    ahead.append((entry, pool.submit(self._reader.read, entry)))
                    if len(ahead) >= self._prefetch:
                        break
                while ahead:
                    entry, future = ahead.popleft()
                    following = next(upcoming, None)
                    if following is not None:
                        ahead.append((following, pool.submit(self._reader.read, following)))
                    yield self._item(entry, future.result())
            finally:
                for _, future in ahead:
                    future.cancel()

    def _item(self, entry: Entry, data: bytes) -> Any:
        key = entry.relative
        return self._transform(key, data) if self._transform is not None else (key, data)


class S3MapDataset(torch.utils.data.Dataset[Any]):  # items: the transform's
    """``dataset[i]`` is the i-th object (in key order) under ``uri``: ``(key, bytes)`` or
    ``transform(key, bytes)``.

    The prefix is listed once, on first use. Use a DistributedSampler to split it across ranks.
    """

    def __init__(
        self,
        uri: str,
        *,
        transform: Transform | None = None,
        endpoint_url: str | None = None,
        attempts: int = 5,
        verify_md5: bool = True,
    ) -> None:
        self.uri = uri
        self._transform = transform
        self._endpoint_url = endpoint_url
        self._entries: list[Entry] | None = None
        self._reader = ObjectReader(
            endpoint_url=endpoint_url, attempts=attempts, verify_md5=verify_md5
        )

    def _listing(self) -> list[Entry]:
        if self._entries is None:
            self._entries = _list(self.uri, self._reader)
        return self._entries

    def __len__(self) -> int:
        return len(self._listing())

    def __getitem__(self, index: int) -> Any:
        entry = self._listing()[index]
        data = self._reader.read(entry)
        return (
            self._transform(entry.relative, data)
            if self._transform is not None
            else (entry.relative, data)
        )

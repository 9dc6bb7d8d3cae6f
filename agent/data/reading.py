"""Reading whole objects into memory for Pipe mode and the datasets: agent.storage's verified read
(byte count against the listing and Content-Length, the full-object checksum or the MD5 of a plain
ETag), retried under the one retry policy (agent.storage.retry)."""

from __future__ import annotations

import threading
from typing import Any

from agent.data.listing import Entry
from agent.storage import JobStorage, ReadOptions, RetryPolicy, Storage, with_retries

__all__ = ["ObjectReader"]


class ObjectReader:
    """``read(entry)`` gives the object's bytes.

    ``storage`` is the job's storage (a JobStorage, shared with staging and the rest); without one
    a JobStorage is made on first use from ``endpoint_url``. A reader pickled into DataLoader
    workers leaves its storage behind and makes its own there (a client is not shared across
    processes). With ``lean`` (the default) GETs go through agent.storage.lean, boto3 for anything
    unusual.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        attempts: int = 5,
        backoff: float = 0.5,
        verify_md5: bool = True,
        max_pool_connections: int = 16,
        lean: bool = True,
        storage: JobStorage | None = None,
    ) -> None:
        self._endpoint_url = endpoint_url
        self._policy = RetryPolicy(attempts=max(1, attempts), backoff=backoff)
        self._options = ReadOptions(lean=lean, verify_md5=verify_md5)
        self._pool = max_pool_connections
        self._storage = storage
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_storage"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def storage_for(self, uri: str) -> Storage:
        """The storage this reader reads ``uri`` with (made on first use)."""
        with self._lock:
            if self._storage is None:
                self._storage = JobStorage(self._endpoint_url, pool=self._pool)
            return self._storage.for_uri(uri)

    def read(self, entry: Entry, stop: threading.Event | None = None) -> bytes:
        """The object's bytes; raises ObjectMissing/BucketMissing at once, StorageError after the
        last attempt."""
        storage = self.storage_for(entry.uri)

        def once() -> bytes:
            return storage.get_checked(entry.uri, size=entry.size, options=self._options).read_all()

        return with_retries(once, self._policy, what=entry.uri, cancel=stop)[0]

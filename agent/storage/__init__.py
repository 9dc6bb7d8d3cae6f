"""The one storage path of the agent: ``s3://`` and ``file://`` behind one interface.

Listing, whole and ranged verified reads (agent.storage.checked; the lean signed requests,
agent.storage.lean and agent.storage.wire, with boto3 as their fallback), checked writes (single
PUT or multipart, agent.storage.multipart), one retry policy and one exception per failure kind
(agent.storage.retry; botocore's exceptions translated in agent.storage.client). botocore's
private attributes are read only in agent.storage.botocore_private. The interface and the
``file://`` backend are agent.storage.base, the ``s3://`` one agent.storage.s3.

:class:`JobStorage` is made once per job by the lifecycle and passed down: it makes the job's one
S3 client on first need, shared by the code fetch, staging, Pipe feeders, live sync, outputs and
log shipping. boto3 is imported only then: with an explicit endpoint and credentials in the
environment, listing, HEAD, GET and small PUTs take the lean path and need no client at all.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from agent.storage.base import (
    DownloadStopped,
    FileStorage,
    Location,
    ObjectInfo,
    Storage,
    parse_uri,
    redact,
    write_text_atomically,
)
from agent.storage.checked import DEFAULT_READ, CheckedRead, ReadOptions
from agent.storage.retry import (
    ONE_TRY,
    RetryPolicy,
    ShortRead,
    TransientError,
    retryable,
    with_retries,
)
from agent.storage.s3 import S3Storage, make_s3_client, translate_s3_error

if TYPE_CHECKING:
    from agent.settings import Settings

__all__ = [
    "DEFAULT_READ",
    "ONE_TRY",
    "CheckedRead",
    "DownloadStopped",
    "FileStorage",
    "JobStorage",
    "Location",
    "ObjectInfo",
    "ReadOptions",
    "RetryPolicy",
    "S3Storage",
    "ShortRead",
    "Storage",
    "TransientError",
    "make_s3_client",
    "open_storage",
    "parse_uri",
    "redact",
    "retryable",
    "translate_s3_error",
    "with_retries",
    "write_text_atomically",
]


class JobStorage:
    """The storages of one job (or one process of it): one S3 client, made on first use.

    ``for_uri`` gives the storage for a URI's scheme under the default retry policy;
    ``for_uploads`` the same client without retries of its own, for callers that retry to a
    deadline (end-of-job uploads, live sync, log shipping).
    """

    def __init__(
        self, endpoint_url: str | None = None, *, pool: int = 32, lean: bool = True
    ) -> None:
        self.endpoint_url = endpoint_url
        self.pool = pool
        self.lean = lean
        self._lock = threading.Lock()
        self._s3: S3Storage | None = None
        self._file = FileStorage()

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStorage:
        """Sized for the job's busiest user: staging threads, sync part uploads, Pipe prefetch."""
        pool = max(
            32,
            settings.data.data_threads + 4,
            settings.sync.sync_workers * 4 + 4,
            settings.data.pipe_prefetch + 4,
        )
        return cls(settings.general.endpoint_url, pool=pool, lean=settings.data.data_lean_get)

    def s3(self) -> S3Storage:
        """The job's S3 storage (its client is made on the first call)."""
        with self._lock:
            if self._s3 is None:
                self._s3 = S3Storage(
                    endpoint_url=self.endpoint_url, max_pool_connections=self.pool, lean=self.lean
                )
            return self._s3

    def for_uri(self, uri: str) -> Storage:
        """The storage for ``uri``'s scheme."""
        return self.s3() if parse_uri(uri).scheme == "s3" else self._file

    def for_uploads(self, uri: str) -> Storage:
        """The storage for ``uri`` with no retries of its own (the caller retries)."""
        storage = self.for_uri(uri)
        return storage.with_policy(ONE_TRY) if isinstance(storage, S3Storage) else storage


def open_storage(uri: str, *, s3_client: Any = None, endpoint_url: str | None = None) -> Storage:
    """A storage for ``uri``'s scheme, on its own (a job passes its :class:`JobStorage` down
    instead). Pass ``s3_client`` to share a client."""
    if parse_uri(uri).scheme == "s3":
        return S3Storage(s3_client, endpoint_url=endpoint_url)
    return FileStorage()

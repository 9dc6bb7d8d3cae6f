"""The data agent: puts each channel where the script expects it, as SageMaker would.

File mode (and FastFile outside SageMaker) stages the channel into ``input/data/<channel>/`` before
the
script starts; Pipe mode offers ``input/data/<channel>_<epoch>`` FIFOs fed while it runs. Channels
whose
``uri`` is None were staged by the platform and are left alone. The streaming datasets
(``S3IterableDataset``, ``S3MapDataset``) import torch and are loaded only when asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent.data.listing import Entry, list_channel, select_shard
from agent.data.reading import ObjectReader
from agent.data.staging import StageOptions, StageResult, StagingStopped, stage
from agent.errors import ChannelError
from agent.job import Channel, Job
from agent.storage import JobStorage, redact

if TYPE_CHECKING:  # pragma: no cover
    from agent.data.pipes import PipeFeeder

__all__ = [
    "DataHandle",
    "Listing",
    "ListingAbandoned",
    "S3IterableDataset",
    "S3MapDataset",
    "Staging",
    "StagingStopped",
    "channel_uri_variable",
    "list_channels",
    "prepare_channels",
]


def channel_uri_variable(name: str) -> str:
    """The variable that gives the script a channel's source URI:
    ``TORCHBAY_CHANNEL_<NAME>_URI``."""
    return f"TORCHBAY_CHANNEL_{name.upper().replace('-', '_')}_URI"


class DataHandle:
    """What ``prepare_channels`` left running (Pipe feeders) and what it staged."""

    def __init__(self) -> None:
        self.staged: dict[str, StageResult] = {}
        self._feeders: list[PipeFeeder] = []
        self._stopped = False

    def _add_feeder(self, feeder: PipeFeeder) -> None:
        self._feeders.append(feeder)

    def failures(self) -> dict[str, BaseException]:
        """Pipe channels whose feeder failed, with the error."""
        return {feeder.name: feeder.error for feeder in self._feeders if feeder.error is not None}

    def stop(self, timeout: float) -> None:
        """Stop every Pipe feeder, waiting up to ``timeout`` seconds in all; idempotent."""
        deadline = time.monotonic() + timeout
        for feeder in self._feeders:
            feeder.stop(0)
        for feeder in self._feeders:
            feeder.stop(max(0.0, deadline - time.monotonic()))
        self._stopped = True


Planned = list[tuple[Channel, list[Entry]]]  # each channel with a URI, and this host's objects
T = TypeVar("T")


class ListingAbandoned(Exception):
    """Raised in the listing thread once :meth:`Listing.abandon` was called: nobody waits for
    its result."""


def list_channels(
    job: Job,
    *,
    log: logging.Logger,
    storages: JobStorage,
    abandoned: threading.Event | None = None,
) -> Planned:
    """Each channel that has a URI with the objects this host takes from it (listed, sharded).

    Raises ChannelError (empty prefix, bad manifest) or StorageError; ListingAbandoned once
    ``abandoned`` is set (checked between objects, and it ends the retries of a failing request).
    """
    planned = []
    for channel in job.channels:
        if channel.uri is None:
            log.debug("channel %r: already in place (no URI); nothing to stage", channel.name)
            continue
        planned.append((channel, _entries_for(job, channel, log, storages, abandoned)))
    return planned


class _OnAThread(Generic[T]):
    """``work()`` on a daemon thread of its own; :meth:`_result` waits for it and returns what it
    gave or raises what it raised."""

    def __init__(self, name: str, work: Callable[[], T]) -> None:
        self._got: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._got = work()
            except BaseException as err:  # handed to the caller by _result()
                self._error = err

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def _result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._got is not None
        return self._got


class Listing(_OnAThread[Planned]):
    """:func:`list_channels` on a thread of its own, so a job lists its channels while its code
    is fetched (:class:`Staging` then takes them while the requirements install); :meth:`result`
    waits for it and raises what the listing raised. A job that fails before it stages calls
    :meth:`abandon`."""

    def __init__(self, job: Job, *, log: logging.Logger, storages: JobStorage) -> None:
        self._abandoned = threading.Event()
        super().__init__(
            "torchbay-listing",
            lambda: list_channels(job, log=log, storages=storages, abandoned=self._abandoned),
        )

    def abandon(self) -> None:
        """Nobody will take the result: a prefix's listing stops at its next object or failed page
        request (without logging what it listed) instead of listing and retrying while the job
        ends; a manifest's one GET still makes its retries."""
        self._abandoned.set()

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, stop: Callable[[], bool] | None = None) -> Planned:
        """What the listing gave, once it ended; raises what it raised. ``stop`` is asked every
        0.2 s while the listing runs: once it says yes the listing is abandoned and StagingStopped
        raised."""
        while stop is not None and self._thread.is_alive():
            self._thread.join(0.2)
            if self._thread.is_alive() and stop():
                self.abandon()
                raise StagingStopped("the channel listing stopped on request")
        return self._result()


class Staging(_OnAThread[DataHandle]):
    """:func:`prepare_channels` on a thread of its own, started once the code is fetched, so a job
    stages its channels while its requirements install (pip and the downloads overlap instead of
    adding up); it takes the channels from ``listing``. :meth:`result` waits for it and raises
    what it raised; :meth:`cancel` ends it at its next progress tick (a failed install, the end of
    a job that failed before it staged). ``stop`` (the agent's stop request) ends it the same way,
    with StagingStopped."""

    def __init__(
        self,
        job: Job,
        *,
        log: logging.Logger,
        storages: JobStorage,
        listing: Listing,
        stop: Callable[[], bool],
    ) -> None:
        self._cancelled = threading.Event()

        def asked() -> bool:
            return self._cancelled.is_set() or stop()

        super().__init__(
            "torchbay-staging",
            lambda: prepare_channels(
                job, log=log, storages=storages, planned=listing.result(asked), stop=asked
            ),
        )

    def result(self) -> DataHandle:
        return self._result()

    def cancel(self, timeout: float) -> DataHandle | None:
        """Nobody takes the result: stop at the next tick and wait up to ``timeout`` seconds (a
        GET stalled mid-read can take longer; the thread is a daemon). Returns what it had
        finished (its Pipe feeders are the caller's to stop), or None."""
        self._cancelled.set()
        self._thread.join(timeout)
        return self._got


def prepare_channels(
    job: Job,
    *,
    log: logging.Logger,
    storages: JobStorage | None = None,
    planned: Planned | None = None,
    stop: Callable[[], bool] | None = None,
) -> DataHandle:
    """Stage File/FastFile channels now and start feeders for Pipe channels.

    ``storages`` is the job's (one S3 client for listing, staging and the Pipe feeders); None
    makes one from the job's settings. ``planned``: what :func:`list_channels` gave (None lists
    the channels here). ``stop``: see :func:`agent.data.staging.stage` (StagingStopped).

    Raises ChannelError (empty prefix, bad manifest or mode), StorageError, DiskFullError or
    UnsafePathError; on an error no feeder is left running.
    """
    handle = DataHandle()
    storages = storages or JobStorage.from_settings(job.settings)
    if planned is None:
        planned = list_channels(job, log=log, storages=storages)
    try:
        for channel, entries in planned:
            mode = channel.input_mode or job.input_mode
            if mode == "Pipe":
                continue
            if mode == "FastFile":
                log.warning(
                    "channel %r: FastFile needs SageMaker's mount; staging it in File mode instead "
                    "(the script starts once the data is here)",
                    channel.name,
                )
            elif mode != "File":
                raise ChannelError(
                    f"channel {channel.name!r}: input mode {mode!r} is unknown; "
                    "use File, FastFile or Pipe"
                )
            if channel.compression not in ("None", "", None):
                log.warning(
                    "channel %r: CompressionType %s applies to Pipe mode only; File mode stages "
                    "the objects as they are",
                    channel.name,
                    channel.compression,
                )
            handle.staged[channel.name] = stage(
                entries,
                job.layout.channel_dir(channel.name),
                options=StageOptions.from_settings(job.settings, job.base_env),
                log=log,
                channel=channel.name,
                storage=storages.for_uri(channel.uri or "/"),
                stop=stop,
            )
        for channel, entries in planned:
            if (channel.input_mode or job.input_mode) == "Pipe":
                handle._add_feeder(_start_pipe(job, channel, entries, log, storages))
    except BaseException:
        handle.stop(5.0)
        raise
    return handle


def _entries_for(
    job: Job,
    channel: Channel,
    log: logging.Logger,
    storages: JobStorage,
    abandoned: threading.Event | None = None,
) -> list[Entry]:
    assert channel.uri is not None
    storage = storages.for_uri(channel.uri)
    started = time.monotonic()
    entries = list_channel(
        storage, channel.uri, channel.s3_data_type, channel=channel.name, abandoned=abandoned
    )
    if abandoned is not None and abandoned.is_set():
        raise ListingAbandoned(channel.name)
    log.info(
        "channel %r: listed %d object(s) under %s in %.2f s (%s)",
        channel.name,
        len(entries),
        redact(channel.uri),
        time.monotonic() - started,
        channel.s3_data_type,
    )
    mine = select_shard(
        entries,
        channel.distribution,
        job.resource.host_index,
        job.resource.host_count,
        channel=channel.name,
        log=log,
    )
    if channel.distribution == "ShardedByS3Key" and job.resource.host_count > 1:
        log.info(
            "channel %r: host %s (%d of %d) takes %d of %d objects (ShardedByS3Key: sorted keys, "
            "index mod "
            "%d == %d)",
            channel.name,
            job.resource.current_host,
            job.resource.host_index,
            job.resource.host_count,
            len(mine),
            len(entries),
            job.resource.host_count,
            job.resource.host_index,
        )
    return mine


def _start_pipe(
    job: Job, channel: Channel, entries: list[Entry], log: logging.Logger, storages: JobStorage
) -> PipeFeeder:
    from agent.data.pipes import PipeFeeder  # fcntl, termios, the feeder (~4 ms): Pipe mode only

    settings = job.settings
    reader = ObjectReader(
        endpoint_url=settings.general.endpoint_url,
        attempts=settings.data.data_attempts,
        verify_md5=settings.data.data_verify_md5,
        max_pool_connections=settings.data.pipe_prefetch + 4,
        storage=storages,
    )
    feeder = PipeFeeder(
        channel.name,
        entries,
        lambda epoch: job.layout.pipe_path(channel.name, epoch),
        reader=reader,
        epochs=settings.data.pipe_epochs,
        prefetch=settings.data.pipe_prefetch,
        gzip=channel.compression == "Gzip",
        seed=channel.shuffle_seed,
        log=log,
    )
    feeder.start()
    log.info(
        "channel %r: Pipe mode: %d objects per epoch through %s_<epoch> (up to %d epochs)",
        channel.name,
        len(entries),
        job.layout.pipe_path(channel.name, 0).parent / channel.name,
        settings.data.pipe_epochs,
    )
    return feeder


def __getattr__(name: str) -> Any:
    if name in ("S3IterableDataset", "S3MapDataset"):
        from agent.data import dataset  # torch: only for a script that asks for the datasets

        return getattr(dataset, name)
    raise AttributeError(f"module 'agent.data' has no attribute {name!r}")

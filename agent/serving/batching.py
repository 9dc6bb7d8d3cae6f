"""One inference thread per worker, with optional dynamic batching.

Request threads hand their decoded input to the runner and wait for their own result (with a
timeout, so a slow model never hangs a request). With ``max_batch > 1`` the runner joins inputs
of the same shape and dtype into one call and splits the result by rows.

How long a forming batch waits (never longer than ``max_delay`` after its first request is taken):
while other requests of this worker are being read or decoded; and while it is smaller than the
number of requests this worker held at once during the previous batch (the *peak*: queued, being
decoded, or in the model). Under closed-loop load the requests just answered come back within a
round trip, so waiting for them joins the two groups that would otherwise alternate (one in the
model, the other queued) into full batches. A lone request runs at once: at concurrency 1 the
peak is 1, and a request that comes more than ``max_delay`` after the previous batch ended is not
made to wait for anyone.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Runner", "set_torch_threads"]


def set_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` torch (OpenMP) threads.

    ``torch.set_num_threads`` sets OpenMP's thread count for the calling thread only: a thread
    started later runs its parallel regions with OpenMP's default, one thread per core, although
    ``torch.get_num_threads()`` there still reports the master's value. On a 2-core machine the
    inference thread of each worker then ran a 784-256-10 MLP's forward() with a 2-thread OpenMP
    team: 180-250 us of CPU per call instead of 30, and the extra thread spinning beside it
    (measured in a worker: the OpenMP thread used as much CPU as the inference thread). Every
    thread that may call the model calls this first.
    """
    torch.set_num_threads(count)


@dataclass
class _Item:
    data: Any
    key: Hashable | None
    future: Future[Any] = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


class Runner:
    """Runs ``run_one(data)`` (or ``run_batch([data, ...])``) on one thread, in arrival order."""

    def __init__(
        self,
        run_one: Callable[[Any], Any],
        run_batch: Callable[[Sequence[Any]], list[Any] | None] | None = None,
        *,
        max_batch: int = 1,
        max_delay: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
        log: logging.Logger | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self._run_one = run_one
        self._thread_init = thread_init
        self._run_batch = run_batch
        self._max_batch = max_batch if run_batch is not None else 1
        self._max_delay = max_delay
        self._on_batch = on_batch
        self._log = log or logging.getLogger("torchbay.serve")
        self._cond = threading.Condition()
        self._pending: collections.deque[_Item] = collections.deque()
        self._arriving = 0
        self._arriving_threads: set[int] = set()
        self._running = 0  # requests in the batch being run
        self._peak = (
            0  # most requests held at once (arriving + queued + running) since the last batch began
        )
        self._last_end = float("-inf")  # when the last batch finished
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._unsplittable_logged = False

    def start(self) -> None:
        """Start the inference thread (after fork: threads do not survive it)."""
        self._thread = threading.Thread(target=self._loop, name="torchbay-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being read or decoded), so a forming batch waits for it.

        It counts as arriving until this thread submits it (or leaves the block without doing so).
        """
        me = threading.get_ident()
        with self._cond:
            self._arriving_threads.add(me)
            self._arriving += 1
            self._peak = max(self._peak, self._held())
        try:
            yield
        finally:
            with self._cond:
                if me in self._arriving_threads:
                    self._arriving_threads.discard(me)
                    self._arriving -= 1
                    self._cond.notify_all()

    def submit(self, data: Any, key: Hashable | None = None) -> Future[Any]:
        """Queue ``data``; the Future holds its own result (or the exception its call raised)."""
        item = _Item(data, key)
        me = threading.get_ident()
        with self._cond:
            if me in self._arriving_threads:  # arrived: counted as queued from now on, not twice
                self._arriving_threads.discard(me)
                self._arriving -= 1
            self._pending.append(item)
            self._peak = max(self._peak, self._held())
            self._cond.notify_all()
        return item.future

    def _held(self) -> int:
        """Requests this worker holds: arriving, queued, or in the model (called locked)."""
        return self._arriving + len(self._pending) + self._running

    def call(self, data: Any, key: Hashable | None, timeout: float) -> Any:
        """Submit and wait at most ``timeout`` seconds; TimeoutError when it is not done by then."""
        future = self.submit(data, key)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    # --- the inference thread ----------------------------------------------------------------
    def _loop(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            batch = [first]
            if self._max_batch > 1 and first.key is not None:
                self._fill(batch)
            self._running = len(batch)
            self._peak = self._held()
            return batch

    def _fill(self, batch: list[_Item]) -> None:
        """Add matching requests to ``batch``, waiting as the module docstring says (called
        locked)."""
        now = time.monotonic()
        lone = (
            batch[0].queued - self._last_end > self._max_delay
        )  # not a request that came back at once
        target = 1 if lone else min(self._max_batch, self._peak)
        deadline = now + self._max_delay
        while True:
            self._take_matching(batch)
            if len(batch) >= self._max_batch or (self._arriving == 0 and len(batch) >= target):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take_matching(self, batch: list[_Item]) -> None:
        key = batch[0].key
        kept: collections.deque[_Item] = collections.deque()
        while self._pending:
            item = self._pending.popleft()
            if item.key == key and len(batch) < self._max_batch:
                batch.append(item)
            else:
                kept.append(item)
        self._pending = kept

    def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        outcomes = self._outcomes(live) if live else []
        with (
            self._cond
        ):  # before any caller is answered, so one that comes straight back is not counted twice
            self._running = 0
            self._last_end = time.monotonic()
        for item, (ok, value) in zip(live, outcomes, strict=False):
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)

    def _outcomes(self, live: list[_Item]) -> list[tuple[bool, Any]]:
        """(True, result) or (False, exception) for each request, in order."""
        if self._on_batch is not None:
            self._on_batch(len(live))
        if len(live) > 1 and self._run_batch is not None:
            failed = False
            try:
                results = self._run_batch([item.data for item in live])
            except Exception:  # one bad input must not fail the others: retry them one by one
                results, failed = None, True
            if results is not None and len(results) == len(live):
                return [(True, result) for result in results]
            if not failed and not self._unsplittable_logged:
                self._unsplittable_logged = True
                self._log.warning(
                    "a batched prediction could not be split by rows; running requests one by one"
                )
        outcomes: list[tuple[bool, Any]] = []
        for item in live:
            try:
                outcomes.append((True, self._run_one(item.data)))
            except BaseException as err:  # delivered to the waiting request, which answers for it
                outcomes.append((False, err))
        return outcomes

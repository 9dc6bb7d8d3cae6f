"""One inference thread per worker, with optional dynamic batching.

Request threads hand their decoded input to the runner and wait for their own result (with a
timeout, so a slow model never hangs a request). With ``max_batch > 1`` the runner joins inputs
of the same shape and dtype into one call and splits the result by rows. It waits for more only
while other requests of this worker are still being decoded, and never longer than
``max_delay``: a lone request runs at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Hashable, Iterator, Optional, Sequence

__all__ = ["Runner"]


@dataclass
class _Item:
    data: Any
    key: Optional[Hashable]
    future: Future = field(default_factory=Future)


class Runner:
    """Runs ``run_one(data)`` (or ``run_batch([data, ...])``) on one thread, in arrival order."""

    def __init__(self, run_one: Callable[[Any], Any],
                 run_batch: Optional[Callable[[Sequence[Any]], Optional[list[Any]]]] = None, *,
                 max_batch: int = 1, max_delay: float = 0.0,
                 on_batch: Optional[Callable[[int], None]] = None,
                 log: Optional[logging.Logger] = None) -> None:
        self._run_one = run_one
        self._run_batch = run_batch
        self._max_batch = max_batch if run_batch is not None else 1
        self._max_delay = max_delay
        self._on_batch = on_batch
        self._log = log or logging.getLogger("torchbay.serve")
        self._cond = threading.Condition()
        self._pending: Deque[_Item] = collections.deque()
        self._arriving = 0
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
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
        """Mark a request as on its way (being decoded), so a forming batch waits for it."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, data: Any, key: Optional[Hashable] = None) -> Future:
        """Queue ``data``; the Future holds its own result (or the exception its call raised)."""
        item = _Item(data, key)
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()
        return item.future

    def call(self, data: Any, key: Optional[Hashable], timeout: float) -> Any:
        """Submit and wait at most ``timeout`` seconds; TimeoutError when it is not done by then."""
        future = self.submit(data, key)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    # --- the inference thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> Optional[list[_Item]]:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            batch = [first]
            if self._max_batch <= 1 or first.key is None:
                return batch
            deadline = time.monotonic() + self._max_delay
            while len(batch) < self._max_batch:
                self._take_matching(batch)
                if len(batch) >= self._max_batch or self._arriving == 0:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _take_matching(self, batch: list[_Item]) -> None:
        key = batch[0].key
        kept: Deque[_Item] = collections.deque()
        while self._pending:
            item = self._pending.popleft()
            if item.key == key and len(batch) < self._max_batch:
                batch.append(item)
            else:
                kept.append(item)
        self._pending = kept

    def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        if len(live) > 1 and self._run_batch is not None:
            failed = False
            try:
                results = self._run_batch([item.data for item in live])
            except Exception:  # one bad input must not fail the others: retry them one by one
                results, failed = None, True
            if results is not None and len(results) == len(live):
                for item, result in zip(live, results):
                    item.future.set_result(result)
                return
            if not failed and not self._unsplittable_logged:
                self._unsplittable_logged = True
                self._log.warning("a batched prediction could not be split by rows; running requests one by one")
        for item in live:
            try:
                item.future.set_result(self._run_one(item.data))
            except BaseException as err:  # delivered to the waiting request, which answers for it
                item.future.set_exception(err)

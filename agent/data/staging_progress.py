"""Staging progress: one log line every few seconds with files, bytes, rate and ETA."""

from __future__ import annotations

import logging
import time

__all__ = ["Progress", "mib"]


def mib(n: int) -> str:
    """``n`` bytes in MiB, one decimal."""
    return f"{n / 2**20:.1f} MiB"


class Progress:
    """One log line every ``interval`` seconds: files, bytes, rate, ETA."""

    def __init__(
        self,
        channel: str,
        total_files: int,
        total_bytes: int | None,
        done_files: int,
        done_bytes: int,
        interval: float,
        log: logging.Logger,
    ) -> None:
        self._channel = channel
        self._total_files = total_files
        self._total_bytes = total_bytes
        self._base_files = done_files
        self._base_bytes = done_bytes
        self._interval = interval
        self._log = log
        self._start = time.monotonic()
        self._next = self._start + interval

    def tick(self, files: int, nbytes: int, force: bool = False) -> None:
        """Log the counts so far (``files``, ``nbytes`` fetched by this call) if the interval has
        passed."""
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        elapsed = max(now - self._start, 1e-6)
        rate = nbytes / elapsed
        done_files, done_bytes = self._base_files + files, self._base_bytes + nbytes
        if self._total_bytes:
            eta = (self._total_bytes - done_bytes) / rate if rate > 0 else float("inf")
            of_bytes = f"{mib(done_bytes)}/{mib(self._total_bytes)}"
        else:
            per_file = elapsed / files if files else float("inf")
            eta = (self._total_files - done_files) * per_file
            of_bytes = mib(done_bytes)
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "unknown"
        self._log.info(
            "channel %r: %d/%d files, %s, %.1f MiB/s, %.0f files/s, ETA %s",
            self._channel,
            done_files,
            self._total_files,
            of_bytes,
            rate / 2**20,
            files / elapsed,
            eta_text,
        )

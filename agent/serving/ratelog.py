"""One log line per client error, at most a few per second: a flood of bad requests cannot flood the
log."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """``warning(fmt, *args)`` logs at most ``per_second`` lines a second; the rest are counted and
    the
    count is logged with the next line that gets through (``... (N similar lines suppressed)``)."""

    def __init__(self, log: logging.Logger, per_second: float = 5.0, burst: int = 20) -> None:
        self._log = log
        self._rate = per_second
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, fmt: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            fmt += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self._log.warning(fmt, *args)

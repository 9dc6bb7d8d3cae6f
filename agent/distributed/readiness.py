"""Readiness: every host name resolves and, on workers, the master accepts connections.

Bounded by the ``host_wait_timeout`` setting, with a progress line naming the hosts still
missing and a DistributedError naming them at the bound.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from agent.errors import DistributedError

__all__ = ["PROGRESS_EVERY", "wait_until_ready"]

PROGRESS_EVERY = 10.0  # seconds between progress lines


def _resolves(host: str, timeout: float) -> bool:
    """getaddrinfo in a daemon thread, so a slow resolver cannot stretch the bound."""
    result: list[bool] = []

    def _lookup() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            result.append(True)
        except (OSError, UnicodeError):
            result.append(False)

    thread = threading.Thread(target=_lookup, name=f"resolve-{host}", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.05))
    return bool(result and result[0])


def _accepts(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=max(min(timeout, 2.0), 0.05)):
            return True
    except OSError:
        return False


def wait_until_ready(
    hosts: Sequence[str],
    *,
    master: tuple[str, int] | None,
    timeout: float,
    log: logging.Logger,
    poll: float = 0.05,
    progress_every: float = PROGRESS_EVERY,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Wait until each of ``hosts`` resolves and ``master`` (host, port), when given, accepts a
    connection.

    Returns the seconds waited; raises DistributedError naming what is still missing at ``timeout``.
    """
    start = clock()
    deadline = start + timeout
    unresolved = list(dict.fromkeys(hosts))
    next_progress = start + progress_every
    while True:
        remaining = deadline - clock()
        unresolved = [h for h in unresolved if not _resolves(h, min(remaining, 5.0))]
        missing = [f"{h} (does not resolve)" for h in unresolved]
        if master is not None and not unresolved:
            host, port = master
            if not _accepts(host, port, deadline - clock()):
                missing.append(f"{host}:{port} (master does not accept connections yet)")
        now = clock()
        if not missing:
            return now - start
        if now >= deadline:
            raise DistributedError(
                f"hosts not ready after {timeout:g} s: {', '.join(missing)}; check the host names "
                "and that every "
                "host of the job was started, or raise TORCHBAY_HOST_WAIT_TIMEOUT"
            )
        if now >= next_progress:
            log.info(
                "waiting for hosts (%.0f s of %g s): %s", now - start, timeout, ", ".join(missing)
            )
            next_progress = now + progress_every
        time.sleep(min(poll, max(deadline - now, 0.0)))

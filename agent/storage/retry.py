"""The one retry policy of every S3 caller: which failures are worth another try, and the backoff
loop.

Failure kinds (each one exception class, all StorageErrors):

- :class:`ShortRead`: fewer or other bytes than promised (a byte count or a digest that does not
  match); retried, never accepted.
- :class:`~agent.errors.EndpointUnreachable`: refused, reset, timed out, closed early; retried.
- :class:`TransientError`: an S3 answer that may heal by waiting (5xx, throttling, an unknown
  code, a multipart upload the server lost); retried.
- anything else (:class:`~agent.errors.ObjectMissing`, :class:`~agent.errors.BucketMissing`, access
  denied, a full disk, a local file error): not retried.

:func:`with_retries` is the loop: attempts or a deadline, exponential backoff, a cancel event. A
ShortRead or TransientError that outlives its retries is reported as a plain StorageError (the
agent.errors class a job's failure report names).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.errors import EndpointUnreachable, StoppedOnRequest, StorageError, TorchBayError

__all__ = [
    "DEFAULT_POLICY",
    "NO_RETRY_CODES",
    "ONE_TRY",
    "RetryPolicy",
    "ShortRead",
    "TransientError",
    "error_code",
    "retryable",
    "with_retries",
]

T = TypeVar("T")

# S3 error codes that waiting does not fix.
NO_RETRY_CODES = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidObjectState",
        "InvalidBucketName",
        "InvalidArgument",
        "EntityTooLarge",
        "NotFound",
        "400",
        "403",
        "404",
    }
)


class TransientError(StorageError):
    """A failure that may heal by waiting: retried."""


class ShortRead(TransientError):
    """A read that gave fewer (or other) bytes than promised: always retried, never accepted."""


def error_code(err: BaseException) -> str:
    """The S3 error code of a botocore ClientError (``""`` for anything else)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        error = response.get("Error")
        if isinstance(error, dict):
            return str(error.get("Code", ""))
    return ""


def retryable(err: BaseException) -> bool:
    """Whether another try may succeed where ``err`` failed."""
    if isinstance(err, (TransientError, EndpointUnreachable)):
        return True
    if isinstance(err, (TorchBayError, StoppedOnRequest)):  # a stop asked for is no failure
        return False
    if isinstance(err, OSError):
        return isinstance(err, ConnectionError)  # a local file error does not heal by waiting
    code = error_code(err)
    if code:
        return code not in NO_RETRY_CODES
    return not isinstance(err, (TypeError, ValueError, AttributeError, KeyError))


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all (0: no limit, until the deadline); pauses of ``backoff`` seconds
    doubling up to ``max_pause``, each scaled by a random 0.5-1.5 when ``jitter``."""

    attempts: int = 5
    backoff: float = 0.5
    max_pause: float = 10.0
    jitter: bool = True

    def pause(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (1-based)."""
        pause: float = min(self.backoff * 2.0 ** (attempt - 1), self.max_pause)
        return pause * (0.5 + random.random()) if self.jitter else pause


ONE_TRY = RetryPolicy(attempts=1)
DEFAULT_POLICY = RetryPolicy()
_log = logging.getLogger("torchbay.storage")


def with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    give_up: Callable[[BaseException, int], BaseException] | None = None,
) -> tuple[T, int]:
    """``(fn(), attempts)``, calling ``fn`` again after each :func:`retryable` failure.

    Stops at ``policy.attempts``, when the next pause would pass ``deadline``
    (``time.monotonic()``) or when ``cancel`` is set; then raises ``give_up(err, attempts)`` (by
    default the last error itself). A failure that is not retryable is raised at once.
    ``on_retry(err, attempt, pause)`` is called before each pause (default: a debug line naming
    ``what``).
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except Exception as err:
            if not retryable(err):
                raise
            pause = policy.pause(attempt)
            spent = (
                (policy.attempts > 0 and attempt >= policy.attempts)
                or (cancel is not None and cancel.is_set())
                or (deadline is not None and deadline - time.monotonic() <= pause)
            )
            if not spent:
                if on_retry is not None:
                    on_retry(err, attempt, pause)
                else:
                    _log.debug("retrying %s in %.2f s after %s", what, pause, type(err).__name__)
                if cancel is None:
                    time.sleep(pause)
                    continue
                if not cancel.wait(pause):
                    continue
            if give_up is not None:
                raise give_up(err, attempt) from err
            if isinstance(err, TransientError):
                raise StorageError(str(err)) from err
            raise

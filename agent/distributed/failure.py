"""Which rank failed first, and why, from torchelastic's error files (and the ranks' stderr files).

torchrun writes ``<log_dir>/<run_id>/attempt_<k>/<local_rank>/error.json`` for a rank whose
main is decorated with ``torch.distributed.elastic.multiprocessing.errors.record``, and its own
error file (``TORCHELASTIC_ERROR_FILE``) when it fails; a rank without ``@record`` leaves its
traceback in ``stderr.log`` beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent.distributed.launch import LaunchPlan

__all__ = ["first_failure", "read_error_file"]

_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure)|[A-Za-z_][\w.]*Error)\b.*"
)
_RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]:\s?")  # torch prefixes a rank's stderr lines
_MAX_MESSAGE = 500


def read_error_file(path: Path) -> tuple[float, str] | None:
    """(timestamp, message) from a torchelastic error file; None when missing or unreadable."""
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    timestamp = 0.0
    if isinstance(message, dict):
        extra = message.get("extraInfo") or {}
        try:
            timestamp = float(extra.get("timestamp", 0) or 0)
        except (TypeError, ValueError):
            timestamp = 0.0
        message = message.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    return timestamp, _last_exception(message.splitlines()) or message.strip().splitlines()[-1]


def _last_exception(lines: list[str]) -> str | None:
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()[:_MAX_MESSAGE]
    return None


def _stderr_error(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = [
                _RANK_PREFIX.sub("", line)
                for line in handle.read().decode("utf-8", "replace").splitlines()
            ]
    except OSError:
        return None
    if not any("Traceback (most recent call last)" in line for line in tail):
        return None
    return _last_exception(tail)


def _local_rank(path: Path) -> int | None:
    name = path.parent.name
    return int(name) if name.isdigit() else None


def _latest_attempt(log_dir: Path) -> list[Path]:
    attempts = sorted(log_dir.glob("*/attempt_*"), key=lambda p: (p.stat().st_mtime, p.name))
    return attempts[-1:] if attempts else []


def first_failure(plan: LaunchPlan) -> str | None:
    """``rank R on host H failed first: <error>`` for this host's ranks, or None when nothing names
    one.

    Per-rank error files win (earliest timestamp), then the ranks' stderr tracebacks (earliest
    modified), then the launcher's own error file (rendezvous timeouts and the like).
    """
    host = plan.host or "this host"
    candidates: list[tuple[float, int, str]] = []
    if plan.torchrun_log_dir is not None:
        for attempt in _latest_attempt(plan.torchrun_log_dir):
            for error_file in attempt.glob("*/error.json"):
                local = _local_rank(error_file)
                found = read_error_file(error_file)
                if local is not None and found:
                    candidates.append((found[0] or error_file.stat().st_mtime, local, found[1]))
            if not candidates:
                for stderr in attempt.glob("*/stderr.log"):
                    local = _local_rank(stderr)
                    message = _stderr_error(stderr)
                    if local is not None and message:
                        candidates.append((stderr.stat().st_mtime, local, message))
    if candidates:
        _, local, message = min(candidates)
        return f"rank {plan.rank_base + local} on host {host} failed first: {message}"
    if plan.error_file is not None:
        found = read_error_file(plan.error_file)
        if found:
            who = (
                "torch.distributed.run"
                if plan.torchrun_log_dir is not None
                else f"rank {plan.rank_base}"
            )
            return f"{who} on host {host} failed: {found[1]}"
    return None

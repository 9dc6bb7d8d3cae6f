"""The agent's own log lines in the job log, tagged as the agent's (``[algo-1:agent] ...``).

Pip, staging, the waits for hosts and the failure reason then sit in ``job.log`` beside the ranks'
lines, so the uploaded log tells the whole story of a host, also when the script never started.
The tag follows ``TORCHBAY_LOG_TAG`` with ``agent`` for the rank and the stream; with
``TORCHBAY_LOG_JSON`` a line is ``{"time", "host", "rank": "agent", "stream": "agent", "level",
"line"}``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from agent.storage import redact

__all__ = ["AGENT_RANK", "AgentLogHandler"]

AGENT_RANK = "agent"


class AgentLogHandler(logging.Handler):
    """Append each record of the agent's logger to the job log (O_APPEND, one write per record)."""

    def __init__(
        self,
        path: Path,
        *,
        host: str,
        tag_format: str = "[{host}:{rank}] ",
        json_lines: bool = False,
        fmt: logging.Formatter | None = None,
    ) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._host = host
        self._json = json_lines
        try:
            self._tag = tag_format.format(host=host, rank=AGENT_RANK, stream=AGENT_RANK)
        except (KeyError, IndexError, ValueError):
            self._tag = f"[{host}:{AGENT_RANK}] "
        self.setFormatter(
            fmt or logging.Formatter("%(asctime)s torchbay %(levelname)s %(message)s")
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd is None:
            return
        try:
            text = redact(self.format(record))
            lines = text.split("\n")
            if self._json:
                data = "".join(
                    json.dumps(
                        {
                            "time": round(record.created, 6),
                            "host": self._host,
                            "rank": AGENT_RANK,
                            "stream": AGENT_RANK,
                            "level": record.levelname,
                            "line": line,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                    for line in lines
                )
            else:
                data = "".join(f"{self._tag}{line}\n" for line in lines)
            view = memoryview(data.encode("utf-8", "replace"))
            while view:
                view = view[os.write(self._fd, view) :]
        except Exception:  # a logging handler never raises into the agent
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            self.release()
        super().close()

"""LogCapture: files first, tail second. Every rank writes its own stdout/stderr files; one thread
tails them.

Each line reaches ``out`` (the container's stdout) and the job log tagged with host and
global rank (``[algo-1:3] ...`` by default, the ``TORCHBAY_LOG_TAG`` setting) or, with
``TORCHBAY_LOG_JSON``, as one JSON object per line (``time``, ``host``, ``rank``, ``stream``,
``line``). Files are read with large ``os.read`` calls and split by :class:`LineSplitter`,
which holds a partial last line until its newline arrives; :meth:`LogCapture.close` reads
every file to its end and emits the held partial lines, so what a killed process wrote is
never lost. A slow ``out`` only slows the tail, never the ranks.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from agent.job.shapes import MetricDefinition
from agent.settings import Settings
from agent.telemetry.lines import LineSplitter
from agent.telemetry.metrics import MetricMatcher, MetricPoint
from agent.telemetry.sinks import MetricsFile, TensorBoardSink

__all__ = ["LogCapture"]

_READ_SIZE = 1 << 20  # bytes per os.read
_ROUND_BUDGET = 8 << 20  # bytes read from one file before the others get their turn
_SCAN_EVERY = 4  # polls between scans of torchrun log dirs
_TAIL_KEEP = 200  # stderr lines kept per rank for stderr_tail
_STREAMS = ("stdout", "stderr")
_ATTEMPT = re.compile(r"attempt_(\d+)$")


class _Source:
    """One file being tailed."""

    __slots__ = ("fd", "path", "rank", "splitter", "stream", "tag")

    def __init__(self, path: Path, rank: int, stream: str, tag: bytes, max_line: int) -> None:
        self.path = path
        self.rank = rank
        self.stream = stream
        self.tag = tag
        self.fd: int | None = None
        self.splitter = LineSplitter(max_line)

    def read(self) -> tuple[bytes, bool]:
        """Complete lines appended since the last read (up to a fair budget), and whether the budget
        ran out."""
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return b"", False
        parts = []
        total = 0
        while total < _ROUND_BUDGET:
            data = os.read(self.fd, _READ_SIZE)
            if not data:
                break
            total += len(data)
            block = self.splitter.feed(data)
            if block:
                parts.append(block)
        return b"".join(parts), total >= _ROUND_BUDGET

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LogCapture:
    """Tail every rank's stdout/stderr files into ``out`` and ``job_log``, tagged; extract metrics.

    Args:
        host: this host's name, used in tags (``algo-1``).
        log_dir: where :meth:`files_for` creates ``<rank>/stdout.log`` and ``<rank>/stderr.log``.
        out: a binary stream, normally ``sys.stdout.buffer``.
        job_log: the job log file (appended to), or None.
        settings: the job's settings; ``settings.telemetry`` gives ``log_tag``, ``log_json``,
            ``log_max_line`` and ``log_poll_interval``.
        metric_definitions: SageMaker-style regex metrics applied to every line: the job's
            (``job.metric_definitions``: the spec's and the ``TORCHBAY_METRIC_DEFINITIONS``
            setting's, compiled by load_job).
        metrics_file: JSON-lines file for metric points, or None.
        tensorboard_dir: where metric points also go as TensorBoard scalars (when tensorboard is
            installed).
        log: the agent's logger for warnings about definitions and output errors.
    """

    def __init__(
        self,
        *,
        host: str,
        log_dir: Path,
        out: BinaryIO,
        job_log: Path | None,
        settings: Settings,
        metric_definitions: Sequence[MetricDefinition] = (),
        metrics_file: Path | None = None,
        tensorboard_dir: Path | None = None,
        log: logging.Logger | None = None,
        mask: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """``mask`` rewrites each block of complete lines before anything else sees it (secrets ->
        ****)."""
        self._host = host
        self._mask = mask
        self._log_dir = Path(log_dir)
        self._out: BinaryIO | None = out
        self._log = log or logging.getLogger("torchbay.telemetry")
        self._tag_format: str = settings.telemetry.log_tag
        self._json: bool = settings.telemetry.log_json
        self._max_line: int = settings.telemetry.log_max_line
        self._poll: float = settings.telemetry.log_poll_interval
        self._sources: list[_Source] = []
        self._known: set[Path] = set()
        self._torchrun: list[tuple[Path, int]] = []
        self._tails: dict[int, collections.deque[str]] = {}
        self._all_tail: collections.deque[str] = collections.deque(maxlen=_TAIL_KEEP)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._matcher = MetricMatcher(metric_definitions, log=self._log)
        self._metrics = MetricsFile(metrics_file) if metrics_file is not None else None
        self._tensorboard: TensorBoardSink | None = None
        if tensorboard_dir is not None and self._matcher:
            self._tensorboard = TensorBoardSink.open(
                tensorboard_dir, log=self._log, suffix=f".{host}"
            )
        self._job_log_fd: int | None = None
        if job_log is not None:
            job_log.parent.mkdir(parents=True, exist_ok=True)
            self._job_log_fd = os.open(job_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # --- registration ---------------------------------------------------------------------------
    def files_for(self, rank: int) -> tuple[Path, Path]:
        """``(stdout, stderr)`` files for global rank ``rank``, created empty; they are tailed from
        now on."""
        folder = self._log_dir / str(rank)
        folder.mkdir(parents=True, exist_ok=True)
        paths = (folder / "stdout.log", folder / "stderr.log")
        with self._lock:
            for path, stream in zip(paths, _STREAMS, strict=False):
                if path in self._known:
                    continue  # already tailed: keep its contents and offset
                path.write_bytes(b"")
                self._add(path, rank, stream)
        return paths

    def add_torchrun_dir(self, log_dir: Path, rank_base: int) -> None:
        """Follow ``torchrun --log-dir log_dir --redirects 3``:
        ``<run>/attempt_<k>/<local_rank>/{stdout,stderr}.log``.

        Files are picked up as torchrun creates them (also for later restart attempts);
        global rank = ``rank_base`` + local rank.
        """
        with self._lock:
            self._torchrun.append((Path(log_dir), rank_base))
            self._scan()

    def _add(self, path: Path, rank: int, stream: str) -> None:
        tag = self._tag_format.format(host=self._host, rank=rank, stream=stream).encode()
        self._sources.append(_Source(path, rank, stream, tag, self._max_line))
        self._known.add(path)

    def _scan(self) -> None:
        for root, base in self._torchrun:
            try:
                runs = [p for p in root.iterdir() if p.is_dir()]
            except FileNotFoundError:
                continue
            for run in runs:
                attempts = []
                for attempt in run.iterdir():
                    match = _ATTEMPT.match(attempt.name)
                    if match:
                        attempts.append((int(match.group(1)), attempt))
                for _, attempt in sorted(attempts):
                    try:
                        ranks = [p for p in attempt.iterdir() if p.name.isdigit()]
                    except FileNotFoundError:
                        continue
                    for rank_dir in sorted(ranks, key=lambda p: int(p.name)):
                        for stream in _STREAMS:
                            path = rank_dir / f"{stream}.log"
                            if path not in self._known and path.exists():
                                self._add(path, base + int(rank_dir.name), stream)

    # --- running --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the tailing thread. Idempotent."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="torchbay-logs", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        polls = 0
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self._torchrun and polls % _SCAN_EVERY == 0:
                        self._scan()
                    _, more = self._pump()
            except Exception:  # the tail thread's top level: keep tailing, say why once per failure
                self._log.exception("log capture: reading the rank log files failed; retrying")
                more = False
            polls += 1
            if (
                not more
            ):  # batch: let lines pile up for one poll interval rather than chase every write
                self._stop.wait(self._poll)

    def _pump(self) -> tuple[bool, bool]:
        """Read every file once; write what it finished. Returns (anything read, some file has more
        waiting)."""
        now = time.time()
        parts: list[bytes] = []
        points: list[MetricPoint] = []
        more = False
        for source in self._sources:
            block, full = source.read()
            more = more or full
            if block:
                parts.append(self._render(source, block, now, points))
        self._write(parts, points)
        return bool(parts), more

    def _render(
        self, source: _Source, block: bytes, now: float, points: list[MetricPoint]
    ) -> bytes:
        if self._mask is not None:
            block = self._mask(block)
        text = ""
        if self._matcher or self._json or source.stream == "stderr":
            text = block.decode("utf-8", "replace")
        if self._matcher:
            points.extend(self._matcher.scan(text, time=now, host=self._host, rank=source.rank))
        if source.stream == "stderr":
            lines = text.split("\n")[:-1]
            tail = self._tails.get(source.rank)
            if tail is None:
                tail = self._tails[source.rank] = collections.deque(maxlen=_TAIL_KEEP)
            tail.extend(lines)
            prefix = source.tag.decode()
            self._all_tail.extend(prefix + line for line in lines[-_TAIL_KEEP:])
        if self._json:
            stamp = round(now, 6)
            return "".join(
                json.dumps(
                    {
                        "time": stamp,
                        "host": self._host,
                        "rank": source.rank,
                        "stream": source.stream,
                        "line": line,
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for line in text.split("\n")[:-1]
            ).encode()
        tag = source.tag
        if not tag:
            return block
        return tag + block[:-1].replace(b"\n", b"\n" + tag) + b"\n"

    def _write(self, parts: list[bytes], points: list[MetricPoint]) -> None:
        if parts:
            data = b"".join(parts)
            if self._job_log_fd is not None:
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(self._job_log_fd, view) :]
                except OSError as err:  # a full disk: the lines still reach stdout
                    self._log.warning(
                        "log capture: writing the job log failed (%s); it stops here, lines still "
                        "go to the container's stdout",
                        err,
                    )
                    os.close(self._job_log_fd)
                    self._job_log_fd = None
            if self._out is not None:
                try:
                    self._out.write(data)
                    self._out.flush()
                except (OSError, ValueError) as err:
                    self._log.warning(
                        "log capture: writing to the container's stdout failed (%s); "
                        "lines still go to the job log",
                        err,
                    )
                    self._out = None
        if points:
            if self._metrics is not None:
                self._metrics.write(p.as_json() for p in points)
            if self._tensorboard is not None:
                self._tensorboard.write(points)

    # --- ending ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Drain every file to its end (held partial lines included), flush and close the outputs.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._scan()
            for _ in range(10_000):  # to the end of every file; bounded if an orphan keeps writing
                read, more = self._pump()
                if not (read or more):
                    break
            now = time.time()
            parts: list[bytes] = []
            points: list[MetricPoint] = []
            for source in self._sources:
                block = source.splitter.finish()
                if block:
                    parts.append(self._render(source, block, now, points))
                source.close()
            self._write(parts, points)
            self._matcher.warn_never_matched()
            if self._metrics is not None:
                self._metrics.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
            if self._job_log_fd is not None:
                os.close(self._job_log_fd)
                self._job_log_fd = None

    def stderr_tail(self, rank: int | None = None, lines: int = 20) -> list[str]:
        """The last ``lines`` stderr lines of ``rank`` (untagged), or of every rank (tagged) when
        rank is None."""
        with self._lock:
            tail = self._all_tail if rank is None else self._tails.get(rank, ())
            return list(tail)[-lines:] if lines > 0 else []

"""Pipe mode anywhere: one FIFO ``input/data/<channel>_<epoch>`` per epoch, fed while the script
reads it.

Each epoch's FIFO carries the channel's objects back to back in the listing's order (or shuffled
with
``seed + epoch`` when the channel has a shuffle seed), Gzip objects decompressed on the fly. The
next
``prefetch`` objects are fetched in parallel while the FIFO is written strictly in order. The FIFO
of
epoch *k+1* is created once the script has read epoch *k* to its end. All waits poll a stop event,
so a
script that never opens a FIFO, or stops reading half-way, never keeps the job from finishing.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import select
import stat
import struct
import termios
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from agent.data.listing import Entry
from agent.data.reading import ObjectReader
from agent.errors import ChannelError

__all__ = ["PipeFeeder"]

_POLL_MS = 200
_WRITE_CHUNK = 1024 * 1024


class _Stopped(Exception):
    """The feeder was asked to stop."""


class _ReaderGone(Exception):
    """The script closed the FIFO before its end."""


class PipeFeeder:
    """Feeds one Pipe-mode channel from a background thread; ``stop`` ends it at any point."""

    def __init__(
        self,
        name: str,
        entries: Sequence[Entry],
        path_for: Callable[[int], Path],
        *,
        reader: ObjectReader,
        epochs: int,
        prefetch: int = 4,
        gzip: bool = False,
        seed: int | None = None,
        log: logging.Logger,
    ) -> None:
        self.name = name
        self._entries = list(entries)
        self._path_for = path_for
        self._reader = reader
        self._epochs = epochs
        self._prefetch = max(1, prefetch)
        self._gzip = gzip
        self._seed = seed
        self._log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pipe-{name}", daemon=True)
        self.error: BaseException | None = None
        self.epochs_done = 0

    def start(self) -> None:
        """Create the first FIFO (so it exists before the script starts) and start feeding."""
        _make_fifo(self._path_for(0))
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop feeding (waits up to ``timeout`` seconds for the thread); idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            for epoch in range(self._epochs):
                if self._stop.is_set():
                    return
                self._feed_epoch(epoch)
                self.epochs_done = epoch + 1
        except _Stopped:
            return
        except Exception as err:  # top of a feeder thread: log it and keep it for DataHandle
            self.error = err
            self._log.error("channel %r: Pipe mode feeder failed: %s", self.name, err)

    def _order(self, epoch: int) -> list[Entry]:
        if self._seed is None:
            return self._entries
        order = list(self._entries)
        random.Random(self._seed + epoch).shuffle(order)
        return order

    def _feed_epoch(self, epoch: int) -> None:
        path = self._path_for(epoch)
        if epoch > 0:
            _make_fifo(path)
        fd = self._open_writer(path)
        written = 0
        try:
            for data in self._fetch_in_order(self._order(epoch)):
                for chunk in _gunzip(data) if self._gzip else (data,):
                    self._write_all(fd, chunk)
                    written += len(chunk)
            self._wait_drained(fd)
        except _ReaderGone:
            self._log.info(
                "channel %r: the script closed %s after %d bytes, before its end",
                self.name,
                path.name,
                written,
            )
        finally:
            os.close(fd)
        self._log.info(
            "channel %r: epoch %d: %d objects, %d bytes written to %s",
            self.name,
            epoch,
            len(self._entries),
            written,
            path.name,
        )

    def _fetch_in_order(self, order: Sequence[Entry]) -> Iterator[bytes]:
        with ThreadPoolExecutor(self._prefetch, thread_name_prefix=f"pipe-{self.name}-get") as pool:
            ahead: deque[Future[bytes]] = deque()
            upcoming = iter(order)
            try:
                for entry in upcoming:
                    ahead.append(pool.submit(self._reader.read, entry, self._stop))
                    if len(ahead) >= self._prefetch:
                        break
                while ahead:
                    data = ahead.popleft().result()
                    following = next(upcoming, None)
                    if following is not None:
                        ahead.append(pool.submit(self._reader.read, following, self._stop))
                    yield data
            finally:
                for future in ahead:
                    future.cancel()

    def _open_writer(self, path: Path) -> int:
        while True:
            try:
                return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: nobody has opened it for reading yet
                    raise ChannelError(
                        f"channel {self.name!r}: cannot open FIFO {path}: {err.strerror}"
                    ) from err
            if self._stop.wait(0.05):
                raise _Stopped()

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while view:
            if self._stop.is_set():
                raise _Stopped()
            events = poller.poll(_POLL_MS)
            if not events:
                continue
            if any(flags & (select.POLLERR | select.POLLHUP) for _, flags in events):
                raise _ReaderGone()
            try:
                sent = os.write(fd, view[:_WRITE_CHUNK])
            except BlockingIOError:
                continue
            except BrokenPipeError as err:
                raise _ReaderGone() from err
            view = view[sent:]

    def _wait_drained(self, fd: int) -> None:
        """Return once the script has read every byte (so the next FIFO appears only after this
        one's end)."""
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        buf = bytearray(4)
        while True:
            fcntl.ioctl(fd, termios.FIONREAD, buf)
            if struct.unpack("i", bytes(buf))[0] == 0:
                return
            events = poller.poll(0)
            if any(flags & (select.POLLERR | select.POLLHUP) for _, flags in events):
                raise _ReaderGone()
            if self._stop.wait(0.02):
                raise _Stopped()


def _make_fifo(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISFIFO(st.st_mode):
            raise ChannelError(
                f"{path} exists and is not a FIFO; remove it so Pipe mode can create its FIFO"
            )
        os.unlink(path)  # a stale FIFO from an earlier run
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path, 0o600)


def _gunzip(data: bytes) -> Iterator[bytes]:
    """Decompress one object that may hold several gzip members, in bounded pieces."""
    rest = data
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending = rest
        while pending:
            out = inflater.decompress(pending, _WRITE_CHUNK)
            if out:
                yield out
            pending = inflater.unconsumed_tail
        out = inflater.flush()
        if out:
            yield out
        if not inflater.eof:
            raise ChannelError(
                "a Gzip object ended in the middle of its data; check CompressionType and the "
                "object"
            )
        rest = inflater.unused_data
        while rest[:1] == b"\x00":  # padding between members
            rest = rest.lstrip(b"\x00")

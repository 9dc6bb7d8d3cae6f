"""What a request may cost a worker, checked before anything is decoded.

:func:`check_decoded_size` reads only the parts of a body that declare its decoded size (the NPY
header, the NPZ members' headers, a PNG/JPEG frame header, JSON/CSV separators and nesting) and
raises RequestError 413 (400 for over-deep JSON) naming the limit and the setting that raises it,
so a 2 MB zip bomb or a 99 KB 9000x9000 PNG is refused before a byte of it is inflated. A body it
cannot read is left to the decoder, which words the 400.

:class:`DecodeGate` runs large decodes one at a time per worker and hands their memory back to the
operating system afterwards (glibc's ``malloc_trim``), so a worker's RSS falls back after a large
request instead of keeping its peak until the next one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import RequestError
from agent.serving import codecs

__all__ = ["DecodeGate", "Limits", "check_decoded_size", "release_memory"]

_FLOAT32 = 4
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAX_NPZ_MEMBERS = 1024


@dataclass(frozen=True)
class Limits:
    """Per-request decoding limits (from the serving settings)."""

    max_decoded_bytes: int
    max_image_pixels: int
    max_json_depth: int
    large_bytes: int = (
        8 * 1024 * 1024
    )  # a decode at least this large goes through the worker's DecodeGate


def check_decoded_size(body: bytes, content_type: str, limits: Limits) -> int:
    """The decoded size ``body`` declares, in bytes (0 when unknown); RequestError when it is over a
    limit."""
    kind = codecs.media_type(content_type)
    if kind == codecs.NPY:
        stream = io.BytesIO(body)
        declared = _within(_npy_bytes(stream), limits, "the NPY header declares")
        held = len(body) - stream.tell()
        if declared > held:
            raise RequestError(
                400,
                f"the NPY header declares {declared} bytes of data but the body holds {held}; "
                "send the whole array, written with np.save",
            )
        return declared
    if kind == codecs.NPZ:
        return _within(_npz_bytes(body), limits, "the NPZ members declare")
    if kind in (codecs.PNG, codecs.JPEG):
        return _check_image(body, kind, limits)
    if kind == codecs.JSON:
        _check_json_depth(body, limits.max_json_depth)
        return _within(
            _separated_values(body, b",") * _FLOAT32, limits, "the JSON numbers (as float32) need"
        )
    if kind == codecs.CSV:
        values = _separated_values(body, b",") + body.count(b"\n")
        return _within(values * _FLOAT32, limits, "the CSV values (as float32) need")
    return 0


def _within(declared: int, limits: Limits, what: str) -> int:
    limit = limits.max_decoded_bytes
    if declared > limit:
        raise RequestError(
            413,
            f"{what} {declared} bytes decoded, over the limit of {limit} bytes "
            f"({limit / 1048576:g} MiB); send less per request or raise "
            "TORCHBAY_SERVE_MAX_DECODED_MB",
        )
    return declared


def _npy_bytes(stream: Any) -> int:
    """Bytes the NPY header at the start of ``stream`` declares (0 when it is no readable NPY
    header)."""
    try:
        version = np.lib.format.read_magic(stream)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(stream, max_header_size=65536)
    except (ValueError, SyntaxError, struct.error, EOFError, TypeError, OSError):
        return 0
    if dtype.hasobject:
        return 0  # refused by the decoder (allow_pickle=False)
    count = 1
    for dim in shape:
        count *= int(dim)
    declared = count * dtype.itemsize
    return declared


def _npz_bytes(body: bytes) -> int:
    """Bytes the members of an NPZ archive declare, from each member's NPY header (0 when
    unreadable)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, OSError, ValueError):
        return 0
    with archive:
        members = archive.infolist()
        if len(members) > _MAX_NPZ_MEMBERS:
            raise RequestError(
                413,
                f"the NPZ archive has {len(members)} members, over the limit of "
                f"{_MAX_NPZ_MEMBERS}; send fewer arrays per request",
            )
        total = 0
        for info in members:
            declared = 0
            try:  # only the member's first bytes are inflated: its NPY header
                with archive.open(info) as member:
                    declared = _npy_bytes(io.BytesIO(member.read(65536 + 16)))
            except (
                zipfile.BadZipFile,
                OSError,
                ValueError,
                NotImplementedError,
                RuntimeError,
                EOFError,
            ):
                pass
            # inflating writes file_size bytes; np.load allocates what the header declares: the
            # larger counts
            total += max(info.file_size, declared)
    return total


def _check_image(body: bytes, kind: str, limits: Limits) -> int:
    size = _png_size(body) if body.startswith(_PNG_MAGIC) else _jpeg_size(body)
    if size is None:
        return 0
    width, height = size
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise RequestError(
            413,
            f"the {kind} image is {width}x{height} ({pixels} pixels), over the limit of "
            f"{limits.max_image_pixels} pixels; send a smaller image or raise "
            "TORCHBAY_SERVE_MAX_IMAGE_PIXELS",
        )
    return pixels * 3 * _FLOAT32


def _png_size(body: bytes) -> tuple[int, int] | None:
    if len(body) < 24 or body[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", body[16:24])
    return width, height


def _jpeg_size(body: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame marker of a JPEG."""
    if not body.startswith(b"\xff\xd8"):
        return None
    i, end = 2, len(body)
    while i + 4 <= end:
        if body[i] != 0xFF:
            return None
        marker = body[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", body[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > end:
                return None
            height, width = struct.unpack(">HH", body[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def _check_json_depth(body: bytes, limit: int) -> None:
    """400 when arrays or objects nest deeper than ``limit`` (brackets inside strings count too:
    conservative)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    raw = np.frombuffer(body, dtype=np.uint8)
    steps = ((raw == 0x5B) | (raw == 0x7B)).astype(np.int8) - (
        (raw == 0x5D) | (raw == 0x7D)
    ).astype(np.int8)
    depth = int(np.cumsum(steps, dtype=np.int64).max(initial=0))
    if depth > limit:
        raise RequestError(
            400,
            f"the JSON body nests {depth} levels deep, over the limit of {limit}; send a "
            "flat array of rows or raise TORCHBAY_SERVE_MAX_JSON_DEPTH",
        )


def _separated_values(body: bytes, separator: bytes) -> int:
    return body.count(separator) + 1 if body else 0


class DecodeGate:
    """One large decode at a time in this worker, and its memory handed back to the OS after the
    request."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._lock = threading.Lock()

    @contextmanager
    def admit(self, body_bytes: int, decoded_bytes: int) -> Iterator[bool]:
        """Hold the gate while a large request decodes; yields whether the request counted as
        large."""
        large = max(body_bytes, decoded_bytes) >= self._limits.large_bytes
        if not large:
            yield False
            return
        with self._lock:
            yield True


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list[Callable[[int], int] | None] = []


def _malloc_trim() -> Callable[[int], int] | None:
    if not _TRIM:  # looked up once per process; glibc only
        function = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            function = libc.malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _TRIM.append(function)
    return _TRIM[0]

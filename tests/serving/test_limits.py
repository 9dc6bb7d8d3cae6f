"""agent/serving/limits.py and the worker's request framing: sizes read from headers, never
decoded."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest

from agent.errors import RequestError
from agent.serving.limits import Limits, check_decoded_size
from agent.serving.worker import request_complete

LIMITS = Limits(max_decoded_bytes=1024 * 1024, max_image_pixels=1000 * 1000, max_json_depth=8)


def _npy(shape: tuple, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return out.getvalue() + data


def test_npy_declared_size() -> None:
    array = np.ones((16, 16), dtype=np.float32)
    out = io.BytesIO()
    np.save(out, array)
    assert check_decoded_size(out.getvalue(), "application/x-npy", LIMITS) == array.nbytes
    with pytest.raises(RequestError) as err:
        check_decoded_size(_npy((10**12,)), "application/x-npy", LIMITS)
    assert err.value.status == 413 and "TORCHBAY_SERVE_MAX_DECODED_MB" in err.value.message
    with pytest.raises(RequestError) as err:
        check_decoded_size(
            _npy((1000,), bytes(100)), "application/x-npy", LIMITS
        )  # a header that lies
    assert err.value.status == 400
    assert (
        check_decoded_size(b"not npy", "application/x-npy", LIMITS) == 0
    )  # left to the decoder's 400


def test_npz_members_count_as_declared_or_inflated() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.npy", _npy((512, 1024), bytes(512 * 1024 * 4)))
    with pytest.raises(RequestError) as err:
        check_decoded_size(out.getvalue(), "application/x-npz", LIMITS)
    assert err.value.status == 413 and len(out.getvalue()) < 10_000
    small = io.BytesIO()
    np.savez(small, a=np.ones(4, dtype=np.float32), b=np.ones(4, dtype=np.float32))
    assert 0 < check_decoded_size(small.getvalue(), "application/x-npz", LIMITS) < 1024


def test_image_dimensions_from_headers() -> None:
    png = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
    )
    with pytest.raises(RequestError) as err:
        check_decoded_size(png + bytes(8), "image/png", LIMITS)
    assert err.value.status == 413 and "9000x9000" in err.value.message
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 2000, 3000, 3)  # height 2000, width 3000
    jpeg = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 4) + b"JF" + sof
    with pytest.raises(RequestError) as err:
        check_decoded_size(jpeg, "image/jpeg", LIMITS)
    assert "3000x2000" in err.value.message


def test_json_depth_and_values() -> None:
    assert (
        check_decoded_size(json.dumps([[1, 2], [3, 4]]).encode(), "application/json", LIMITS) == 16
    )
    with pytest.raises(RequestError) as err:
        check_decoded_size(b"[" * 9 + b"1" + b"]" * 9, "application/json", LIMITS)
    assert err.value.status == 400 and "TORCHBAY_SERVE_MAX_JSON_DEPTH" in err.value.message
    with pytest.raises(RequestError) as err:
        check_decoded_size(b"[" + b"0," * 300_000 + b"0]", "application/json", LIMITS)
    assert err.value.status == 413
    with pytest.raises(RequestError):
        check_decoded_size(b"0,0\n" * 200_000, "text/csv", LIMITS)


@pytest.mark.parametrize(
    "data,done",
    [
        (b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET /ping HTTP/1.1\r\nHo", False),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345", False),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n1234567890", True),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            True,
        ),  # over the payload limit: answered 413
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", False),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
        (b"x" * 70_000, True),  # no end of headers in 64 KiB: gunicorn's parser answers 431
    ],
)
def test_request_complete(data: bytes, done: bool) -> None:
    assert request_complete(data, max_body=1024 * 1024)[0] is done

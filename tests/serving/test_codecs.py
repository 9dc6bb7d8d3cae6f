"""JSON decoding: the fast parser (orjson) and the stdlib fallback agree, errors stay 400."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent.errors import RequestError
from agent.serving import codecs


def test_json_body_decodes_to_the_same_float32_as_the_stdlib() -> None:
    rows = (
        np.random.default_rng(0).random((2, 784)).tolist()
    )  # 17-digit floats, as clients send them
    body = json.dumps(rows).encode()
    got = codecs.decode(body, "application/json; charset=utf-8")
    assert got.dtype == np.float32 and got.shape == (2, 784)
    assert np.array_equal(got, np.asarray(json.loads(body), dtype=np.float32))


def test_json_nan_and_infinity_still_accepted() -> (
    None
):  # orjson refuses them; the fallback takes them
    got = codecs.decode(b"[[NaN, Infinity, -Infinity, 1.5]]", "application/json")
    assert (
        math.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == -np.inf and got[0, 3] == 1.5
    )


@pytest.mark.parametrize(
    "body, words",
    [
        (b"[[1, 2,", "JSON"),
        (b"[[1, 2], [3]]", "rectangular"),
        (b"\xff\xfe", "JSON"),
        (b"3", "single number"),
    ],
)
def test_bad_json_is_400(body: bytes, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        codecs.decode(body, "application/json")
    assert caught.value.status == 400 and words in caught.value.message


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32),
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array([True, False]),
        np.random.default_rng(1).standard_normal((8, 6))[:, ::2],  # not contiguous: the stdlib path
        np.array(
            [1.0, float("nan"), float("inf")], dtype=np.float32
        ),  # orjson would write null: the stdlib path
        np.array([0.5, 1.5], dtype=np.float16),  # a dtype orjson does not take
    ],
)
def test_json_output_says_what_the_stdlib_would(array: np.ndarray) -> None:
    got = json.loads(codecs.encode(array, "application/json"))
    want = json.loads(json.dumps(array.tolist()))
    assert np.asarray(got).shape == array.shape
    np.testing.assert_array_equal(
        np.asarray(got, dtype=array.dtype), np.asarray(want, dtype=array.dtype)
    )

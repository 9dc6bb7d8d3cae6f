"""The sagemaker_inference stand-in: content types, decoder, encoder, errors, the default
handler."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from agent.shims import install


@pytest.fixture
def si() -> Iterator[Any]:
    import importlib
    import sys

    install()
    for name in [
        m for m in sys.modules if m.split(".")[0] in ("sagemaker_inference", "_torchbay_toolkit")
    ]:
        del sys.modules[name]
    module = importlib.import_module("sagemaker_inference")
    if not getattr(module, "__torchbay_shim__", False):
        pytest.skip("the real sagemaker-inference is installed here")

    yield module


def test_content_types(si: Any) -> None:
    ct = si.content_types
    assert (ct.JSON, ct.CSV, ct.NPY, ct.NPZ, ct.OCTET_STREAM, ct.ANY) == (
        "application/json",
        "text/csv",
        "application/x-npy",
        "application/x-npz",
        "application/octet-stream",
        "*/*",
    )
    assert ct.UTF8_TYPES == [ct.JSON, ct.CSV]


def test_decode(si: Any) -> None:
    d, ct = si.decoder, si.content_types
    assert d.decode("[[1, 2], [3, 4]]", ct.JSON).tolist() == [[1, 2], [3, 4]]
    assert d.decode(b"[1.5]", ct.JSON).dtype == np.float64
    assert d.decode("1,2\n3,4\n", ct.CSV).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    buffer = io.BytesIO()
    np.save(buffer, np.arange(6, dtype=np.int32).reshape(2, 3))
    assert d.decode(buffer.getvalue(), ct.NPY).tolist() == [[0, 1, 2], [3, 4, 5]]
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # no pickles from a request body
        d.decode(buffer.getvalue(), ct.NPY)
    with pytest.raises(si.errors.UnsupportedFormatError) as err:
        d.decode(b"x", "text/plain")
    assert "text/plain" in str(err.value) and err.value.status_code == 415


def test_encode(si: Any) -> None:
    e, ct = si.encoder, si.content_types

    class TensorLike:
        def tolist(self) -> list:
            return [0.5, 1.5]

    assert json.loads(e.encode({"y": TensorLike(), "z": np.array([1, 2])}, ct.JSON)) == {
        "y": [0.5, 1.5],
        "z": [1, 2],
    }
    assert e.encode(np.array([[1, 2], [3, 4]]), ct.CSV) == "1,2\n3,4\n"
    assert np.load(io.BytesIO(e.encode([1.0, 2.0], ct.NPY))).tolist() == [1.0, 2.0]
    assert {ct.JSON, ct.CSV, ct.NPY} == e.SUPPORTED_CONTENT_TYPES
    with pytest.raises(si.errors.UnsupportedFormatError) as err:
        e.encode([1], "image/png")
    assert err.value.status_code == 406


def test_errors(si: Any) -> None:
    err = si.errors.GenericInferenceToolkitError(422)
    assert (err.status_code, err.message, err.phrase) == (422, "Invalid Request", "Invalid Request")
    assert isinstance(err, si.errors.BaseInferenceToolkitError)
    assert err.args == (422, "Invalid Request", "Invalid Request")
    base = si.errors.BaseInferenceToolkitError(409, "busy", "Conflict")
    assert (base.status_code, base.message, base.phrase) == (409, "busy", "Conflict")


def test_default_handler(si: Any) -> None:
    handler = si.default_inference_handler.DefaultInferenceHandler()
    assert handler.default_input_fn("[1, 2]", "application/json").tolist() == [1, 2]
    body, content_type = handler.default_output_fn([3], "text/html, application/json")
    assert (body, content_type) == ("[3]", "application/json")
    with pytest.raises(NotImplementedError):
        handler.default_model_fn("/nowhere")
    with pytest.raises(si.errors.UnsupportedFormatError):
        handler.default_output_fn([3], "text/html")

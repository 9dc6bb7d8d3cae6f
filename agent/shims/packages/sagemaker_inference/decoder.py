"""``decode(obj, content_type)``: a request body to a numpy array, as sagemaker-inference's decoder
does.

JSON -> ``np.array(json.loads(...))``, CSV -> ``np.genfromtxt(..., delimiter=",")``, NPY ->
``np.load``, NPZ -> a scipy sparse matrix (scipy needed). One difference, on purpose: NPY is loaded
with ``allow_pickle=False``, so a request body cannot run code in the server.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sagemaker_inference import content_types, errors

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["decode"]

# A request body as the server hands it over (text or raw bytes).
_Body = str | bytes | bytearray | memoryview


def _text(data: _Body) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8")
    return data


# numpy is imported on the first request, not with the module: importing the toolkit names from a
# training script must not pull numpy in (tests/shims/test_training.py checks it).
def _json_to_numpy(string_like: _Body, dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    import numpy as np

    return np.array(json.loads(_text(string_like)), dtype=dtype)


def _csv_to_numpy(string_like: _Body, dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    import numpy as np

    return np.genfromtxt(io.StringIO(_text(string_like)), dtype=dtype, delimiter=",")


def _npy_to_numpy(npy_array: bytes) -> Any:
    """The array ``np.load`` reads (typed ``Any`` by numpy: an .npz archive gives a mapping)."""
    import numpy as np

    return np.load(io.BytesIO(npy_array), allow_pickle=False)


def _npz_to_sparse(npz_bytes: bytes) -> Any:
    import scipy.sparse  # optional: NPZ only

    return scipy.sparse.load_npz(io.BytesIO(npz_bytes))


_decoder_map: dict[str, Callable[[Any], Any]] = {
    content_types.NPY: _npy_to_numpy,
    content_types.CSV: _csv_to_numpy,
    content_types.JSON: _json_to_numpy,
    content_types.NPZ: _npz_to_sparse,
}


def decode(obj: _Body, content_type: str) -> Any:
    """Decode ``obj`` (str or bytes) of ``content_type``: a numpy array (a scipy sparse matrix for
    NPZ); UnsupportedFormatError for any other type."""
    decoder = _decoder_map.get(content_type)
    if decoder is None:
        raise errors.UnsupportedFormatError(content_type, status_code=415)
    return decoder(obj)

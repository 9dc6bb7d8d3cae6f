"""``decode(obj, content_type)``: a request body to a numpy array, as sagemaker-inference's decoder
does.

JSON -> ``np.array(json.loads(...))``, CSV -> ``np.genfromtxt(..., delimiter=",")``, NPY ->
``np.load``,
NPZ -> a scipy sparse matrix (scipy needed). One difference, on purpose: NPY is loaded with
``allow_pickle=False``, so a request body cannot run code in the server.
"""

import io
import json

from sagemaker_inference import content_types, errors

__all__ = ["decode"]


def _text(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8")
    return data


def _json_to_numpy(string_like, dtype=None):
    import numpy as np

    return np.array(json.loads(_text(string_like)), dtype=dtype)


def _csv_to_numpy(string_like, dtype=None):
    import numpy as np

    return np.genfromtxt(io.StringIO(_text(string_like)), dtype=dtype, delimiter=",")


def _npy_to_numpy(npy_array):
    import numpy as np

    return np.load(io.BytesIO(npy_array), allow_pickle=False)


def _npz_to_sparse(npz_bytes):
    import scipy.sparse

    return scipy.sparse.load_npz(io.BytesIO(npz_bytes))


_decoder_map = {
    content_types.NPY: _npy_to_numpy,
    content_types.CSV: _csv_to_numpy,
    content_types.JSON: _json_to_numpy,
    content_types.NPZ: _npz_to_sparse,
}


def decode(obj, content_type):
    """Decode ``obj`` (str or bytes) of ``content_type``; UnsupportedFormatError for any other type."""
    decoder = _decoder_map.get(content_type)
    if decoder is None:
        raise errors.UnsupportedFormatError(content_type, status_code=415)
    return decoder(obj)

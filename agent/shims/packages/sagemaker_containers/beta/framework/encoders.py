"""``sagemaker_containers.beta.framework.encoders``: ``decode``/``encode`` and the array converters.

The same codecs as ``sagemaker_inference.decoder``/``encoder`` (NPY without pickles).
"""

from _torchbay_toolkit.missing import missing as _missing

__all__ = [
    "UnsupportedFormatError",
    "array_to_csv",
    "array_to_json",
    "array_to_npy",
    "csv_to_numpy",
    "decode",
    "encode",
    "json_to_numpy",
    "npy_to_numpy",
]


def _codecs():
    from sagemaker_inference import decoder, encoder

    return decoder, encoder


def decode(obj, content_type):
    """A request body of ``content_type`` as a numpy array."""
    return _codecs()[0].decode(obj, content_type)


def encode(array_like, content_type):
    """``array_like`` encoded as ``content_type``."""
    return _codecs()[1].encode(array_like, content_type)


def json_to_numpy(string_like, dtype=None):
    return _codecs()[0]._json_to_numpy(string_like, dtype)


def csv_to_numpy(string_like, dtype=None):
    return _codecs()[0]._csv_to_numpy(string_like, dtype)


def npy_to_numpy(npy_array):
    return _codecs()[0]._npy_to_numpy(npy_array)


def array_to_json(array_like):
    return _codecs()[1]._array_to_json(array_like)


def array_to_csv(array_like):
    return _codecs()[1]._array_to_csv(array_like)


def array_to_npy(array_like):
    return _codecs()[1]._array_to_npy(array_like)


def __getattr__(name):
    if name == "UnsupportedFormatError":
        from sagemaker_inference.errors import UnsupportedFormatError

        return UnsupportedFormatError
    _missing(__name__, name, "sagemaker-containers")

"""``sagemaker_containers.beta.framework.encoders``: ``decode``/``encode`` and the array converters.

The same codecs as ``sagemaker_inference.decoder``/``encoder`` (NPY without pickles), and the same
``UnsupportedFormatError`` they raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from _torchbay_toolkit.missing import missing as _missing
from sagemaker_inference.errors import UnsupportedFormatError

if TYPE_CHECKING:
    import numpy.typing as npt

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

# The codec modules are imported on the first call, not with this one: a real installed
# sagemaker-inference imports numpy and scipy at the top of its decoder, and importing
# sagemaker_containers.beta.framework from a training script must stay cheap.


def decode(obj: str | bytes, content_type: str) -> Any:
    """A request body of ``content_type`` as a numpy array."""
    from sagemaker_inference import decoder

    return decoder.decode(obj, content_type)


def encode(array_like: Any, content_type: str) -> str | bytes:
    """``array_like`` encoded as ``content_type``."""
    from sagemaker_inference import encoder

    return encoder.encode(array_like, content_type)


def json_to_numpy(string_like: str | bytes, dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    from sagemaker_inference import decoder

    return decoder._json_to_numpy(string_like, dtype)


def csv_to_numpy(string_like: str | bytes, dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    from sagemaker_inference import decoder

    return decoder._csv_to_numpy(string_like, dtype)


def npy_to_numpy(npy_array: bytes) -> Any:
    from sagemaker_inference import decoder

    return decoder._npy_to_numpy(npy_array)


def array_to_json(array_like: Any) -> str:
    from sagemaker_inference import encoder

    return encoder._array_to_json(array_like)


def array_to_csv(array_like: Any) -> str:
    from sagemaker_inference import encoder

    return encoder._array_to_csv(array_like)


def array_to_npy(array_like: Any) -> bytes:
    from sagemaker_inference import encoder

    return encoder._array_to_npy(array_like)


def __getattr__(name: str) -> NoReturn:
    _missing(__name__, name, "sagemaker-containers")

"""``encode(array_like, content_type)``: a prediction to bytes or text, as sagemaker-inference's
encoder does.

JSON via ``json.dumps`` (anything with ``tolist()``, numpy arrays and torch tensors included,
becomes a list), CSV via ``np.savetxt(delimiter=",", fmt="%s")``, NPY via ``np.save``. A prediction
is whatever the user's predict_fn returned, so it is typed ``Any``.
"""

import io
import json
from collections.abc import Callable
from typing import Any

from sagemaker_inference import content_types, errors

__all__ = ["SUPPORTED_CONTENT_TYPES", "encode"]


def _array_to_json(array_like: Any) -> str:
    def default(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        return json.JSONEncoder().default(value)

    return json.dumps(array_like, default=default)


# numpy is imported on the first reply, not with the module (see decoder.py).
def _array_to_npy(array_like: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array_like)
    return buffer.getvalue()


def _array_to_csv(array_like: Any) -> str:
    import numpy as np

    stream = io.StringIO()
    np.savetxt(stream, array_like, delimiter=",", fmt="%s")
    return stream.getvalue()


_encoder_map: dict[str, Callable[[Any], str | bytes]] = {
    content_types.NPY: _array_to_npy,
    content_types.CSV: _array_to_csv,
    content_types.JSON: _array_to_json,
}

SUPPORTED_CONTENT_TYPES = set(_encoder_map)


def encode(array_like: Any, content_type: str) -> str | bytes:
    """Encode ``array_like`` as ``content_type``; UnsupportedFormatError (406) for another type."""
    encoder = _encoder_map.get(content_type)
    if encoder is None:
        raise errors.UnsupportedFormatError(content_type, status_code=406)
    return encoder(array_like)

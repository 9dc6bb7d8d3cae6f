"""Request bodies to arrays and predictions to response bodies, by media type, as SageMaker does.

In: JSON, CSV, NPY (never unpickled), NPZ and images (JPEG/PNG through torchvision or Pillow).
Out: JSON, CSV and NPY, chosen from ``Accept`` with q-values honoured. Every failure is a
RequestError carrying the HTTP status the client gets (400, 406, 415).
"""

from __future__ import annotations

import importlib
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agent.errors import RequestError

__all__ = [
    "CSV",
    "DECODABLE",
    "ENCODABLE",
    "JPEG",
    "JSON",
    "NPY",
    "NPZ",
    "PNG",
    "decode",
    "encode",
    "image_support",
    "media_type",
    "negotiate",
]

JSON = "application/json"
CSV = "text/csv"
NPY = "application/x-npy"
NPZ = "application/x-npz"
JPEG = "image/jpeg"
PNG = "image/png"

DECODABLE = (JSON, CSV, NPY, NPZ, JPEG, PNG)
ENCODABLE = (JSON, CSV, NPY)
_UTF8_TYPES = (JSON, CSV)


def media_type(header: str | None) -> str:
    """``type/subtype`` of a Content-Type or Accept element, lower case, parameters dropped."""
    return (header or "").split(";", 1)[0].strip().lower()


def image_support() -> str | None:
    """``torchvision`` or ``pillow`` when an image decoder is installed, else None."""
    try:
        importlib.import_module("torchvision.io")

        return "torchvision"
    except ImportError:
        pass
    try:
        import PIL.Image  # noqa: F401

        return "pillow"
    except ImportError:
        return None


def decode(body: bytes, content_type: str) -> Any:
    """The body as a numpy array (a tuple of arrays for a multi-array NPZ).

    JSON and CSV become float32 (as the SageMaker PyTorch toolkit makes FloatTensors); NPY and
    NPZ keep their dtype; images become float32 ``1 x C x H x W`` scaled to 0..1.
    """
    kind = media_type(content_type)
    if kind == JSON:
        return _decode_json(body)
    if kind == CSV:
        return _decode_csv(body)
    if kind == NPY:
        return _decode_npy(body)
    if kind == NPZ:
        return _decode_npz(body)
    if kind in (JPEG, PNG):
        return _decode_image(body, kind)
    raise RequestError(
        415, f"Content-Type {content_type!r} is not supported; send one of {', '.join(DECODABLE)}"
    )


def _decode_json(body: bytes) -> np.ndarray:
    try:
        data = _fast_loads(body)
    except (
        ValueError
    ):  # orjson is strict (no NaN/Infinity): the stdlib decides, and words the error
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(
                400, f"body is not valid JSON ({err}); send a JSON array of numbers"
            ) from None
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise RequestError(
            400,
            f"JSON body is not a rectangular array of numbers ({_short(err)}); send e.g. [[0.1, "
            "0.2], [0.3, 0.4]]",
        ) from None
    if array.ndim == 0:
        raise RequestError(400, "JSON body is a single number; send an array of numbers")
    return array


def _stdlib_loads(body: bytes) -> Any:
    return json.loads(body)


def _orjson() -> Any:
    try:
        import orjson  # optional (a faster JSON parser); called once, at import
    except ImportError:
        return None
    return orjson


_ORJSON = _orjson()
# orjson.loads when installed (its float parser is ~10x faster on a 1x784 body), else json.loads.
_fast_loads = _ORJSON.loads if _ORJSON is not None else _stdlib_loads


def _dumps_array(array: np.ndarray) -> bytes:
    """JSON of a numeric array: orjson straight from the buffer (no Python floats; ~15x faster on
    1,000 values)
    when it can say the same thing as ``json.dumps(array.tolist())``, else that."""
    if (
        _ORJSON is not None
        and array.ndim
        and array.dtype.kind in "biuf"
        and array.flags.c_contiguous
        and (array.dtype.kind != "f" or bool(np.isfinite(array).all()))
    ):  # orjson writes NaN as null
        try:
            encoded: bytes = _ORJSON.dumps(array, option=_ORJSON.OPT_SERIALIZE_NUMPY)
            return encoded
        except TypeError:  # a dtype orjson does not take (float16, big-endian): the stdlib path
            pass
    return json.dumps(array.tolist()).encode()


def _decode_csv(body: bytes) -> np.ndarray:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "CSV body is not UTF-8 text") from None
    if not text.strip():
        raise RequestError(400, "CSV body is empty; send one row of numbers per line")
    try:
        return np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as err:
        raise RequestError(
            400,
            f"CSV body is not rows of numbers with the same length ({_short(err)}); send e.g. "
            "'1,2,3\\n4,5,6'",
        ) from None


def _decode_npy(body: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as err:
        raise RequestError(
            400,
            f"NPY body cannot be read without unpickling ({_short(err)}); send a numeric array "
            "saved with np.save",
        ) from None
    except (OSError, EOFError) as err:
        raise RequestError(
            400, f"body is not an NPY array ({_short(err)}); write it with np.save"
        ) from None
    if not isinstance(array, np.ndarray):
        raise RequestError(400, "body is an NPZ archive, not NPY; send it as application/x-npz")
    return array


def _decode_npz(body: bytes) -> Any:
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise RequestError(
                    400, "body is an NPY array, not NPZ; send it as application/x-npy"
                )
            arrays = tuple(archive[name] for name in archive.files)
    except RequestError:
        raise
    except (ValueError, OSError, EOFError, KeyError) as err:
        raise RequestError(
            400,
            f"body is not an NPZ archive of numeric arrays ({_short(err)}); write it with np.savez",
        ) from None
    if not arrays:
        raise RequestError(400, "NPZ body holds no arrays")
    return arrays[0] if len(arrays) == 1 else arrays


def _decode_image(body: bytes, kind: str) -> np.ndarray:
    support = image_support()
    if support is None:
        raise RequestError(
            415, f"{kind} needs Pillow or torchvision in the image; install one, or send NPY"
        )
    if support == "torchvision":
        vision_io = importlib.import_module("torchvision.io")  # optional: no stubs needed
        try:
            tensor = vision_io.decode_image(
                torch.frombuffer(bytearray(body), dtype=torch.uint8),
                mode=vision_io.ImageReadMode.RGB,
            )
        except RuntimeError as err:
            raise RequestError(
                400, f"body is not a readable {kind} image ({_short(err)})"
            ) from None
        decoded: np.ndarray = (tensor.unsqueeze(0).float() / 255.0).numpy()
        return decoded
    from PIL import Image, UnidentifiedImageError  # Pillow: optional, only for image bodies

    try:
        with Image.open(io.BytesIO(body)) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RequestError(400, f"body is not a readable {kind} image ({_short(err)})") from None
    scaled: np.ndarray = (pixels.transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
    return scaled


def negotiate(accept: str | None, default: str, supported: Sequence[str] = ENCODABLE) -> str:
    """The response type for an ``Accept`` header: highest q first, then header order.

    No header, or one that takes anything (``*/*``), gives ``default``. Raises RequestError 406
    when nothing acceptable is supported.
    """
    if not accept or not accept.strip():
        return default
    choices = []
    for order, element in enumerate(accept.split(",")):
        kind = media_type(element)
        if not kind:
            continue
        quality = 1.0
        for param in element.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            choices.append((-quality, order, kind))
    for _, _, kind in sorted(choices):
        if kind == "*/*":
            return default
        if kind.endswith("/*"):
            prefix = kind[:-1]
            if default.startswith(prefix) and default in supported:
                return default
            for candidate in supported:
                if candidate.startswith(prefix):
                    return candidate
        elif kind in supported:
            return kind
    raise RequestError(
        406,
        f"Accept {accept!r} names no type this model returns; accept one of {', '.join(supported)}",
    )


def encode(prediction: Any, accept: str) -> bytes:
    """``prediction`` (tensor, array, list or number) as ``accept`` (JSON, CSV or NPY)."""
    kind = media_type(accept)
    array = _to_numpy(prediction)
    if kind == JSON:
        if array is None:
            return json.dumps(prediction).encode()
        return _dumps_array(array)
    if array is None:
        raise RequestError(
            406, f"the prediction is not an array, so it cannot be sent as {kind}; accept {JSON}"
        )
    if kind == CSV:
        rows = array.reshape(1, -1) if array.ndim <= 1 else array.reshape(array.shape[0], -1)
        out = io.StringIO()
        for row in rows.tolist():
            out.write(
                ",".join(repr(value) if isinstance(value, float) else str(value) for value in row)
            )
            out.write("\n")
        return out.getvalue().encode()
    if kind == NPY:
        out_bytes = io.BytesIO()
        np.save(out_bytes, array, allow_pickle=False)
        return out_bytes.getvalue()
    raise RequestError(
        406, f"cannot encode a prediction as {kind}; accept one of {', '.join(ENCODABLE)}"
    )


def _to_numpy(prediction: Any) -> np.ndarray | None:
    if isinstance(prediction, np.ndarray):
        return prediction
    detach = getattr(prediction, "detach", None)
    if detach is not None:  # a torch tensor (or anything shaped like one)
        values: np.ndarray = detach().cpu().numpy()
        return values
    if isinstance(prediction, (list, tuple, int, float)):
        try:
            array = np.asarray(prediction)
        except ValueError:
            return None
        return array if array.dtype != object else None
    return None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:200]

"""The model and the user's hooks, called exactly as the SageMaker PyTorch inference toolkit calls
them.

By default the model file in ``<model>/`` (an AOTInductor package, a ``torch.export`` program or a
TorchScript model; see :mod:`agent.serving.formats`) is loaded for inference and called under
``torch.inference_mode()``. When ``<model>/code/<program>`` exists, its
``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn`` or ``transform_fn`` replace the defaults;
each may take a trailing ``context`` argument, detected by its parameter count.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.errors import ModelLoadError, RequestError
from agent.serving import codecs
from agent.serving.formats import (
    AOTI,
    EAGER,
    EXPORT,
    BatchRange,
    Loaded,
    choose_model_file,
    load_model_file,
    program_inputs,
)
from agent.shims import install as install_toolkit_shims

__all__ = ["Context", "ModelHandler", "find_model_file"]

_HOOKS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn", "model_warmup_fn")
# Messages of torch errors that mean "the input has the wrong shape or type", answered 400.
_SHAPE_ERROR = re.compile(
    r"shape|size|dimension|dtype|scalar type|channels|expected .*input|must match|out of range",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Context:
    """What a hook's optional ``context`` argument gets (the fields SageMaker's handlers read)."""

    model_dir: str
    gpu_id: int | None = None
    batch_size: int = 1
    system_properties: Mapping[str, Any] = field(default_factory=dict)


def find_model_file(model_dir: Path, choice: str | None = None) -> Path:
    """The model file to serve in ``model_dir`` (``choice``: a file name or a format; see
    :func:`agent.serving.formats.choose_model_file`); ModelLoadError when there is none or it is
    ambiguous."""
    return choose_model_file(Path(model_dir), choice)[0]


def _arity_call(func: Callable[..., Any], context: Context) -> Callable[..., Any]:
    """A caller that adds ``context`` when ``func`` takes one argument more than it is given."""
    try:
        count = len(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return func

    def call(*args: Any) -> Any:
        if count == len(args) + 1:
            return func(*args, context)
        return func(*args)

    return call


class ModelHandler:
    """Loads the model once and turns request bodies into responses through the hooks."""

    def __init__(
        self,
        model_dir: Path,
        code_dir: Path,
        program: str,
        *,
        default_accept: str,
        device: str = "cpu",
        gpu_id: int | None = None,
        batch_size: int = 1,
        log: logging.Logger | None = None,
        model_file: str | None = None,
        compile_program: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.code_dir = Path(code_dir)
        self.program = program
        self.default_accept = default_accept
        self.device = device
        self.context = Context(
            str(model_dir),
            gpu_id,
            batch_size,
            {
                "model_dir": str(model_dir),
                "gpu_id": gpu_id,
                "batch_size": batch_size,
                "server_name": "torchbay",
            },
        )
        self._log = log or logging.getLogger("torchbay.serve")
        self._user: dict[str, Callable[..., Any]] = {}
        self.model: Any = None
        self.loaded = False
        self.model_file = model_file  # TORCHBAY_SERVE_MODEL_FILE: a file name or a format
        self.compile_program = compile_program
        self.format: str | None = (
            None  # aoti, export, torchscript, eager (None: a transform_fn's own)
        )
        self.batch: BatchRange | None = None  # the batch sizes the model takes (None: unknown)
        self.shares_weights = True
        self._example: tuple[Any, ...] | None = None
        self._batch_logged = False

    # --- loading -----------------------------------------------------------------------------
    def use_gpu(self, gpu_id: int) -> None:
        """Serve on ``cuda:<gpu_id>`` (call in the worker, before load)."""
        self.device = f"cuda:{gpu_id}"
        props = dict(self.context.system_properties, gpu_id=gpu_id)
        self.context = Context(self.context.model_dir, gpu_id, self.context.batch_size, props)

    @property
    def user_module(self) -> Path | None:
        name = self.program if self.program.endswith(".py") else self.program + ".py"
        path = self.code_dir / name
        return path if path.is_file() else None

    @property
    def has_transform(self) -> bool:
        return "transform_fn" in self._user

    @property
    def custom_input(self) -> bool:
        return "input_fn" in self._user

    @property
    def custom_output(self) -> bool:
        return "output_fn" in self._user

    def load(self) -> None:
        """Import the user's hooks (if any) and load the model; raises ModelLoadError with the
        reason."""
        self._import_hooks()
        try:
            if "model_fn" in self._user:
                self.model = self._user["model_fn"](str(self.model_dir))
            else:
                self.model = self._default_model_fn()
        except ModelLoadError:
            raise
        except (
            Exception
        ) as err:  # the user's model_fn: any failure is a load failure, logged with its traceback
            self._log.exception("model_fn failed")
            raise ModelLoadError(
                f"loading the model from {self.model_dir} failed: {_short(err)}"
            ) from err
        if self.model is None and not self.has_transform:
            raise ModelLoadError(
                f"model_fn in {self.user_module} returned None; return the loaded model"
            )
        if "model_fn" in self._user and self.model is not None:
            self.model = self._adopt_user_model(self.model)
        if (
            self.batch is not None
            and self.batch.low == self.batch.high
            and self.context.batch_size > 1
        ):
            self._log.info(
                "the model takes a %s only: dynamic batching (batch size %d) is off, requests run "
                "one "
                "by one; export it with a dynamic batch dimension (torchbay export) to batch",
                self.batch.describe(),
                self.context.batch_size,
            )
        self.loaded = True

    @property
    def batchable(self) -> bool:
        """Whether requests may be joined along dim 0 (False for a model with a static batch)."""
        return self.batch is None or self.batch.low != self.batch.high

    def warm_up(self) -> None:
        """Run the user's ``model_warmup_fn(model_dir, model)`` if there is one, else one forward()
        of an input
        the model declares (a batch of one, and a full batch where batching is on), so first
        requests are not
        slow and a torch.compile'd program is compiled here (before the fork, with preload)."""
        if "model_warmup_fn" in self._user:
            self._user["model_warmup_fn"](str(self.model_dir), self.model)
            return
        if self._example is None or "predict_fn" in self._user or self.model is None:
            return
        examples = [self._example]
        rows = self.context.batch_size
        if (
            rows > 1
            and self.batch is not None
            and self.batch.accepts(rows)
            and self.batch.low != rows
        ):
            examples.append(
                tuple(torch.cat([t] * rows) if i == 0 else t for i, t in enumerate(self._example))
            )
        started = time.monotonic()
        try:
            with torch.inference_mode():
                for example in examples:
                    self.model(*example)
        except Exception as err:  # the model's own failure on its declared input: a load failure
            self._log.exception("warm-up failed")
            raise ModelLoadError(
                f"the model failed on an input of the shape it declares: {_short(err)}"
            ) from err
        what = (
            "compile and warm-up" if self.compile_program and self.format == EXPORT else "warm-up"
        )
        self._log.info(
            "%s: %d forward() in %.2f s (input %s)",
            what,
            len(examples),
            time.monotonic() - started,
            ", ".join(str(tuple(t.shape)) for t in examples[-1]),
        )

    def _adopt_user_model(self, model: Any) -> Any:
        """What ``model_fn`` returned, made ready: an ExportedProgram runs through ``.module()``; an
        eager
        ``nn.Module`` goes to eval mode and this worker's device."""
        if isinstance(model, torch.export.ExportedProgram):
            self.batch, self._example = program_inputs(model)
            self.format = EXPORT
            module = model.module()
            return module.to(self.device) if self.device != "cpu" else module
        if isinstance(model, torch.nn.Module):
            self.format = EAGER
            try:
                model.eval()
            except (
                NotImplementedError,
                RuntimeError,
            ):  # an exported module: its mode was fixed by export
                pass
            if self.device != "cpu" and "predict_fn" not in self._user:
                model = model.to(self.device)
        return model

    def _import_hooks(self) -> None:
        path = self.user_module
        if path is None:
            return
        code_dir = str(self.code_dir)
        if code_dir not in sys.path:
            sys.path.insert(0, code_dir)
        # sagemaker_inference & co. for the module, unless the real ones are installed
        install_toolkit_shims()
        name = path.stem
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as err:  # the user's module: any import failure is a load failure
            self._log.exception("importing %s failed", path)
            raise ModelLoadError(
                f"importing {path} failed: {_short(err)}; fix the module or its requirements.txt"
            ) from err
        self._user = {
            hook: _arity_call(getattr(module, hook), self.context)
            for hook in _HOOKS
            if callable(getattr(module, hook, None))
        }
        if self.has_transform and {"input_fn", "predict_fn", "output_fn"} & set(self._user):
            raise ModelLoadError(
                f"{path} defines transform_fn and also input_fn/predict_fn/output_fn; keep one or "
                "the other "
                "(as the SageMaker toolkit requires)"
            )
        self._log.info("using hooks from %s: %s", path, ", ".join(sorted(self._user)) or "none")

    def _default_model_fn(self) -> Any:
        path, fmt = choose_model_file(self.model_dir, self.model_file, self._log)
        loaded: Loaded = load_model_file(
            path, fmt, self.device, compile_program=self.compile_program, log=self._log
        )
        self.format, self.batch, self._example = loaded.format, loaded.batch, loaded.example
        self.shares_weights = loaded.shares_weights
        return loaded.model

    # --- requests ----------------------------------------------------------------------------
    def check_accept(self, accept: str | None) -> str:
        """The accept value hooks get; 406 early when the default encoder cannot satisfy it."""
        if self.custom_output or self.has_transform:
            return (
                accept
                if accept and accept.strip() and accept.strip() != "*/*"
                else self.default_accept
            )
        return codecs.negotiate(accept, self.default_accept)

    def input(self, body: bytes, content_type: str) -> tuple[Any, Hashable | None]:
        """The model input for a body, and a key: inputs with equal keys can be batched (None:
        never)."""
        if "input_fn" in self._user:
            data = _user_call(
                self._user["input_fn"],
                _hook_payload(body, content_type),
                content_type,
                stage="input_fn",
                client_errors=True,
            )
        else:
            data = _to_tensor(codecs.decode(body, content_type))
        return data, _batch_key(data)

    def predict(self, data: Any) -> Any:
        """One prediction (no batching)."""
        if "predict_fn" in self._user:
            return _user_call(self._user["predict_fn"], data, self.model, stage="predict_fn")
        return self._default_predict(data)

    def predict_batch(self, inputs: Sequence[Any]) -> list[Any] | None:
        """Predictions for inputs joined along dim 0, split back by rows; None when the output
        cannot be split."""
        rows = [int(item.shape[0]) for item in inputs]
        if self.batch is not None and not self.batch.accepts(sum(rows)):
            if not self._batch_logged:
                self._batch_logged = True
                self._log.info(
                    "the model takes a %s: a batch of %d rows runs request by request "
                    "(logged once)",
                    self.batch.describe(),
                    sum(rows),
                )
            return [self.predict(item) for item in inputs]
        joined = torch.cat(list(inputs), dim=0)
        output = self.predict(joined)
        if (
            not isinstance(output, torch.Tensor)
            or output.dim() == 0
            or int(output.shape[0]) != sum(rows)
        ):
            return None
        return list(torch.split(output, rows, dim=0))

    def output(self, prediction: Any, accept: str) -> tuple[bytes, str]:
        """The response body and its Content-Type."""
        if "output_fn" in self._user:
            result = _user_call(self._user["output_fn"], prediction, accept, stage="output_fn")
            return _body_and_type(result, accept)
        return codecs.encode(prediction, accept), accept

    def transform(self, body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        """The whole request through the user's ``transform_fn``."""
        payload = _hook_payload(body, content_type)
        result = _user_call(
            self._user["transform_fn"],
            self.model,
            payload,
            content_type,
            accept,
            stage="transform_fn",
            client_errors=True,
        )
        return _body_and_type(result, accept)

    def _default_predict(self, data: Any) -> Any:
        inputs = data if isinstance(data, tuple) else (data,)
        if self.format == AOTI and self._example is not None:
            _check_inputs(inputs, self._example, self.batch)
        if self.device != "cpu":
            inputs = tuple(item.to(self.device) for item in inputs)
        try:
            with torch.inference_mode():
                output = self.model(*inputs)
        except (
            RuntimeError,
            AssertionError,
        ) as err:  # AssertionError: an exported program's shape guards
            raise _classify_model_error(err) from err
        if isinstance(output, torch.Tensor) and output.device.type != "cpu":
            output = output.cpu()
        return output


def _check_inputs(inputs: Sequence[Any], example: Sequence[Any], batch: BatchRange | None) -> None:
    """400 unless ``inputs`` match the shapes and dtypes a compiled package was built for (its
    kernels do not
    check them all)."""

    def shape(t: Any, rows: str = "N") -> str:
        dims = (
            [rows] + [str(d) for d in t.shape[1:]]
            if batch is not None and batch.low != batch.high
            else [str(d) for d in t.shape]
        )
        return f"({', '.join(dims)}) {str(t.dtype).replace('torch.', '')}"

    ok = len(inputs) == len(example)
    for got, want in zip(inputs, example, strict=False):
        if not ok:
            break
        fixed = 1 if batch is not None and batch.low != batch.high else 0
        ok = (
            getattr(got, "dtype", None) == want.dtype
            and got.dim() == want.dim()
            and tuple(got.shape[fixed:]) == tuple(want.shape[fixed:])
        )
    if not ok:
        wanted = "; ".join(shape(t) for t in example)
        seen = "; ".join(
            f"({', '.join(str(d) for d in getattr(t, 'shape', ()))}) "
            f"{str(getattr(t, 'dtype', type(t).__name__)).replace('torch.', '')}"
            for t in inputs
        )
        raise RequestError(
            400,
            f"the model rejected the input: it takes {wanted}, got {seen}; "
            "check the shape and dtype you send",
        )


def _to_tensor(array: Any) -> Any:
    if isinstance(array, tuple):
        return tuple(_to_tensor(item) for item in array)
    if not array.flags.writeable:
        array = array.copy()
    if array.dtype.kind not in "biuf":
        raise RequestError(400, f"array of dtype {array.dtype} is not numeric; send numbers")
    if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
        array = array.astype(np.int64)
    return torch.from_numpy(array)


def _batch_key(data: Any) -> Hashable | None:
    shape = getattr(data, "shape", None)
    dtype = getattr(data, "dtype", None)
    if shape is None or dtype is None or len(shape) < 2 or isinstance(data, tuple):
        return None
    return (tuple(shape[1:]), str(dtype))


def _classify_model_error(err: BaseException) -> RequestError:
    reason = _short(err)
    if _SHAPE_ERROR.search(reason):
        return RequestError(
            400, f"the model rejected the input: {reason}; check the shape and dtype you send"
        )
    return RequestError(500, f"the model failed: {reason}")


def _hook_payload(body: bytes, content_type: str) -> Any:
    """What ``input_fn``/``transform_fn`` get, as the SageMaker toolkit gives it: JSON and CSV as
    text, the rest bytes."""
    if codecs.media_type(content_type) not in (codecs.JSON, codecs.CSV):
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(
            400, f"{codecs.media_type(content_type)} body is not UTF-8 text"
        ) from None


def _user_call(
    func: Callable[..., Any], *args: Any, stage: str, client_errors: bool = False
) -> Any:
    """Call a hook; its failures become RequestErrors (the user's own status when it carries
    one)."""
    try:
        return func(*args)
    except RequestError:
        raise
    except Exception as err:  # the user's code: classified, never allowed to kill the worker
        status = getattr(err, "status_code", None)
        if isinstance(status, int) and 400 <= status <= 599:
            raise RequestError(status, f"{stage}: {_short(err)}") from err
        if client_errors and isinstance(err, (ValueError, TypeError, KeyError, UnicodeDecodeError)):
            raise RequestError(400, f"{stage} rejected the input: {_short(err)}") from err
        if isinstance(err, RuntimeError) and stage in ("predict_fn", "transform_fn"):
            classified = _classify_model_error(err)
            classified.message = f"{stage}: {classified.message}"
            raise classified from err
        raise RequestError(500, f"{stage} failed: {_short(err)}") from err


def _body_and_type(result: Any, accept: str) -> tuple[bytes, str]:
    content_type = codecs.media_type(accept.split(",")[0]) or accept
    if isinstance(result, tuple) and len(result) == 2:
        result, content_type = result
    if isinstance(result, str):
        result = result.encode("utf-8")
    if isinstance(result, (bytearray, memoryview)):
        result = bytes(result)
    if not isinstance(result, bytes):
        try:
            result = codecs.encode(result, content_type)
        except RequestError as err:
            raise RequestError(
                500, f"output_fn returned {type(result).__name__}, not bytes or str ({err})"
            ) from None
    return result, content_type


def _short(err: BaseException) -> str:
    text = str(err).split("Exception raised from", 1)[0]  # c10 errors append a C++ backtrace
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    text = re.sub(r"^(RuntimeError|ValueError|TypeError|builtins\.\w+):\s*", "", text)
    return text[:300]

"""``torchbay export``: a module and an example input in, servable model files out.

Writes a ``torch.export`` program (``model.pt2``) and, with ``aoti``, an AOTInductor package
(``model.aoti.pt2``) compiled from it, both with a dynamic batch dimension (dim 0 of every input)
unless asked for a static one. ``torchbay serve`` reads either from ``<model>/`` (the package
first when both are there; ``TORCHBAY_SERVE_MODEL_FILE`` chooses).

    torchbay export my_model.py:build --example-shape 1,784 --out /opt/ml/model --aoti
    python -c "from agent.export import export_model; export_model(net, (x,), 'model/', aoti=True)"
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ExportError, TorchBayError, exit_code_for
from agent.serving.formats import (
    INPUTS_METADATA_KEY,
    BatchRange,
    inputs_metadata,
    program_inputs,
)

__all__ = [
    "PACKAGE_NAME",
    "PROGRAM_NAME",
    "ExportResult",
    "export_model",
    "load_factory",
    "main",
    "parse_args",
]

PROGRAM_NAME = "model.pt2"
PACKAGE_NAME = "model.aoti.pt2"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote, and how long each step took."""

    program: Path
    package: Path | None
    export_seconds: float
    compile_seconds: float | None
    batch: tuple[int, int | None] | None  # (low, high) of dim 0; None: static


def export_model(
    module: Any,
    example_inputs: Any,
    out_dir: Any,
    *,
    aoti: bool = False,
    dynamic_batch: bool = True,
    max_batch: int | None = None,
    device: str = "cpu",
    log: logging.Logger | None = None,
) -> ExportResult:
    """Export ``module`` (in eval mode) called on ``example_inputs`` (a tensor or a tuple of
    tensors) into
    ``out_dir/model.pt2``, and with ``aoti`` compile ``out_dir/model.aoti.pt2`` for ``device``.

    ``dynamic_batch`` makes dim 0 of every input one shared dynamic dimension (1..``max_batch``,
    unbounded
    when None); otherwise the batch is fixed to the example's.
    """
    import torch  # ~1.5 s: not on `torchbay export`'s start-up (--help, a bad flag)

    log = log or logging.getLogger("torchbay.export")
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export needs a torch.nn.Module, got {type(module).__name__}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        raise ExportError(
            "the example input must be a tensor, or a tuple of tensors, with a batch dimension; "
            f"got {[type(t).__name__ for t in inputs]}"
        )
    module = module.to(device).eval()
    inputs = tuple(t.to(device) for t in inputs)
    dynamic_shapes = None
    if dynamic_batch:
        if max_batch is not None and max_batch < 2:
            raise ExportError(
                f"max_batch={max_batch}: a dynamic batch needs at least 2; use a static batch"
            )
        if (
            int(inputs[0].shape[0]) < 2
        ):  # export specializes a size-1 dimension: trace with two rows
            inputs = tuple(torch.cat([t, t]) for t in inputs)
        batch_dim = (
            torch.export.Dim("batch", min=1, max=max_batch)
            if max_batch
            else torch.export.Dim("batch", min=1)
        )
        dynamic_shapes = tuple({0: batch_dim} for _ in inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with torch.no_grad():
            program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes)
    except (
        Exception
    ) as err:  # torch.export raises many kinds (UserError, constraint violations, ...)
        hint = (
            " (the module fixes its batch size somewhere: export with a static batch, "
            "--static-batch)"
            if dynamic_batch and "batch" in str(err)
            else ""
        )
        raise ExportError(f"torch.export failed{hint}: {_short(err)}") from err
    export_seconds = time.monotonic() - started
    program_path = out / PROGRAM_NAME
    torch.export.save(program, str(program_path))
    batch, example = program_inputs(program)
    log.info(
        "exported %s in %.1f s (%s)",
        program_path,
        export_seconds,
        batch.describe() if batch else "batch unknown",
    )
    package_path, compile_seconds = None, None
    if aoti:
        package_path = out / PACKAGE_NAME
        started = time.monotonic()
        metadata = {INPUTS_METADATA_KEY: inputs_metadata(batch, example or inputs)}
        try:
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(package_path),
                inductor_configs={"aot_inductor.metadata": metadata},
            )
        except Exception as err:  # inductor and the C++ compiler fail in many ways
            raise ExportError(f"AOTInductor compilation failed: {_short(err)}") from err
        compile_seconds = time.monotonic() - started
        log.info(
            "compiled the AOTInductor package %s for %s in %.1f s",
            package_path,
            device,
            compile_seconds,
        )
    low_high = (
        (batch.low, batch.high)
        if isinstance(batch, BatchRange) and batch.low != batch.high
        else None
    )
    return ExportResult(program_path, package_path, export_seconds, compile_seconds, low_high)


def load_factory(spec: str) -> Any:
    """``path/to/file.py:name`` or ``package.module:name``: the object, called when it is callable
    and not
    already a module (a class or a function that builds the model)."""
    import torch  # ~1.5 s: as in export_model

    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ExportError(f"module spec {spec!r} is not FILE.py:NAME or package.module:NAME")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise ExportError(f"module spec {spec!r}: {path} does not exist")
            sys.path.insert(0, str(path.parent))
            spec_obj = importlib.util.spec_from_file_location(path.stem, path)
            assert spec_obj is not None and spec_obj.loader is not None
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[path.stem] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except TorchBayError:
        raise
    except Exception as err:  # the user's module
        raise ExportError(f"importing {target} failed: {_short(err)}") from err
    obj = getattr(module, name, None)
    if obj is None:
        raise ExportError(f"{target} has no {name!r}")
    if not isinstance(obj, torch.nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, torch.nn.Module):
        raise ExportError(f"{spec} gave {type(obj).__name__}, not a torch.nn.Module")
    return obj


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``torchbay export``."""
    parser = argparse.ArgumentParser(prog="torchbay export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "module", help="FILE.py:NAME or package.module:NAME: an nn.Module, or what builds one"
    )
    parser.add_argument(
        "--example-shape",
        action="append",
        required=True,
        metavar="N,C,...",
        help="shape of an example input (repeat for several inputs); dim 0 is the batch",
    )
    parser.add_argument(
        "--dtype", default="float32", help="dtype of the example inputs (default float32)"
    )
    parser.add_argument(
        "--state-dict", help="a torch.save'd state dict to load into the module first"
    )
    parser.add_argument(
        "--out", default="model", help="folder to write model.pt2 (and model.aoti.pt2) into"
    )
    parser.add_argument("--aoti", action="store_true", help="also compile an AOTInductor package")
    parser.add_argument(
        "--static-batch", action="store_true", help="fix the batch to the example's"
    )
    parser.add_argument(
        "--max-batch", type=int, help="largest batch the program takes (default unbounded)"
    )
    parser.add_argument(
        "--device", default="cpu", help="device to export and compile for (cpu, cuda)"
    )
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Export as the command line says; 0, or the error's exit code with one line why."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [export] %(message)s",
    )
    log = logging.getLogger("torchbay.export")
    args = parse_args(argv)
    try:
        import torch  # ~1.5 s: only once the arguments parsed

        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ExportError(
                f"--dtype {args.dtype!r} is not a torch dtype; use e.g. float32, float16, int64"
            )
        try:
            shapes = [
                [int(size) for size in text.replace("x", ",").split(",") if size.strip()]
                for text in args.example_shape
            ]
        except ValueError:
            raise ExportError(
                f"--example-shape {args.example_shape}: give sizes like 1,3,224,224"
            ) from None
        if any(not shape or min(shape) < 1 for shape in shapes):
            raise ExportError(
                f"--example-shape {args.example_shape}: every size must be at least 1"
            )
        module = load_factory(args.module)
        if args.state_dict:
            module.load_state_dict(
                torch.load(args.state_dict, map_location="cpu", weights_only=True)
            )
        example = tuple(
            (torch.randn(shape) if dtype.is_floating_point else torch.zeros(shape)).to(dtype)
            for shape in shapes
        )
        result = export_model(
            module,
            example,
            args.out,
            aoti=args.aoti,
            dynamic_batch=not args.static_batch,
            max_batch=args.max_batch,
            device=args.device,
            log=log,
        )
    except TorchBayError as err:
        log.error("%s", err.message)
        return exit_code_for(err)
    print(result.program)
    if result.package:
        print(result.package)
    return 0


def _short(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:400]

"""Model files: which one to serve, what format it is, and how each format is loaded.

Four formats are served under one contract (eval/inference mode, device placement, batching only
along a dimension the model accepts, warm-up before the fork):

- ``aoti``: an AOTInductor package (``.pt2`` from ``torch._inductor.aoti_compile_and_package``),
  compiled kernels in a shared library, run without a Python graph;
- ``export``: a ``torch.export`` program (``.pt2`` from ``torch.export.save``), run through
  ``ExportedProgram.module()`` (and ``torch.compile`` when asked);
- ``torchscript``: ``torch.jit.save`` output (deprecated by PyTorch, still served);
- an eager ``nn.Module`` that the user's ``model_fn`` returns.

The format is read from the file's zip members, never from its name: every one of them is a zip
archive (an AOTI package holds ``data/aotinductor/...``, an ExportedProgram ``models/*.json``,
TorchScript ``code/`` and ``constants.pkl``).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ModelLoadError

__all__ = [
    "AOTI",
    "EAGER",
    "EXPORT",
    "FORMATS",
    "INPUTS_METADATA_KEY",
    "PREFERENCE",
    "SUFFIXES",
    "TORCHSCRIPT",
    "BatchRange",
    "Loaded",
    "choose_model_file",
    "detect_format",
    "load_model_file",
]

AOTI, EXPORT, TORCHSCRIPT, EAGER = "aoti", "export", "torchscript", "eager"
FORMATS = (AOTI, EXPORT, TORCHSCRIPT)
# When model/ holds several formats and no setting chooses: the fastest first (scripts/bench/serve).
PREFERENCE = (AOTI, EXPORT, TORCHSCRIPT)
SUFFIXES = (".pt2", ".pt", ".pth")
_NAMES = {
    AOTI: "AOTInductor package",
    EXPORT: "torch.export program",
    TORCHSCRIPT: "TorchScript model",
    EAGER: "eager nn.Module",
}
# The key under which `torchbay export` records the inputs' shapes in an AOTI package's metadata.
INPUTS_METADATA_KEY = "torchbay.inputs"


@dataclass(frozen=True)
class BatchRange:
    """The sizes dim 0 of the first input may take: ``low == high`` for a static batch."""

    low: int
    high: int | None  # None: no upper bound

    def accepts(self, rows: int) -> bool:
        return rows >= self.low and (self.high is None or rows <= self.high)

    def describe(self) -> str:
        if self.low == self.high:
            return f"static batch of {self.low}"
        return f"dynamic batch {self.low}..{'inf' if self.high is None else self.high}"


@dataclass(frozen=True)
class Loaded:
    """A loaded model and what the server must know about it."""

    model: Any
    format: str
    path: Path | None
    batch: BatchRange | None  # None: unknown (batching is tried, and dropped at the first failure)
    example: tuple[Any, ...] | None  # a warm-up input (batch 1 where dynamic), when known
    shares_weights: bool  # whether weights loaded before the fork stay shared by the workers

    @property
    def description(self) -> str:
        return _NAMES[self.format]


def detect_format(path: Path) -> str:
    """``aoti``, ``export`` or ``torchscript``, from the archive's members; ModelLoadError
    otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ModelLoadError(
            f"{path} is not a model archive ({err}); TorchScript, torch.export and AOTInductor "
            "files are all zip "
            "archives: copy it again (it may be truncated) or re-save it (torchbay export)"
        ) from None
    parts = [name.split("/") for name in names]
    if any("aotinductor" in p[:-1] for p in parts):
        return AOTI
    if any(p[-1] == "constants.pkl" for p in parts) and any("code" in p[:-1] for p in parts):
        return TORCHSCRIPT
    if any(p[-1] == "serialized_exported_program.json" for p in parts) or any(
        len(p) >= 2 and p[-2] == "models" and p[-1].endswith(".json") for p in parts
    ):
        return EXPORT
    if any(p[-1] == "data.pkl" for p in parts):
        raise ModelLoadError(
            f"{path} is a torch.save file (a state dict or a pickled module), which cannot be "
            "served as it is; "
            "export the module (torchbay export, or torch.export.save) or load it in "
            "code/inference.py's model_fn"
        )
    raise ModelLoadError(
        f"{path} is a zip archive but not a TorchScript, torch.export or AOTInductor model "
        f"(members: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
    )


def choose_model_file(
    model_dir: Path, choice: str | None = None, log: logging.Logger | None = None
) -> tuple[Path, str]:
    """The file to serve in ``model_dir`` and its format.

    ``choice`` (``TORCHBAY_SERVE_MODEL_FILE``) is a file name in ``model_dir`` or a format name.
    Unset:
    the only ``.pt2``/``.pt``/``.pth`` file; with several, the first format of :data:`PREFERENCE`
    present, and within one format the file named ``model.*``.
    """
    log = log or logging.getLogger("torchbay.serve")
    found = (
        sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if model_dir.is_dir()
        else []
    )
    if choice and choice not in FORMATS:
        path = model_dir / choice
        if not path.is_file():
            names = ", ".join(p.name for p in found) or "none"
            raise ModelLoadError(
                f"TORCHBAY_SERVE_MODEL_FILE={choice!r}: no such file in {model_dir} (model files "
                f"there: {names}); name one of them or a format ({', '.join(FORMATS)})"
            )
        return path, detect_format(path)
    if not found:
        raise ModelLoadError(
            f"no model file (.pt2, .pt or .pth) in {model_dir}; write one with `torchbay export` "
            "(or "
            "torch.export.save), set TORCHBAY_MODEL_URI to a model.tar.gz, or give "
            "code/inference.py a model_fn"
        )
    if len(found) == 1 and not choice:
        return found[0], detect_format(found[0])
    formats: dict[Path, str] = {}
    for path in found:
        try:
            formats[path] = detect_format(path)
        except ModelLoadError as err:
            log.warning("not a candidate: %s", err)
    wanted = (choice,) if choice else PREFERENCE
    for fmt in wanted:
        same = [p for p in formats if formats[p] == fmt]
        if len(same) > 1:
            named = [p for p in same if p.stem == "model" or p.name.startswith("model.")]
            if len(named) != 1:
                raise ModelLoadError(
                    f"{model_dir} holds several {_NAMES[fmt]}s "
                    f"({', '.join(p.name for p in same)}); name the one to serve model.<ext> "
                    "or set TORCHBAY_SERVE_MODEL_FILE to its file name"
                )
            same = named
        if same:
            if len(formats) > 1:
                log.info(
                    "%s holds %s; serving %s (%s; set TORCHBAY_SERVE_MODEL_FILE to choose)",
                    model_dir,
                    ", ".join(f"{p.name} ({formats[p]})" for p in formats),
                    same[0].name,
                    fmt,
                )
            return same[0], fmt
    seen = ", ".join(f"{p.name} ({formats[p]})" for p in formats) or "no loadable model file"
    if choice:
        raise ModelLoadError(
            f"TORCHBAY_SERVE_MODEL_FILE={choice!r}: {model_dir} has no {_NAMES[choice]} "
            f"(found: {seen})"
        )
    raise ModelLoadError(f"{model_dir} holds no model file that can be served (found: {seen})")


def load_model_file(
    path: Path,
    fmt: str,
    device: str,
    *,
    compile_program: bool = False,
    log: logging.Logger | None = None,
) -> Loaded:
    """Load ``path`` (of format ``fmt``) for inference on ``device``; ModelLoadError with the
    reason."""
    log = log or logging.getLogger("torchbay.serve")
    started = time.monotonic()
    if fmt == AOTI:
        loaded = _load_aoti(path, device)
    elif fmt == EXPORT:
        loaded = _load_export(path, device, compile_program, log)
    elif fmt == TORCHSCRIPT:
        loaded = _load_torchscript(path, device)
    else:
        raise ModelLoadError(f"unknown model format {fmt!r}; this is a bug in the caller")
    log.info(
        "loaded %s %s on %s in %.2f s (%s)",
        loaded.description,
        path,
        device,
        time.monotonic() - started,
        loaded.batch.describe() if loaded.batch else "batch dimension unknown",
    )
    return loaded


def _load_torchscript(path: Path, device: str) -> Loaded:
    # torch (~1.5 s): agent.export imports this module before `torchbay export` parses its flags
    import torch

    try:
        with (
            warnings.catch_warnings()
        ):  # TorchScript is deprecated; it is still served as it is given
            warnings.simplefilter("ignore", DeprecationWarning)
            # torch.jit.load carries no annotations
            model = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(
            f"{path} looks like TorchScript but does not load ({_short(err)}); save it again "
            "or export it (torchbay export)"
        ) from err
    model.eval()
    return Loaded(model, TORCHSCRIPT, path, None, None, shares_weights=True)


def _load_export(path: Path, device: str, compile_program: bool, log: logging.Logger) -> Loaded:
    # torch (~1.5 s): agent.export imports this module before `torchbay export` parses its flags
    import torch

    try:
        with open(
            path, "rb"
        ) as stream:  # a stream: torch warns about file names not ending in .pt2
            program = torch.export.load(stream)
    except (
        Exception
    ) as err:  # torch's deserializer raises many types for a damaged or foreign archive
        raise ModelLoadError(
            f"{path} looks like a torch.export program but does not load ({_short(err)}); save "
            "it again with torch.export.save from the same torch version"
        ) from err
    batch, example = program_inputs(program)
    module: Any = program.module()  # a GraphModule, or torch.compile's wrapper of it
    if device != "cpu":
        module = module.to(device)
        if example is not None:
            example = tuple(t.to(device) for t in example)
    if compile_program:
        import torch._inductor.config as inductor_config  # with torch (lazy like it); to compile

        inductor_config.compile_threads = (
            1  # no compile-worker pool in a process that forks workers
        )
        module = torch.compile(module, dynamic=bool(batch and batch.low != batch.high))
        log.info(
            "compiling the torch.export program with torch.compile (on the first forward: the "
            "warm-up)"
        )
    return Loaded(module, EXPORT, path, batch, example, shares_weights=True)


def program_inputs(program: Any) -> tuple[BatchRange | None, tuple[Any, ...] | None]:
    """Dim 0 of the first user input as the program declares it, and a warm-up input (batch 1 if
    dynamic)."""
    # torch (~1.5 s): agent.export imports this module before `torchbay export` parses its flags
    import torch

    names = set(program.graph_signature.user_inputs)
    values = [
        node.meta.get("val")
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in names
    ]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        return None, None
    batch: BatchRange | None = None
    if values[0].dim() > 0:
        batch = _dim_range(program, values[0].shape[0])
    first = values[0].shape[0] if values[0].dim() > 0 else None
    example = []
    for value in values:
        shape = [
            max(batch.low, 1)
            if (
                i == 0
                and batch is not None
                and not isinstance(size, int)
                and first is not None
                and not isinstance(first, int)
                and size.node.expr == first.node.expr
            )
            else _dim_example(program, size, batch)
            for i, size in enumerate(value.shape)
        ]
        example.append(torch.zeros(shape, dtype=value.dtype))
    return batch, tuple(example)


def _dim_range(program: Any, size: Any) -> BatchRange:
    if isinstance(size, int):
        return BatchRange(size, size)
    symbol = size.node.expr
    bounds = program.range_constraints.get(symbol)
    if bounds is None:
        return BatchRange(1, None)
    return BatchRange(max(_finite(bounds.lower) or 1, 1), _finite(bounds.upper))


def _finite(value: Any) -> int | None:
    """A sympy bound as an int; None for infinity (sympy's oo or torch's int_oo)."""
    try:
        number = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return None if abs(number) >= 2**62 else number


def _dim_example(program: Any, size: Any, batch: BatchRange | None) -> int:
    """A size for one dim of the warm-up input: static sizes as they are, dim 0 at the batch's low
    end,
    other dynamic dims at the size the program was traced with when known (else their low end)."""
    if isinstance(size, int):
        return size
    bounds = program.range_constraints.get(size.node.expr)
    low = max(_finite(bounds.lower) or 1, 1) if bounds is not None else 1
    high = _finite(bounds.upper) if bounds is not None else None
    hint = getattr(size.node, "hint", None)
    if isinstance(hint, int) and hint >= low and (high is None or hint <= high):
        return hint
    return low


def _load_aoti(path: Path, device: str) -> Loaded:
    # torch (~1.5 s): agent.export imports this module before `torchbay export` parses its flags
    import torch

    metadata = aoti_metadata(path)
    package_device = metadata.get("AOTI_DEVICE_KEY", "cpu")
    host = "cuda" if device.startswith("cuda") else "cpu"
    if package_device.split(":")[0] != host:
        raise ModelLoadError(
            f"{path} is an AOTInductor package compiled for {package_device}, but this server runs "
            f"on {device}"
            f"{' (no GPU found)' if host == 'cpu' else ''}; compile the package for {host} "
            f"(torchbay export --device {host}) or serve it on a {package_device} host"
        )
    index = int(device.split(":")[1]) if ":" in device else -1
    try:
        runner = torch._inductor.aoti_load_package(str(path), device_index=index)
    except (
        Exception
    ) as err:  # the C++ loader raises RuntimeError, OSError, ... for a damaged package
        raise ModelLoadError(
            f"{path}: the AOTInductor package does not load ({_short(err)}); compile it again "
            "with this torch version (torchbay export --aoti)"
        ) from err
    batch, example = _aoti_inputs(metadata, device)
    # The compiled constants live in memory the runner allocated before the fork, so workers share
    # them
    # copy-on-write like any other weights.
    return Loaded(runner, AOTI, path, batch, example, shares_weights=True)


def aoti_metadata(path: Path) -> dict[str, str]:
    """The metadata an AOTInductor package carries (``AOTI_DEVICE_KEY`` and user entries), read from
    the zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_metadata.json") and "aotinductor" in name.split("/"):
                    return dict(json.loads(archive.read(name)))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ModelLoadError(
            f"{path}: cannot read the AOTInductor package's metadata ({err}); compile it again"
        ) from err
    return {}


def _aoti_inputs(
    metadata: dict[str, str], device: str
) -> tuple[BatchRange | None, tuple[Any, ...] | None]:
    """What ``torchbay export`` recorded about the inputs (unknown for packages made otherwise)."""
    # torch (~1.5 s): agent.export imports this module before `torchbay export` parses its flags
    import torch

    text = metadata.get(INPUTS_METADATA_KEY)
    if not text:
        return None, None
    try:
        spec = json.loads(text)
        first = spec["inputs"][0]
        batch = BatchRange(int(spec["batch"][0]), spec["batch"][1]) if spec.get("batch") else None
        example = tuple(
            torch.zeros(
                [
                    batch.low if (i == 0 and batch is not None) else s
                    for i, s in enumerate(item["shape"])
                ],
                dtype=getattr(torch, item["dtype"]),
                device=device,
            )
            for item in spec["inputs"]
        )
        del first
        return batch, example
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None


def inputs_metadata(batch: BatchRange | None, example: Sequence[Any]) -> str:
    """The JSON recorded under :data:`INPUTS_METADATA_KEY` (read back by the loader)."""
    return json.dumps(
        {
            "batch": [batch.low, batch.high] if batch else None,
            "inputs": [
                {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for t in example
            ],
        }
    )


def _short(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]

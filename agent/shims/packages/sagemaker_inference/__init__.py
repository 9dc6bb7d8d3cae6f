"""TorchBay's stand-in for sagemaker-inference 1.x: content types, codecs, errors and the default
handler.

Only what inference modules import is here (see the README); the model server itself is TorchBay's
``torchbay serve``. A real installed ``sagemaker-inference`` replaces this package.
"""

from types import ModuleType

from _torchbay_toolkit.missing import missing as _missing

__torchbay_shim__ = True
__version__ = "1.10.1+torchbay"
__all__ = ["content_types", "decoder", "default_inference_handler", "encoder", "errors", "utils"]

_INSTEAD = {
    "model_server": (
        "`torchbay serve` (it serves the model, your inference.py and the SageMaker HTTP contract)"
    ),
    "default_handler_service": "model_fn/input_fn/predict_fn/output_fn in code/inference.py",
    "transformer": "model_fn/input_fn/predict_fn/output_fn in code/inference.py",
}


def __getattr__(name: str) -> ModuleType:
    import importlib

    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    _missing(__name__, name, "sagemaker-inference", _INSTEAD)

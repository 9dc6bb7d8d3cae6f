"""TorchBay's stand-in for sagemaker-training 5.x: ``sagemaker_training.environment`` for user
scripts.

The toolkit's launcher, runners and MPI/smdistributed support are TorchBay's own ``torchbay train``;
a real installed ``sagemaker-training`` replaces this package.
"""

from types import ModuleType

from _torchbay_toolkit.missing import missing as _missing

__torchbay_shim__ = True
__version__ = "5.1.4+torchbay"
__all__ = ["environment"]

_INSTEAD = {
    "entry_point": "`torchbay train` (it runs the entry point named by sagemaker_program)",
    "trainer": "`torchbay train`",
    "runner": "`torchbay train` (it launches torch.distributed.run for several processes or hosts)",
    "mpi": "`torchbay train` with torch.distributed (MPI launches are not provided)",
    "smdataparallel": "torch.distributed (DDP) under `torchbay train`",
    "files": "the folders of sagemaker_training.environment.Environment()",
    "intermediate_output": "output/intermediate/ (TorchBay uploads it as it is written)",
}


def __getattr__(name: str) -> ModuleType:
    import importlib

    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    _missing(__name__, name, "sagemaker-training", _INSTEAD)

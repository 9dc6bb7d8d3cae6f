"""TorchBay: SageMaker-compatible train and serve runtime for PyTorch containers."""

__version__ = "0.1.0"

"""What TorchBay's stand-ins for the SageMaker toolkits share (private: import the toolkit names
instead)."""

__torchbay_shim__ = True

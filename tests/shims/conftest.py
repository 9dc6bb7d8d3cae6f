"""The real toolkits as a fixture for this folder's differential tests (see reference.py)."""

from tests.shims.reference import reference_toolkit

__all__ = ["reference_toolkit"]

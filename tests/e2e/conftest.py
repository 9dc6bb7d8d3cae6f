"""Fixtures of the end-to-end jobs."""

from tests.shims.reference import reference_toolkit  # noqa: F401  (the real toolkit, a fixture)

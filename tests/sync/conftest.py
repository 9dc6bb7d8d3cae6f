"""Fixtures for the live sync tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def versioned(s3, bucket: str) -> str:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket

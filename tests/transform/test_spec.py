"""agent/transform/spec.py: CreateTransformJob-shaped specs, refused with the path, the value and
the fix."""

from __future__ import annotations

import copy
import json

import pytest

from agent.errors import JobSpecError
from agent.transform.spec import read_transform_spec, transform_spec_from_dict

BASE = {
    "TransformJobName": "j",
    "TransformInput": {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/in/"}},
        "ContentType": "text/csv",
        "SplitType": "Line",
        "CompressionType": "Gzip",
    },
    "TransformOutput": {"S3OutputPath": "s3://b/out/", "AssembleWith": "Line"},
    "ModelClientConfig": {"InvocationsMaxRetries": 1},
    "Tags": [{"Key": "team", "Value": "ml"}],
}


def _with(path: str, value) -> dict:
    spec = copy.deepcopy(BASE)
    node = spec
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


def test_a_full_spec_is_read_with_defaults_left_to_the_container(tmp_path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(BASE))
    spec = read_transform_spec(str(path))
    assert (spec.split_type, spec.compression, spec.assemble_with, spec.max_retries) == (
        "Line",
        "Gzip",
        "Line",
        1,
    )
    assert (
        spec.max_concurrent is None and spec.batch_strategy is None and spec.max_payload_mb is None
    )
    assert spec.timeout == 600 and spec.input_filter == "$" and spec.join_source == "None"
    # Concurrency and the client config do not change outputs, so a rerun with others still resumes.
    assert transform_spec_from_dict(_with("MaxConcurrentTransforms", 9)).digest == spec.digest
    assert (
        transform_spec_from_dict(_with("TransformOutput.Accept", "text/csv")).digest != spec.digest
    )


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("TransformInput.SplitTyp", "Line", "unknown key 'TransformInput.SplitTyp'"),
        (
            "TransformInput.SplitType",
            "Lines",
            "TransformInput.SplitType is 'Lines'; use one of None, Line",
        ),
        ("BatchStrategy", "Multi", "BatchStrategy is 'Multi'"),
        ("MaxPayloadInMB", 101, "MaxPayloadInMB is 101; use 1 to 100"),
        ("MaxConcurrentTransforms", "4", "MaxConcurrentTransforms must be an integer, got str '4'"),
        ("TransformOutput.S3OutputPath", "/tmp/out", "use s3://bucket/prefix or file:///path"),
        ("DataProcessing.InputFilter", "$..x", "DataProcessing.InputFilter '$..x'"),
        ("ModelClientConfig.InvocationsMaxRetries", 5, "use 0 to 3"),
        ("TransformJobName", "a/b", "TransformJobName 'a/b'"),
    ],
)
def test_bad_fields_are_named(path: str, value, message: str) -> None:
    with pytest.raises(
        JobSpecError,
        match=message.replace("(", r"\(")
        .replace("[", r"\[")
        .replace("$", r"\$")
        .replace(".", r"\."),
    ):
        transform_spec_from_dict(_with(path, value), "spec.json")


def test_missing_file_and_bad_json() -> None:
    with pytest.raises(JobSpecError, match="does not exist"):
        read_transform_spec("/nonexistent/spec.json")
    with pytest.raises(JobSpecError, match="not valid JSON"):
        read_transform_spec("{nope")

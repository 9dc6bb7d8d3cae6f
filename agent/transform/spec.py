"""The transform job spec: a CreateTransformJob-shaped JSON (a file or inline), validated into a
TransformSpec.

Unknown keys, wrong types and bad choices are refused with the key path, the value and the fix, as
for the training spec. Values the spec leaves out come from the container's
``/execution-parameters``
(MaxConcurrentTransforms, BatchStrategy, MaxPayloadInMB) and then from SageMaker's defaults.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import JobSpecError
from agent.job.spec import check_schema
from agent.transform.jsonpath import JsonPathError, compile_path

__all__ = ["SPLIT_TYPES", "TransformSpec", "read_transform_spec", "transform_spec_from_dict"]

SPLIT_TYPES = ("None", "Line", "RecordIO", "TFRecord")
_BATCH_STRATEGIES = ("SingleRecord", "MultiRecord")
_COMPRESSIONS = ("None", "Gzip")
_ASSEMBLE = ("None", "Line")
_JOIN = ("None", "Input")
_DATA_TYPES = ("S3Prefix", "ManifestFile")

# A schema node: a type, a dict (an object: key -> node, "*required" -> required keys, "*values" ->
# node of
# every value) or a one-element list (an array of node).
_SCHEMA = {
    "TransformJobName": str,
    "ModelName": str,
    "MaxConcurrentTransforms": int,
    "ModelClientConfig": {"InvocationsTimeoutInSeconds": int, "InvocationsMaxRetries": int},
    "MaxPayloadInMB": int,
    "BatchStrategy": str,
    "Environment": {"*values": str},
    "TransformInput": {
        "DataSource": {
            "S3DataSource": {"S3DataType": str, "S3Uri": str, "*required": ("S3DataType", "S3Uri")},
            "*required": ("S3DataSource",),
        },
        "ContentType": str,
        "CompressionType": str,
        "SplitType": str,
        "*required": ("DataSource",),
    },
    "TransformOutput": {
        "S3OutputPath": str,
        "Accept": str,
        "AssembleWith": str,
        "KmsKeyId": str,
        "*required": ("S3OutputPath",),
    },
    "DataProcessing": {"InputFilter": str, "OutputFilter": str, "JoinSource": str},
    "TransformResources": {"InstanceType": str, "InstanceCount": int, "VolumeKmsKeyId": str},
    # Accepted for compatibility with real requests; they mean nothing outside SageMaker.
    "DataCaptureConfig": dict,
    "BatchDataCaptureConfig": dict,
    "ExperimentConfig": dict,
    "Tags": [{"Key": str, "Value": str}],
    "*required": ("TransformJobName", "TransformInput", "TransformOutput"),
}
# Keys that change what the outputs hold; their hash marks each .out so a rerun skips only equal
# work.
_OUTPUT_KEYS = (
    "ModelName",
    "BatchStrategy",
    "MaxPayloadInMB",
    "Environment",
    "TransformInput",
    "TransformOutput",
    "DataProcessing",
)


@dataclass(frozen=True)
class TransformSpec:
    """One transform job, validated; ``None`` fields are left to the container and the defaults."""

    name: str
    source: str  # where the spec came from, for messages
    input_uri: str
    input_type: str  # S3Prefix | ManifestFile
    content_type: str | None
    compression: str
    split_type: str
    output_uri: str
    accept: str | None
    assemble_with: str
    input_filter: str
    output_filter: str
    join_source: str
    max_concurrent: int | None
    batch_strategy: str | None
    max_payload_mb: int | None
    timeout: float
    max_retries: int
    environment: Mapping[str, str]
    digest: str  # sha256 of the keys that decide the outputs

    def fail(self, what: str) -> JobSpecError:
        return JobSpecError(f"transform spec {self.source}: {what}")


def read_transform_spec(job_arg: str) -> TransformSpec:
    """The spec in ``job_arg`` (a path, or the JSON itself); raises JobSpecError naming what is
    wrong."""
    if job_arg.lstrip().startswith("{"):
        text, source = job_arg, "--job (inline JSON)"
    else:
        try:
            text, source = Path(job_arg).read_text(encoding="utf-8"), job_arg
        except FileNotFoundError:
            raise JobSpecError(
                f"transform spec file {job_arg} does not exist; give --job a path or the JSON "
                "itself"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise JobSpecError(
                f"transform spec file {job_arg} cannot be read: {err}; check the path"
            ) from err
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise JobSpecError(
            f"transform spec {source} is not valid JSON: {err}; fix the JSON"
        ) from err
    return transform_spec_from_dict(spec, source)


def transform_spec_from_dict(spec: Any, source: str = "(dict)") -> TransformSpec:
    """Validate a parsed spec; raises JobSpecError."""
    check_schema(spec, _SCHEMA, source, kind="transform spec", request="CreateTransformJob")

    def choice(value: str, allowed: tuple[str, ...], path: str) -> str:
        if value not in allowed:
            raise JobSpecError(
                f"transform spec {source}: {path} is {value!r}; use one of {', '.join(allowed)}"
            )
        return value

    def bounded(value: int | None, low: int, high: int, path: str) -> int | None:
        if value is not None and not low <= value <= high:
            raise JobSpecError(f"transform spec {source}: {path} is {value}; use {low} to {high}")
        return value

    name = spec["TransformJobName"]
    if not name or "/" in name:
        raise JobSpecError(
            f"transform spec {source}: TransformJobName {name!r} is empty or contains '/'; "
            "use letters, digits and hyphens"
        )
    tin, tout = spec["TransformInput"], spec["TransformOutput"]
    s3 = tin["DataSource"]["S3DataSource"]
    processing = spec.get("DataProcessing", {})
    client = spec.get("ModelClientConfig", {})
    for path, uri in (
        ("TransformInput.DataSource.S3DataSource.S3Uri", s3["S3Uri"]),
        ("TransformOutput.S3OutputPath", tout["S3OutputPath"]),
    ):
        if not (uri.startswith(("s3://", "file://"))):
            raise JobSpecError(
                f"transform spec {source}: {path} is {uri!r}; use s3://bucket/prefix or "
                "file:///path"
            )
    split_type = choice(tin.get("SplitType", "None"), SPLIT_TYPES, "TransformInput.SplitType")
    strategy = spec.get("BatchStrategy")
    if strategy is not None:
        choice(strategy, _BATCH_STRATEGIES, "BatchStrategy")
    payload = bounded(spec.get("MaxPayloadInMB"), 1, 100, "MaxPayloadInMB")
    filters = {}
    for key in ("InputFilter", "OutputFilter"):
        expression = processing.get(key, "$") or "$"
        try:
            compile_path(expression)
        except JsonPathError as err:
            raise JobSpecError(
                f"transform spec {source}: DataProcessing.{key} {expression!r}: {err}"
            ) from None
        filters[key] = expression
    digest = hashlib.sha256(
        json.dumps({k: spec.get(k) for k in _OUTPUT_KEYS}, sort_keys=True).encode()
    ).hexdigest()
    return TransformSpec(
        name=name,
        source=source,
        input_uri=s3["S3Uri"],
        input_type=choice(
            s3["S3DataType"], _DATA_TYPES, "TransformInput.DataSource.S3DataSource.S3DataType"
        ),
        content_type=tin.get("ContentType"),
        compression=choice(
            tin.get("CompressionType", "None"), _COMPRESSIONS, "TransformInput.CompressionType"
        ),
        split_type=split_type,
        output_uri=tout["S3OutputPath"],
        accept=tout.get("Accept"),
        assemble_with=choice(
            tout.get("AssembleWith", "None"), _ASSEMBLE, "TransformOutput.AssembleWith"
        ),
        input_filter=filters["InputFilter"],
        output_filter=filters["OutputFilter"],
        join_source=choice(
            processing.get("JoinSource", "None"), _JOIN, "DataProcessing.JoinSource"
        ),
        max_concurrent=bounded(
            spec.get("MaxConcurrentTransforms"), 1, 1000, "MaxConcurrentTransforms"
        ),
        batch_strategy=strategy,
        max_payload_mb=payload,
        timeout=float(
            bounded(
                client.get("InvocationsTimeoutInSeconds", 600),
                1,
                3600,
                "ModelClientConfig.InvocationsTimeoutInSeconds",
            )
            or 600
        ),
        max_retries=int(
            bounded(
                client.get("InvocationsMaxRetries", 3),
                0,
                3,
                "ModelClientConfig.InvocationsMaxRetries",
            )
            or 0
        ),
        environment=dict(spec.get("Environment", {})),
        digest=digest,
    )

"""The stand-ins against the real toolkits (sagemaker-training 5.1.4, sagemaker-inference 1.10.1) on
the same input: every Environment property, to_env_vars() and to_cmd_args() on trees of several
shapes, and the codecs' results on the content types TorchBay supports. The ``reference_toolkit``
fixture comes from tests/conftest.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.shims.helpers import DUMP, REFERENCE_HPS, make_tree, resource, user_python

HETERO = {
    "current_host": "algo-3",
    "current_instance_type": "ml.p4d.24xlarge",
    "current_group_name": "gpu",
    "hosts": ["algo-1", "algo-2", "algo-3"],
    "instance_groups": [
        {"instance_group_name": "cpu", "instance_type": "ml.c5.xlarge", "hosts": ["algo-1"]},
        {
            "instance_group_name": "gpu",
            "instance_type": "ml.p4d.24xlarge",
            "hosts": ["algo-2", "algo-3"],
        },
    ],
    "network_interface_name": "ethwe",
    "topology": [{"hostName": "algo-2", "capacityUnitId": "u1"}],
}

TREES = {
    "reference": ({}, {}),
    "two hosts, ddp": (
        {
            "hps": {**REFERENCE_HPS, "sagemaker_pytorch_ddp_enabled": "true"},
            "resource_config": resource("algo-2", ["algo-1", "algo-2"]),
        },
        {"TRAINING_JOB_NAME": "j-1"},
    ),
    "hetero, distribution groups": (
        {
            "hps": {
                "sagemaker_program": '"-m pkg.train"',
                "x": '{"a": 1, "b": [2]}',
                "sagemaker_distribution_instance_groups": '["gpu"]',
                "sagemaker_submit_directory": '"s3://b/src.tar.gz"',
                "y": "not json",
                "k": "3",
                "_tuning_objective_metric": '"loss"',
            },
            "resource_config": HETERO,
        },
        {"SAGEMAKER_TRAINING_MODULE": "m:main"},
    ),
    "no instance groups, program from env": (
        {"resource_config": {"current_host": "b", "hosts": ["a", "b"]}, "channels": {}},
        {"SAGEMAKER_PROGRAM": "entry.py", "SM_HP_MP_PARAMETERS": '{"x": 1}'},
    ),
}


@pytest.mark.parametrize("shape", list(TREES))
def test_environment_equals_the_real_toolkit(
    tmp_path: Path, reference_toolkit: Path, shape: str
) -> None:
    tree, env = TREES[shape]
    root = make_tree(tmp_path / "ml", **tree)
    env = {"AWS_REGION": "eu-west-1", "AWS_EC2_METADATA_DISABLED": "true", **env}
    ours = user_python(DUMP, root, env=env)
    real = user_python(DUMP, root, env={**env, "PYTHONPATH": str(reference_toolkit)})
    assert ours.returncode == 0, ours.stderr
    assert real.returncode == 0, real.stderr
    ours_out, real_out = json.loads(ours.stdout), json.loads(real.stdout)
    assert set(ours_out) == set(real_out)
    assert {k: (ours_out[k], real_out[k]) for k in real_out if ours_out[k] != real_out[k]} == {}


CODECS = r"""
import io, json, sys
import numpy as np
# the real decoder imports scipy.sparse for NPZ, which TorchBay's tests do not install
if "{stub}" == "yes":
    import types
    scipy = types.ModuleType("scipy"); scipy.sparse = types.ModuleType("scipy.sparse")
    sys.modules["scipy"] = scipy; sys.modules["scipy.sparse"] = scipy.sparse
from sagemaker_inference import content_types as ct, decoder, encoder, errors
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler

def describe(value):
    if isinstance(value, np.ndarray):
        values = np.where(np.isnan(value), None, value) if value.dtype.kind == "f" else value
        return ["array", value.dtype.str, list(value.shape), values.tolist()]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, tuple):
        return ["tuple", [describe(v) for v in value]]
    return [type(value).__name__, value]

def run(call):
    try:
        return describe(call())
    except Exception as err:
        return ["raised", type(err).__name__]

npy = io.BytesIO(); np.save(npy, np.arange(6, dtype=np.float32).reshape(2, 3))
cases = {
    "json 2d": lambda: decoder.decode("[[1, 2], [3, 4.5]]", ct.JSON),
    "json bytes": lambda: decoder.decode(b"[1, 2]", ct.JSON),
    "json scalar": lambda: decoder.decode("7", ct.JSON),
    "json nested ragged": lambda: decoder.decode("[[1], [2, 3]]", ct.JSON),
    "csv rows": lambda: decoder.decode("1,2,3\n4,5,6\n", ct.CSV),
    "csv one row": lambda: decoder.decode("1.5,2,nan", ct.CSV),
    "csv text": lambda: decoder.decode("a,b\n", ct.CSV),
    "npy": lambda: decoder.decode(npy.getvalue(), ct.NPY),
    "decode unknown": lambda: decoder.decode("x", "text/plain"),
    "json array": lambda: encoder.encode(np.array([[1, 2], [3, 4]]), ct.JSON),
    "json float32": lambda: encoder.encode(np.array([0.5, 1.25], dtype=np.float32), ct.JSON),
    "json dict": lambda: encoder.encode({"a": np.array([1]), "b": [1, 2], "c": "x"}, ct.JSON),
    "json list": lambda: encoder.encode([1, 2.5, None], ct.JSON),
    "csv 2d": lambda: encoder.encode(np.array([[1.5, 2], [3, 4]]), ct.CSV),
    "csv 1d": lambda: encoder.encode([1, 2, 3], ct.CSV),
    "npy list": lambda: encoder.encode([[1, 2], [3, 4]], ct.NPY),
    "encode unknown": lambda: encoder.encode([1], "image/png"),
    "handler input": lambda: DefaultInferenceHandler().default_input_fn("[1]", ct.JSON),
    "handler output": lambda: DefaultInferenceHandler().default_output_fn(
        [1], "text/html, text/csv"),
    "handler output none": lambda: DefaultInferenceHandler().default_output_fn([1], "text/html"),
    "handler model": lambda: DefaultInferenceHandler().default_model_fn("/x"),
    "generic error": lambda: (lambda e: [e.status_code, e.message, e.phrase, list(e.args)])(
        errors.GenericInferenceToolkitError(400)),
    "base error": lambda: (lambda e: [e.status_code, e.message, e.phrase, str(e)])(
        errors.BaseInferenceToolkitError(503, "down", "Service Unavailable")),
    "types": lambda: [ct.JSON, ct.CSV, ct.NPY, ct.NPZ, ct.OCTET_STREAM, ct.ANY, ct.UTF8_TYPES],
}
json.dump({name: run(call) for name, call in cases.items()}, sys.stdout)
"""


def test_codecs_equal_the_real_toolkit(tmp_path: Path, reference_toolkit: Path) -> None:
    ours = user_python(CODECS.replace("{stub}", "no"), tmp_path)
    real = user_python(
        CODECS.replace("{stub}", "yes"), tmp_path, env={"PYTHONPATH": str(reference_toolkit)}
    )
    assert ours.returncode == 0, ours.stderr
    assert real.returncode == 0, real.stderr
    ours_out, real_out = json.loads(ours.stdout), json.loads(real.stdout)
    assert {k: (ours_out[k], real_out[k]) for k in real_out if ours_out[k] != real_out[k]} == {}


def test_the_reference_is_the_real_package(tmp_path: Path, reference_toolkit: Path) -> None:
    done = user_python(
        "import sagemaker_training, sagemaker_inference; print(sagemaker_training.__file__, "
        "sagemaker_inference.__file__)",
        tmp_path,
        env={"PYTHONPATH": str(reference_toolkit)},
    )
    assert done.returncode == 0, done.stderr
    assert all(path.startswith(str(reference_toolkit) + os.sep) for path in done.stdout.split())

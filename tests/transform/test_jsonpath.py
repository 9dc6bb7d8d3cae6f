"""agent/transform/jsonpath.py: the subset SageMaker documents, and clear errors outside it."""

from __future__ import annotations

import pytest

from agent.transform.jsonpath import JsonPathError, compile_path

ROW = ["id-7", "1.5", "2", "3", "4", "5", "6"]
DOC = {"id": 7, "features": [1, 2, 3], "meta": {"k": "v"}, "SageMakerOutput": {"score": 0.5}}


@pytest.mark.parametrize(
    "path, record, expected",
    [
        ("$", ROW, ROW),
        ("$[1:]", ROW, ROW[1:]),
        ("$[0,2]", ROW, ["id-7", "2"]),
        ("$[0,5:]", ROW, ["id-7", "5", "6"]),
        ("$[-1]", ROW, "6"),
        ("$[:-5]", ROW, ["id-7", "1.5"]),
        ("$[*]", ROW, ROW),
        ("$.features", DOC, [1, 2, 3]),
        ("$.features[1:]", DOC, [2, 3]),
        ("$['id','SageMakerOutput']", DOC, {"id": 7, "SageMakerOutput": {"score": 0.5}}),
        ('$["meta"].k', DOC, "v"),
        ("$.SageMakerOutput.score", DOC, 0.5),
    ],
)
def test_documented_expressions(path: str, record, expected) -> None:
    assert compile_path(path).apply(record) == expected


@pytest.mark.parametrize("path", ["features", "$..x", "$[1:2:3]", "$[a]", "$[", "$[1,]", "$.?x"])
def test_expressions_outside_the_subset_are_refused(path: str) -> None:
    with pytest.raises(JsonPathError):
        compile_path(path)


def test_records_the_path_does_not_fit_name_what_is_wrong() -> None:
    with pytest.raises(JsonPathError, match=r"index \[9\] is outside the record's 7 elements"):
        compile_path("$[9]").apply(ROW)
    with pytest.raises(JsonPathError, match="has no key 'nope'"):
        compile_path("$.nope").apply(DOC)
    with pytest.raises(JsonPathError, match="select from arrays"):
        compile_path("$[0,1]").apply(DOC)

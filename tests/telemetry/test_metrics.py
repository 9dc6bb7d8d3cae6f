"""Metric definitions: numbers in every form, a regex with no group, a regex that never matches."""

from __future__ import annotations

import logging
import math

import pytest

from agent.errors import ConfigError
from agent.job import MetricDefinition
from agent.telemetry.metrics import MetricMatcher, parse_definitions, parse_number

LOG = logging.getLogger("test.metrics")


@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3.0),
        ("-7", -7.0),
        ("+2", 2.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("5.", 5.0),
        ("1e-3", 1e-3),
        ("2.5E+4", 2.5e4),
        ("-1.25e2", -125.0),
        ("inf", math.inf),
        ("-inf", -math.inf),
        ("Infinity", math.inf),
        ("0.25,", 0.25),
        ("12%", 12.0),
        ("1_000", 1000.0),
        (" 4.0", 4.0),
    ],
)
def test_parse_number_every_form(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan"])
def test_parse_number_nan(text):
    assert math.isnan(parse_number(text))


@pytest.mark.parametrize("text", ["abc", "", "loss", "-", "e5"])
def test_parse_number_refuses_non_numbers(text):
    assert parse_number(text) is None


def _scan(definitions, text):
    matcher = MetricMatcher(definitions, log=LOG)
    return matcher, matcher.scan(text, time=1.0, host="algo-2", rank=5)


def test_values_in_every_form_from_lines():
    text = "epoch=1 loss=0.5\nloss=1e-3 acc=97%\nloss=nan\nloss=-inf\nno metric here\nloss=7\n"
    matcher, points = _scan(
        [MetricDefinition("train:loss", r"loss=(\S+)"), MetricDefinition("acc", r"acc=([0-9.]+)%")],
        text,
    )
    values = [p.value for p in points if p.name == "train:loss"]
    assert values[:2] == [0.5, 1e-3] and math.isnan(values[2]) and values[3:] == [-math.inf, 7.0]
    assert [p.value for p in points if p.name == "acc"] == [97.0]
    assert {(p.host, p.rank, p.time) for p in points} == {("algo-2", 5, 1.0)}
    assert matcher.never_matched() == []


def test_non_finite_values_are_json_safe_strings():
    _, points = _scan([MetricDefinition("x", r"x=(\S+)")], "x=nan\nx=inf\nx=-inf\nx=2\n")
    assert [p.as_json()["value"] for p in points] == ["nan", "inf", "-inf", 2.0]


def test_regex_without_group_warns_and_is_dropped(caplog):
    with caplog.at_level(logging.WARNING):
        matcher, points = _scan([MetricDefinition("bad", r"loss=\S+")], "loss=1\n")
    assert points == [] and not matcher
    assert "'bad'" in caplog.text and "no capture group" in caplog.text


def test_regex_never_matched_is_reported(caplog):
    matcher, points = _scan([MetricDefinition("val:acc", r"val_acc=(\S+)")], "loss=1\n")
    assert points == [] and matcher.never_matched() == ["val:acc"]
    with caplog.at_level(logging.WARNING):
        matcher.warn_never_matched()
    assert "'val:acc'" in caplog.text and "never matched" in caplog.text


def test_a_capture_that_is_not_a_number_warns_once(caplog):
    with caplog.at_level(logging.WARNING):
        _matcher, points = _scan(
            [MetricDefinition("phase", r"phase=(\S+)")], "phase=warmup\nphase=train\n"
        )
    assert points == []
    assert caplog.text.count("not a number") == 1


def test_a_match_never_spans_two_lines():
    _, points = _scan([MetricDefinition("loss", r"loss:\s*(\S+)")], "loss:\n3\nloss: 4\n")
    assert [p.value for p in points] == [4.0]


def test_anchors_work_per_line():
    _, points = _scan([MetricDefinition("v", r"^v=(\d+)$")], "v=1\nxv=2\nv=3\n")
    assert [p.value for p in points] == [1.0, 3.0]


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="does not compile"):
        MetricMatcher([MetricDefinition("x", "loss=(")], log=LOG)


def test_parse_definitions_sagemaker_json():
    assert parse_definitions('[{"Name": "train:loss", "Regex": "loss=(\\\\S+)"}]') == (
        MetricDefinition("train:loss", r"loss=(\S+)"),
    )
    assert parse_definitions(None) == ()
    with pytest.raises(ConfigError, match="not JSON"):
        parse_definitions("[{")
    with pytest.raises(ConfigError, match=r"\[0\]"):
        parse_definitions('[{"Name": 1}]')

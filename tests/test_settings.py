"""agent/settings.py: typed parts declared once, checked on every way in, one port check."""

from __future__ import annotations

import dataclasses

import pytest

from agent.errors import ConfigError
from agent.settings import (
    ALL_SETTINGS,
    PARTS,
    DistributedSettings,
    ServingSettings,
    Settings,
    check_port,
    read_settings,
)


def test_every_setting_is_a_typed_field_of_its_part() -> None:
    fields = {f.name: (part.SECTION, f) for part in PARTS for f in dataclasses.fields(part)}
    assert set(fields) == {s.name for s in ALL_SETTINGS}
    for declared in ALL_SETTINGS:
        section, field = fields[declared.name]
        assert declared.section == section and field.default == declared.default
    assert Settings() == read_settings({}), "the defaults are the declarations' defaults"


def test_values_are_parsed_to_their_types() -> None:
    settings = read_settings(
        {
            "TORCHBAY_SERVE_BATCH_SIZE": "4",
            "TORCHBAY_SERVE_PRELOAD": "off",
            "TORCHBAY_GRACE_PERIOD": "2.5",
            "TORCHBAY_NPROC_PER_NODE": "",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
        }
    )
    assert settings.serving.serve_batch_size == 4
    assert settings.serving.serve_preload is False
    assert settings.train.grace_period == 2.5
    assert settings.distributed.nproc_per_node is None
    assert settings.serving.serve_workers == 3
    assert settings.as_dict()["serve_workers"] == 3


def test_replace_checks_the_new_value_and_knows_every_name() -> None:
    settings = read_settings({})
    assert settings.replace(serve_port=9000, data_threads=2).serving.serve_port == 9000
    with pytest.raises(ConfigError, match="serve_batch_size=0"):
        settings.replace(serve_batch_size=0)
    with pytest.raises(AttributeError, match="no setting named 'nope'"):
        settings.replace(nope=1)
    with pytest.raises(ConfigError, match="must be greater than 0"):
        ServingSettings(serve_timeout=-1.0)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"SAGEMAKER_BIND_TO_PORT": "70000"}, ["SAGEMAKER_BIND_TO_PORT='70000'", "0 to 65535"]),
        ({"TORCHBAY_PROMETHEUS_PORT": "-1"}, ["TORCHBAY_PROMETHEUS_PORT", "0 to 65535"]),
        ({"TORCHBAY_EXCHANGE_PORT": "65536"}, ["TORCHBAY_EXCHANGE_PORT", "(0 off)"]),
        ({"TORCHBAY_MASTER_PORT": "0"}, ["TORCHBAY_MASTER_PORT='0'", "1 to 65535"]),
    ],
)
def test_every_port_goes_through_the_one_port_check(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        read_settings(env)
    for word in words:
        assert word in str(info.value)


def test_check_port() -> None:
    check_port(1)
    check_port(65535)
    check_port(0, zero="picks a free one")
    check_port(None)
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError, match="1 to 65535"):
            check_port(bad)
    assert DistributedSettings(master_port=4321).master_port == 4321

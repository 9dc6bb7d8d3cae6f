"""agent/redact.py: which names look secret, masking values in text, argv and log records."""

from __future__ import annotations

import logging

import pytest

from agent.redact import MASK, RedactingFilter, Redactor, looks_secret, normalize_name


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "db_password",
        "PASSWD",
        "api_token",
        "apiToken",
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "client_secret",
        "api-key",
        "WANDB_API_KEY",
        "private_key",
        "aws_session_token",
        "credentials",
        "auth",
        "SM_HP_API-TOKEN",
        "learning_rate_key",
    ],
)
def test_secret_names(name: str) -> None:
    assert looks_secret(name)


@pytest.mark.parametrize(
    "name",
    [
        "epochs",
        "learning_rate",
        "max_tokens",
        "tokenizer",
        "key_dim",
        "num_keys",
        "keyboard",
        "monkey",
        "author",
        "AWS_ACCESS_KEY_ID",
        "AWS_REGION",
        "batch_size",
        "PWD",
        "OLDPWD",
    ],
)
def test_plain_names(name: str) -> None:
    assert not looks_secret(name)


def test_normalize_name() -> None:
    assert normalize_name("apiToken") == "api_token"
    assert normalize_name("SM_HP_API-TOKEN") == "sm_hp_api_token"


def test_learnt_values_are_masked_in_every_spelling() -> None:
    redactor = Redactor()
    redactor.learn(
        {
            "password": '"hunter2-pass"',
            "epochs": "3",
            "pin": "12",
            "api_key": "ab",
            "DB_URL": "postgres://bob:s3cr3t-pw@db:5432/x",
            "nested_token": '{"a": "inner-tok-1"}',
        }
    )
    text = redactor.text(
        '--password hunter2-pass {"password": "hunter2-pass"} postgres://bob:s3cr3t-pw@db epochs 3'
    )
    assert "hunter2-pass" not in text and "s3cr3t-pw" not in text and "epochs 3" in text
    assert "inner-tok-1" not in redactor.text("k=inner-tok-1")
    assert redactor.data(b"x hunter2-pass y") == b"x **** y"
    # too short to mask as a substring, still masked after its flag
    assert redactor.argv(
        ["python", "train.py", "--api_key", "ab", "--epochs", "3", "--password=hunter2-pass"]
    ) == ["python", "train.py", "--api_key", MASK, "--epochs", "3", f"--password={MASK}"]


def test_pattern_is_settable() -> None:
    redactor = Redactor("^epochs$")
    assert redactor.is_secret("epochs") and not redactor.is_secret("password")


def test_filter_masks_messages_arguments_tracebacks_and_caps_length(caplog) -> None:
    redactor = Redactor()
    redactor.learn({"HF_TOKEN": "hf-abcdefgh"})
    log = logging.getLogger("torchbay.test.redact")
    handler = logging.StreamHandler()
    records: list[str] = []
    handler.emit = lambda record: records.append(handler.format(record))  # type: ignore[method-assign]
    handler.addFilter(RedactingFilter(redactor, max_chars=100))
    log.addHandler(handler)
    try:
        log.warning("token %s here", "hf-abcdefgh")
        try:
            raise ValueError("bad hf-abcdefgh")
        except ValueError:
            log.exception("failed")
        log.warning("x" * 1000)
    finally:
        log.removeHandler(handler)
    assert records[0] == "token **** here"
    assert "hf-abcdefgh" not in records[1] and "ValueError: bad ****" in records[1]
    assert len(records[2]) < 200 and "more characters cut" in records[2]

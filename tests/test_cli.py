"""agent/cli.py: dispatch, usage errors, and the README's settings table kept equal to `torchbay
settings`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EXIT_USAGE, main, settings_table

REPO = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_the_commands_output() -> None:
    readme = (REPO / "README.md").read_text()
    assert settings_table() in readme, (
        "README's settings table is stale: paste `torchbay settings` into it"
    )


def test_every_setting_has_help_and_a_variable() -> None:
    from agent.settings import ALL_SETTINGS

    names = [s.name for s in ALL_SETTINGS]
    assert len(names) == len(set(names)), "a setting is declared twice"
    for setting in ALL_SETTINGS:
        assert setting.env and all(v.isupper() for v in setting.env), setting
        assert len(setting.help) > 10, setting


def test_unknown_subcommand_is_a_usage_error(capsys) -> None:
    assert main(["nope"]) == EXIT_USAGE
    assert "unknown subcommand 'nope'" in capsys.readouterr().err


def test_python_dash_m_agent_cli_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("torchbay ")


def test_readme_keeps_every_part_and_both_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    for part in (
        "train",
        "toolkits",
        "data",
        "telemetry",
        "distributed",
        "serving",
        "images",
        "sync",
        "settings",
        "errors",
    ):
        start = readme.find(f"<!-- section: {part}")
        end = readme.find(f"<!-- end section: {part} -->")
        assert 0 <= start < end, f"README lost its {part} section"
        assert len(readme[start:end].strip().splitlines()) > 5, f"README's {part} section is empty"
    assert "scripts/demo" in readme and "scripts/test" in readme


def test_serve_flags_come_from_the_settings_declarations(capsys) -> None:
    from agent.serving import parse_args
    from agent.settings import ALL_SETTINGS

    declared = {s.name: s for s in ALL_SETTINGS}
    args = parse_args(["--port", "9000", "--workers", "3", "--batch-delay-ms", "2.5"])
    assert (args.serve_port, args.serve_workers, args.serve_batch_delay_ms) == (9000, 3, 2.5)
    assert args.serve_host is None and args.root is None  # not given: the setting decides
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in ("serve_port", "serve_timeout", "serve_http_threads", "root"):
        assert " ".join(declared[name].help.split()) in shown, name
        assert declared[name].env[0] in shown, name


def test_a_flag_is_checked_as_its_setting_is(capsys) -> None:
    from agent.serving import parse_args

    for argv, words in (
        (["--port", "70000"], ["--port", "'70000'", "0 to 65535", "SAGEMAKER_BIND_TO_PORT"]),
        (["--batch-size", "0"], ["--batch-size", "must be greater than 0"]),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (word, err)

"""The scripts people run by hand still start: every benchmark and scripts/gpu-check parse their
arguments."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [*sorted((REPO / "scripts" / "bench").iterdir()), REPO / "scripts" / "gpu-check"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_and_shows_help(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


def _pins(text: str, name: str) -> set[str]:
    return set(re.findall(rf"(?<![\w-]){re.escape(name)}==([0-9][0-9.]*)", text))


def test_every_torch_pin_is_one_version_and_the_extras_install_together() -> None:
    """setup.cfg's extras, scripts/test, scripts/demo and both Dockerfiles name one torch, and the
    torchvision of the ``vision`` extra is the release built for it (0.N+15 for torch 2.N, which
    requires that torch exactly): ``pip install .[torch,vision]`` resolves, and nothing installs
    a second torch."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extras = dict(config["options.extras_require"].items())
    torch_pins = set().union(*(_pins(value, "torch") for value in extras.values()))
    for script in ("scripts/test", "scripts/demo"):
        torch_pins |= _pins((REPO / script).read_text(), "torch")
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (REPO / "dockerfiles" / dockerfile).read_text()
        torch_pins |= set(re.findall(r"^ARG TORCH_VERSION=(\S+)$", text, re.M))
    assert len(torch_pins) == 1, f"torch is pinned to several versions: {sorted(torch_pins)}"
    (torch,) = torch_pins
    (vision,) = _pins(extras["vision"], "torchvision")
    major, minor = (int(part) for part in torch.split(".")[:2])
    assert (major, vision.split(".")[:2]) == (2, ["0", str(minor + 15)]), (
        f"torchvision {vision} is not the release for torch {torch}"
    )

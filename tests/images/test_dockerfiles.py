"""What both Dockerfiles must say, checked without an engine (the CUDA image cannot be built
here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLAVOURS = ("cpu", "cuda")


def _instructions(flavour: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "dockerfiles" / f"Dockerfile.{flavour}").read_text()
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


def _stages(flavour: str) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, args in _instructions(flavour):
        if op == "FROM":
            current = args.split()[-1]
            stages[current] = []
        elif current is not None:
            stages[current].append((op, args))
    return stages


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_syntax_line_and_upstream_base_by_default(flavour: str) -> None:
    text = (REPO / "dockerfiles" / f"Dockerfile.{flavour}").read_text()
    assert "# syntax=" not in text.lower(), (
        "a syntax line makes BuildKit pull its frontend from a registry"
    )
    first = _instructions(flavour)[0]
    assert first[0] == "ARG" and first[1].startswith("BASE_IMAGE=")
    default = first[1].split("=", 1)[1]
    expected = "debian:bookworm-slim" if flavour == "cpu" else "nvidia/cuda:"
    assert default.startswith(expected) and ("runtime" in default if flavour == "cuda" else True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_targets_entrypoint_user_and_healthcheck(flavour: str) -> None:
    stages = _stages(flavour)
    assert {"builder", "runtime", "train", "serve"} <= set(stages)
    runtime = dict(stages["runtime"])
    assert json.loads(runtime["ENTRYPOINT"]) == ["/usr/bin/tini", "--"], (
        "tini must be PID 1, exec form"
    )
    assert json.loads(dict(stages["train"])["CMD"]) == ["train"]
    serve = dict(stages["serve"])
    assert json.loads(serve["CMD"]) == ["serve"]
    user = serve["USER"].replace("${SERVE_UID}", "1000").split(":")[0]
    assert user.isdigit() and user != "0", (
        f"serve must run as a numeric non-root user, not {serve['USER']}"
    )
    assert "/ping" in serve["HEALTHCHECK"] and "CMD [" in serve["HEALTHCHECK"]
    assert any(
        op == "COPY" and "--from=builder /opt/venv /opt/venv" in args
        for op, args in stages["runtime"]
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_pip_steps_take_the_ca_bundle_only_as_a_secret(flavour: str) -> None:
    for op, args in _instructions(flavour):
        if op == "RUN" and "pip install" in args and "--no-index" not in args:
            assert "--mount=type=secret,id=cabundle" in args, args
        if op in ("COPY", "ADD", "ENV", "ARG"):
            assert not re.search(r"\.(crt|pem)\b|PIP_CERT|REQUESTS_CA_BUNDLE|\.whl", args), (
                f"{op} {args}"
            )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_environment_and_labels(flavour: str) -> None:
    text = " ".join(args for op, args in _instructions(flavour) if op in ("ENV", "LABEL"))
    for needed in (
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
        "LANG=C.UTF-8",
        "org.opencontainers.image.version=",
        "org.opencontainers.image.revision=",
        "ai.torchbay.framework_version=",
        "ai.torchbay.toolkit_version=",
    ):
        assert needed in text, needed
    if flavour == "cuda":
        assert "NVIDIA_VISIBLE_DEVICES=all" in text
        assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
        assert "ai.torchbay.cuda_version=" in text


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and line[0] != "#"
    ]
    assert lines[0] == "**"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert {"agent/**", "setup.cfg", "pyproject.toml", "entrypoints/*"} <= allowed
    assert not any(a.startswith((".venv", ".git", "tests")) for a in allowed)


def test_cuda_shares_the_cpu_layers_up_to_its_own_part() -> None:
    """base, builder and the start of runtime are instruction for instruction the CPU image's, so
    one machine building both (CI: the CUDA targets with the CPU torch stand-in) reuses those
    layers."""

    def names(stage: list[tuple[str, str]]) -> list[tuple[str, str]]:
        # An ARG's default may differ (TORCH_INDEX_URL); build-images passes the same value to both.
        return [(op, args.split("=", 1)[0] if op == "ARG" else args) for op, args in stage]

    cpu = {name: names(stage) for name, stage in _stages("cpu").items()}
    cuda = {name: names(stage) for name, stage in _stages("cuda").items()}
    assert cuda["base"] == cpu["base"] and cuda["builder"] == cpu["builder"]
    shared = next(i for i, (op, args) in enumerate(cpu["runtime"]) if op == "RUN") + 1
    assert cuda["runtime"][:shared] == cpu["runtime"][:shared]
    own = dict(cuda["runtime"][shared:])
    assert "NVIDIA_VISIBLE_DEVICES=all" in own["ENV"] and "TORCH_VARIANT" in " ".join(
        args for op, args in cuda["runtime"][shared:] if op == "ARG"
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_serve_image_declares_multi_model_support(flavour: str) -> None:
    """SageMaker hosts a multi-model endpoint only on an image carrying this label (serve images
    only)."""
    label = 'com.amazonaws.sagemaker.capabilities.multi-models="true"'
    for name, stage in _stages(flavour).items():
        labels = " ".join(args for op, args in stage if op == "LABEL")
        if 'container_type="inference"' in labels:
            assert label in labels, name
        else:
            assert label not in labels, name

"""The pip guard: requirements that would replace a package the agent needs are refused before pip
runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InstallError, PackageConflictError
from agent.pipguard import (
    Needed,
    agent_needs,
    check_requirement_files,
    conflict_from_pip,
    write_constraints,
)

NEEDED = {
    "flask": Needed("Flask", "3.1.3", ">=2.3", ("torchbay",)),
    "werkzeug": Needed("Werkzeug", "3.1.3", ">=3.1", ("Flask",)),
    "torchbay": Needed("torchbay", "0.1.0", "==0.1.0", ("the agent",)),
    "jmespath": Needed("jmespath", "1.0.1", "", ("botocore",)),
}


def _check(tmp_path: Path, text: str) -> None:
    (tmp_path / "requirements.txt").write_text(text)
    check_requirement_files([tmp_path / "requirements.txt"], NEEDED, what="requirements.txt")


def test_installed_closure_holds_the_agents_ranges() -> None:
    needed = agent_needs()
    if not needed:
        pytest.skip("torchbay is not installed in this environment")
    assert needed["flask"].specifier == ">=2.3" and "torchbay" in needed["flask"].required_by
    assert needed["torchbay"].specifier == f"=={needed['torchbay'].installed}"
    assert "werkzeug" in needed and "botocore" in needed and "packaging" in needed
    assert "torch" not in needed and "pytest" not in needed  # extras are not the agent's needs


def test_old_flask_pin_is_refused_with_package_version_and_range(tmp_path: Path) -> None:
    with pytest.raises(PackageConflictError) as caught:
        _check(tmp_path, "numpy\n# an old stack\nflask==1.1.1  # pinned by an old tutorial\n")
    err = caught.value
    assert isinstance(err, InstallError) and err.exit_code == 75
    assert (err.package, err.asked, err.needed) == ("Flask", "flask==1.1.1", ">=2.3")
    text = str(err)
    assert (
        "requirements.txt asks for flask==1.1.1" in text
        and "Flask>=2.3" in text
        and "installed: 3.1.3" in text
    )
    assert "nothing from requirements.txt was installed" in text


@pytest.mark.parametrize(
    "text",
    [
        "flask==3.0.0\n",
        "flask>=1.0\n",
        "Werkzeug~=3.1\n",
        "jmespath==0.9.0\n",
        "requests==2.0.0\n",
        "flask==1.1.1 ; python_version < '3.0'\n",
        "git+https://example.invalid/x.git#egg=x\n",
        "-e .\n",
        "--index-url x\n",
    ],
)
def test_allowed_requirements(tmp_path: Path, text: str) -> None:
    _check(tmp_path, text)


def test_included_files_and_the_agent_itself(tmp_path: Path) -> None:
    (tmp_path / "more.txt").write_text("werkzeug==2.0.3\n")
    with pytest.raises(PackageConflictError, match="more.txt asks for werkzeug==2.0.3"):
        _check(tmp_path, "-r more.txt\n")
    with pytest.raises(PackageConflictError, match="torchbay"):
        _check(tmp_path, "torchbay>=0.2\n")


def test_sagemaker_containers_is_refused_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(PackageConflictError) as caught:
        _check(tmp_path, "sagemaker-containers>=2.8\n")
    text = str(caught.value)
    assert "cannot run on Python 3.10+" in text and "flask==1.1.1" in text
    assert "sagemaker_containers.training_env()" in text and caught.value.exit_code == 75


def test_constraints_file(tmp_path: Path) -> None:
    text = write_constraints(NEEDED, tmp_path / "c.txt").read_text()
    assert "flask>=2.3\n" in text and "torchbay==0.1.0\n" in text and "werkzeug>=3.1\n" in text
    assert "jmespath" not in text  # no range: any version will do


PIP_CONFLICT = """\
ERROR: Cannot install oldapp==0.1 because these package versions have conflicting dependencies.

The conflict is caused by:
    oldapp 0.1 depends on flask==1.1.1
    The user requested (constraint) flask>=2.3

To fix this you could try to:
1. loosen the range of package versions you've specified
"""


def test_a_transitive_conflict_reported_by_pip() -> None:
    err = conflict_from_pip(PIP_CONFLICT.splitlines(), NEEDED, what="the package in code/")
    assert (
        isinstance(err, PackageConflictError)
        and err.package == "Flask"
        and err.asked == "flask==1.1.1"
    )
    assert "oldapp (from the package in code/) depends on flask==1.1.1" in str(err)
    assert (
        conflict_from_pip(["ERROR: No matching distribution found for x==1"], NEEDED, what="x")
        is None
    )
    lines = PIP_CONFLICT.replace("oldapp 0.1", "sagemaker-training 4.0.0").splitlines()
    err = conflict_from_pip(lines, NEEDED, what="requirements.txt")
    assert err is not None
    assert "sagemaker-training (from requirements.txt) (TorchBay provides its Python API" in str(
        err
    )

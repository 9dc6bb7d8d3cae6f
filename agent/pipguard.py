"""The pip guard: the user's requirements may add packages, never replace one the agent itself
needs.

The agent and the user's code share one Python environment (serving runs the user's ``inference.py``
inside the agent's own gunicorn/flask workers, so the two cannot live in separate environments).
Before
pip runs, :func:`agent_needs` walks the installed dependency closure of the ``torchbay``
distribution and
collects, for every package in it, the version range its dependents declare. Then:

1. the requirement files pip is given are read: a pin or range on one of those packages that
   excludes
   every version the agent accepts is refused at once, naming the package, the version asked for and
   the range the agent needs (no network, nothing changed);
2. pip itself runs with a constraints file of those ranges (``-c``), so a requirement that pulls a
   bad
   version in transitively (a package pinning ``flask==1.1.1``) makes pip's resolver stop before it
   installs anything; :func:`conflict_from_pip` turns pip's report into the same message.

A version inside the range is allowed (``flask==3.0.0`` when the agent needs ``flask>=2.3``), and so
is
every package the agent does not use. ``torchbay`` itself is pinned to the installed version.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import PackageConflictError
from agent.storage import write_text_atomically

__all__ = [
    "AGENT_DISTRIBUTION",
    "Needed",
    "agent_needs",
    "check_requirement_files",
    "conflict_from_pip",
    "write_constraints",
]

AGENT_DISTRIBUTION = "torchbay"
_CANON = re.compile(r"[-_.]+")


def canonical(name: str) -> str:
    """PEP 503 normalised name."""
    return _CANON.sub("-", name).lower()


@dataclass(frozen=True)
class Needed:
    """A package in the agent's dependency closure: its installed version and the range its
    dependents need."""

    name: str
    installed: str
    specifier: str  # "" when no dependent constrains the version
    required_by: tuple[str, ...]

    def accepts(self, version: str) -> bool:
        from packaging.specifiers import SpecifierSet  # ~5 ms: only once a version is checked

        return SpecifierSet(self.specifier).contains(version, prereleases=True)

    def describe(self) -> str:
        rng = f"{self.name}{self.specifier}" if self.specifier else f"{self.name} (any version)"
        return f"{rng} (installed: {self.installed}; needed by {', '.join(self.required_by)})"


def agent_needs(root: str = AGENT_DISTRIBUTION) -> dict[str, Needed]:
    """The installed dependency closure of ``root``, by canonical name; {} when ``root`` is not
    installed."""
    from importlib import metadata  # ~33 ms: only when the guard runs

    # packaging (~15 ms): only when the guard runs
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet

    try:
        top = metadata.distribution(root)
    except metadata.PackageNotFoundError:
        return {}
    specs: dict[str, SpecifierSet] = {}
    users: dict[str, list[str]] = {}
    versions: dict[str, str] = {canonical(root): top.version}
    names: dict[str, str] = {canonical(root): top.metadata["Name"] or root}
    queue = [top]
    seen = {canonical(root)}
    while queue:
        dist = queue.pop()
        dist_name = dist.metadata["Name"] or "?"
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = canonical(req.name)
            specs[key] = specs.get(key, SpecifierSet()) & req.specifier
            users.setdefault(key, []).append(dist_name)
            if key in seen:
                continue
            seen.add(key)
            try:
                child = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue  # a broken environment: nothing installed to protect
            versions[key] = child.version
            names[key] = child.metadata["Name"] or req.name
            queue.append(child)
    needed = {
        canonical(root): Needed(
            names[canonical(root)], top.version, f"=={top.version}", ("the agent",)
        )
    }
    for key, version in versions.items():
        if key == canonical(root):
            continue
        needed[key] = Needed(
            names[key], version, str(specs.get(key, "")), tuple(sorted(set(users.get(key, []))))
        )
    return needed


def write_constraints(needed: dict[str, Needed], path: Path) -> Path:
    """A pip constraints file holding every range in ``needed``."""
    lines = [
        f"{canonical(n.name)}{n.specifier}"
        for n in sorted(needed.values(), key=lambda n: n.name.lower())
        if n.specifier
    ]
    write_text_atomically(
        path, "# The versions TorchBay itself needs (agent/pipguard.py)\n" + "\n".join(lines) + "\n"
    )
    return path


def _requirement_lines(path: Path, depth: int = 0) -> Iterable[tuple[Path, str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    joined = re.sub(r"\\\n", "", text)
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if parts[0] in ("-r", "--requirement") and len(parts) == 2 and depth < 5:
            yield from _requirement_lines(path.parent / parts[1].strip(), depth + 1)
        elif not line.startswith("-"):
            yield path, line


def check_requirement_files(files: Sequence[Path], needed: dict[str, Needed], *, what: str) -> None:
    """Raise PackageConflictError for a requirement in ``files`` that no version the agent accepts
    satisfies."""
    if not needed:
        return
    from packaging.requirements import InvalidRequirement, Requirement  # ~15 ms: needed only

    for path in files:
        for origin, line in _requirement_lines(path):
            try:
                req = Requirement(line.split(" --", 1)[0].strip())
            except InvalidRequirement:
                continue  # a URL or a path: pip's resolver and the constraints judge it
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonical(req.name) == "sagemaker-containers" and sys.version_info >= (3, 10):
                raise PackageConflictError(
                    f"{origin.name} asks for {line}, which cannot run on Python 3.10+ (it imports "
                    "collections.Mapping) and pins flask==1.1.1, which would replace the agent's "
                    "Flask; nothing "
                    f"from {what} was installed. Remove it: TorchBay provides "
                    "sagemaker_containers.training_env() "
                    "and sagemaker_containers.beta.framework itself (README: 'The SageMaker "
                    "toolkits' Python API')",
                    package="sagemaker-containers",
                    asked=line,
                    needed="",
                )
            need = needed.get(canonical(req.name))
            if need is None or not str(req.specifier):
                continue
            if _disjoint(str(req.specifier), need):
                raise _conflict(need, f"{req.name}{req.specifier}", f"{origin.name} asks for", what)


def _disjoint(asked: str, need: Needed) -> bool:
    """True when ``asked`` pins a version (== / ===) the agent's range rejects, or excludes the
    installed one
    while the agent's range is a single version."""
    from packaging.specifiers import SpecifierSet  # ~5 ms: only for a pinned requirement

    asked_set = SpecifierSet(asked)
    pins = [s.version for s in asked_set if s.operator in ("==", "===") and "*" not in s.version]
    if pins:
        return not any(need.accepts(v) for v in pins)
    agent_set = SpecifierSet(need.specifier)
    agent_pins = [
        s.version for s in agent_set if s.operator in ("==", "===") and "*" not in s.version
    ]
    if agent_pins:
        return not any(asked_set.contains(v, prereleases=True) for v in agent_pins)
    return False  # two open ranges: pip's resolver with the constraints decides


def _conflict(need: Needed, asked: str, who: str, what: str) -> PackageConflictError:
    return PackageConflictError(
        f"{who} {asked}, but TorchBay itself needs {need.describe()}; installing it would replace "
        f"a package the agent runs on, so nothing from {what} was installed. Drop the pin or ask "
        f"for a version in {need.name}{need.specifier}",
        package=need.name,
        asked=asked,
        needed=need.specifier,
    )


_TOOLKITS = {"sagemaker-training", "sagemaker-inference", "sagemaker-containers"}
_USER_ASKED = re.compile(
    r"^\s*(?:The user requested|(\S+) \S+ depends on) (?!\(constraint\))(\S+?)\s*$"
)
_CONSTRAINT = re.compile(r"^\s*The user requested \(constraint\) (\S+)\s*$")


def conflict_from_pip(
    lines: Sequence[str], needed: dict[str, Needed], *, what: str
) -> PackageConflictError | None:
    """The PackageConflictError for pip's "conflicting dependencies" report, when a constraint of
    ours is in it."""
    from packaging.requirements import InvalidRequirement, Requirement  # ~15 ms: on failure

    constrained: set[str] = set()
    asked: dict[str, tuple[str, str]] = {}
    for line in lines:
        match = _CONSTRAINT.match(line)
        if match:
            try:
                constrained.add(canonical(Requirement(match.group(1)).name))
            except InvalidRequirement:
                pass
            continue
        match = _USER_ASKED.match(line)
        if match:
            try:
                req = Requirement(match.group(2))
            except InvalidRequirement:
                continue
            who = (
                f"{match.group(1)} (from {what}) depends on"
                if match.group(1)
                else f"{what} asks for"
            )
            if match.group(1) and canonical(match.group(1)) in _TOOLKITS:
                who = (
                    f"{who[: -len(' depends on')]} (TorchBay provides its Python API itself: "
                    "remove it) depends on"
                )
            asked.setdefault(canonical(req.name), (who, f"{req.name}{req.specifier}"))
    for key in sorted(constrained):
        need = needed.get(key)
        if need is not None:
            who, text = asked.get(key, (f"{what} needs", f"another version of {need.name}"))
            return _conflict(need, text, who, what)
    return None

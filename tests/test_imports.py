"""agent/'s import graph, built from the source with ast: no cycles, and no lazy import without a
reason.

Every ``import`` in agent/ counts, in-function ones included (a cycle dodged by importing inside a
function is still a cycle); imports under ``if TYPE_CHECKING:`` never run and do not count.
Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so an edge to a module is
also an edge to each package above it (those above the importer itself are already running).

An import inside a function is allowed only where it keeps something heavy off a start-up path:
a third-party package (torch, boto3/botocore, flask, psutil, ...), a standard-library module
measured to cost milliseconds (``HEAVY_STDLIB``), an agent module measured to cost milliseconds
itself (``COSTLY_AGENT_MODULES``), or an agent module that imports one of those at its top. What
it keeps off must not be loaded already by the file's own top-level imports (followed through
the agent modules they import, and the packages above the file). It must say why in a one-line
comment (on its line, or the line above), and it must not re-import what the file already imports
at its top.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent"
# Not agent modules: put on the user's PYTHONPATH as top-level packages (the toolkit stand-ins).
NOT_AGENT_MODULES = (AGENT / "shims" / "boot", AGENT / "shims" / "packages")

# Standard-library modules that cost milliseconds to import, in ms: the least of 5 runs of
# `python -X importtime -c 'import X'` (cumulative, python 3.12 on the 2-core build box). A
# submodule counts as its package (email.parser is email). Below 2 ms a module is cheap: import it
# at the top.
HEAVY_STDLIB = {
    "asyncio": 58.0,
    "concurrent.futures": 12.0,
    "ctypes": 2.0,
    "email": 15.0,  # email.parser
    "gzip": 2.0,
    "hashlib": 4.2,  # loads OpenSSL
    "http.client": 24.0,  # pulls ssl and email
    "importlib.metadata": 33.0,
    "inspect": 7.9,
    "multiprocessing": 9.7,
    "shutil": 3.7,
    "socket": 3.5,
    "ssl": 10.6,
    "subprocess": 4.8,
    "tarfile": 8.0,
    "tempfile": 7.2,
    "urllib.request": 29.0,  # pulls http.client
    "uuid": 4.1,
    "zipfile": 7.6,
}

# Agent modules whose own import (their code and cheap imports, not a heavy one) costs milliseconds,
# measured like HEAVY_STDLIB over what agent.training already loads; with what they cost.
COSTLY_AGENT_MODULES = {
    "agent.data.pipes": "the Pipe feeder with fcntl, termios and select: ~4 ms",
    "agent.pipguard": "the pip guard: ~4 ms",
    "agent.sync": "live sync's scheduler, folders and restore: ~10 ms",
    "agent.telemetry.shipping": "the job-log shipper: ~2 ms",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: str  # its file, relative to the repository
    target: str  # the module imported (``from a import b``: a.b when that is a module, else a)
    line: int
    in_function: bool
    has_reason: bool  # a comment on the statement's lines or the line above


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def agent_modules() -> dict[str, Path]:
    """Every agent module: dotted name -> file."""
    modules = {}
    for path in sorted(AGENT.rglob("*.py")):
        if any(path.is_relative_to(skip) for skip in NOT_AGENT_MODULES):
            continue
        modules[_module_name(path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for orelse in child.orelse:  # the else branch of TYPE_CHECKING runs
                yield from _walk_one(orelse, in_function)
            continue
        yield from _walk_one(child, in_function)


def _walk_one(
    node: ast.AST, in_function: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, in_function
        return
    inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    yield from _walk(node, inner)


def _has_comment(lines: list[str], start: int, end: int) -> bool:
    """A comment on the statement's lines, or on its own line above it or above the run of import
    lines the statement ends (one reason for a block of imports)."""
    if any("#" in lines[n - 1] for n in range(start, end + 1)):
        return True
    above = start - 1
    while above >= 1 and lines[above - 1].strip().startswith(("import ", "from ")):
        above -= 1
    return above >= 1 and lines[above - 1].strip().startswith("#")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, in_function in _walk(ast.parse(source, str(path)), False):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # a module of agent's, or a heavy stdlib one (`from importlib import metadata`)
                targets.append(sub if sub in modules or _heavy_stdlib(sub) else base)
        reason = _has_comment(lines, node.lineno, node.end_lineno or node.lineno)
        where = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        found += [
            Import(module, where, t, node.lineno, in_function, reason)
            for t in dict.fromkeys(targets)
        ]
    return found


def all_imports() -> list[Import]:
    modules = agent_modules()
    return [i for m, p in modules.items() for i in imports_of(m, p, modules)]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def graph(imports: list[Import], *, top_level_only: bool = False) -> dict[str, set[str]]:
    """Agent module -> the agent modules importing it runs (packages above targets included)."""
    modules = set(agent_modules()) | {i.module for i in imports}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if top_level_only and imp.in_function:
            continue
        if imp.target not in modules:
            continue
        mine = {imp.module, *_ancestors(imp.module)}
        for target in (*_ancestors(imp.target), imp.target):
            if target in modules and target not in mine:
                edges[imp.module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module, as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.add(item)
                if item == node:
                    break
            if len(component) > 1:
                components.append(component)

    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 10_000))
    try:
        for node in sorted(edges):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(old_limit)
    return [_one_cycle(sorted(c)[0], c, edges) for c in components]


def _one_cycle(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside the component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def _third_party(name: str) -> bool:
    top = name.split(".")[0]
    return top not in sys.stdlib_module_names and top != "agent" and top != "__future__"


def _heavy_stdlib(name: str) -> bool:
    return any(name == heavy or name.startswith(heavy + ".") for heavy in HEAVY_STDLIB)


def _heavy_external(name: str) -> bool:
    return not name.startswith("agent.") and (_third_party(name) or _heavy_stdlib(name))


def _closure(roots: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [r for r in roots if r in edges]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += edges[node] - seen
    return seen


def _loaded_at_top(imports: list[Import]) -> Callable[[set[str]], set[str]]:
    """A function: agent modules -> the heavy things their top-level imports load (heavy
    externals, costly agent modules), through the agent modules they import."""
    edges = graph(imports, top_level_only=True)
    direct: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.in_function and _heavy_external(imp.target):
            direct.setdefault(imp.module, set()).add(imp.target)

    def heavy_of(roots: set[str]) -> set[str]:
        found = _closure(roots, edges)
        return {h for m in found for h in direct.get(m, set())} | (
            found & COSTLY_AGENT_MODULES.keys()
        )

    return heavy_of


def heavy_modules(imports: list[Import]) -> set[str]:
    """Agent modules whose top-level imports reach something heavy (a third-party package, a heavy
    standard-library module, a costly agent module)."""
    heavy_of = _loaded_at_top(imports)
    return {m for m in graph(imports) if heavy_of({m})}


def lazy_import_problems(imports: list[Import]) -> list[str]:
    """Every in-function import that is not a reasoned way to keep something heavy off start-up."""
    heavy_of = _loaded_at_top(imports)
    modules = set(graph(imports))
    at_top: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.in_function:
            at_top.setdefault(imp.module, set()).add(imp.target)
    problems = []
    for imp in imports:
        if not imp.in_function:
            continue
        where = f"{imp.path}:{imp.line}: import of {imp.target}"
        loaded = heavy_of({imp.module, *_ancestors(imp.module)})
        if imp.target in modules:
            kept_off = heavy_of({imp.target}) - loaded
        elif _heavy_external(imp.target) and imp.target not in loaded:
            kept_off = {imp.target}
        else:
            kept_off = set()
        if imp.target in at_top.get(imp.module, set()):
            problems.append(f"{where} inside a function re-imports a top-level import; drop it")
        elif not kept_off:
            already = _heavy_external(imp.target) or bool(heavy_of({imp.target}))
            problems.append(
                f"{where} inside a function keeps nothing heavy off start-up "
                + (
                    "(what it loads, the file's top-level imports load already)"
                    if already
                    else "(not a third-party package, a heavy standard-library module, nor an "
                    "agent module that imports one)"
                )
                + "; import it at the top"
            )
        elif not imp.has_reason:
            problems.append(
                f"{where} inside a function has no reason comment; say in one line why it is lazy"
            )
    return problems


# --- the tests -------------------------------------------------------------------------------
def test_the_graph_sees_every_kind_of_import() -> None:
    imports = all_imports()
    edges = graph(imports)
    assert "agent.job.shapes" in edges["agent.job"], "package re-exports are edges"
    assert "agent.settings" in edges["agent.job.shapes"]
    assert any(i.in_function for i in imports), "in-function imports are counted"
    # a submodule import runs its package first: agent.telemetry.capture -> agent.job (package)
    assert "agent.job" in edges["agent.telemetry.capture"]
    # imports under `if TYPE_CHECKING:` never run: agent.distributed annotates with agent.job's Job
    assert "agent.job" not in edges["agent.distributed.cluster"]
    assert "agent.distributed.identity" in edges["agent.job.load"]


def test_cycle_finder_names_the_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_agent() -> None:
    found = [" -> ".join(c) for c in cycles(graph(all_imports()))]
    assert not found, "import cycles in agent/:\n" + "\n".join(found)


def test_lazy_imports_keep_something_heavy_off_start_up_and_say_why() -> None:
    problems = lazy_import_problems(all_imports())
    assert not problems, "in-function imports:\n" + "\n".join(problems)


def test_heavy_stdlib_figures_are_of_real_modules() -> None:
    for name in HEAVY_STDLIB:
        assert name.split(".")[0] in sys.stdlib_module_names, name
        assert _heavy_stdlib(name) and not _third_party(name)
    assert _heavy_stdlib("email.parser") and not _heavy_stdlib("json")
    assert "importlib.metadata" in {i.target for i in all_imports()}, (
        "from importlib import metadata"
    )
    for name in COSTLY_AGENT_MODULES:
        assert name in agent_modules(), f"COSTLY_AGENT_MODULES names {name}, not an agent module"


def test_lazy_import_rules_catch_each_case(tmp_path: Path) -> None:
    sources = {
        "mod": (
            "import json\n"
            "import agent.boto\n"
            "def f():\n"
            "    import json  # the reason\n"
            "    import agent.errors  # the reason\n"
            "    import torch\n"
            "    import boto3  # the reason: off the start-up path\n"
            "    import resource  # the reason\n"
            "    import http.client  # the reason: pulls ssl and email\n"
            "    import botocore.config  # the reason\n"
            "    import agent.boto2  # the reason\n"
            "    import agent.torchy  # the reason\n"
            "    import agent.sync  # the reason\n"
            "    # one reason for the block\n"
            "    import botocore.session\n"
            "    import botocore.client\n"
            "    x = 1\n"
            "    import botocore.stub\n"
        ),
        "boto": "import botocore.config\n",
        "boto2": "import agent.boto\n",
        "torchy": "import agent.boto\nimport torch\n",
        "sync": "import json\n",
    }
    modules = {"agent.errors": AGENT / "errors.py"}
    for name, source in sources.items():
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        modules[f"agent.{name}"] = path
    imports = [i for m, p in modules.items() for i in imports_of(m, p, modules)]
    problems = lazy_import_problems(imports)
    assert len(problems) == 7, "\n".join(problems)
    assert "json inside a function re-imports" in problems[0]
    assert "agent.errors inside a function keeps nothing heavy" in problems[1]
    assert "(not a third-party package" in problems[1]
    assert "torch inside a function has no reason comment" in problems[2]
    # boto3 and http.client are fine; resource is cheap
    assert "resource inside a function keeps nothing heavy" in problems[3]
    # loaded already by the top-level `import agent.boto`, directly and through agent.boto2
    assert "botocore.config inside a function keeps nothing heavy" in problems[4]
    assert "agent.boto2 inside a function keeps nothing heavy" in problems[5]
    assert "the file's top-level imports load already" in problems[5]
    # the block's comment covers its imports, not one after other code
    assert "botocore.stub inside a function has no reason comment" in problems[6]
    # agent.torchy keeps torch off (agent.boto in it is loaded already); agent.sync costs itself
    assert heavy_modules(imports) >= {"agent.boto", "agent.boto2", "agent.torchy", "agent.sync"}

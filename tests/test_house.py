"""The house's rules, read from the source: arrows point one way (app → core, pipelines → core; never core →
pipelines or app, never pipelines → app), the engine has no import circle, and no module grows past about 450 lines
unless it is listed here with the reason."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ROOMS = ("core", "pipelines", "app")
MAX_LINES = 450
LONGER_ON_PURPOSE = {
    "core/registry.py": "logging, resolving and loading registered models share the MLmodel format checks",
    "core/trainer.py": "the training loop with its budget plan, read top to bottom as one function",
    "core/sweep/run.py": "one Optuna study driven trial by trial as one class (its state is the sweep's)",
    "core/hf.py": "export and import of the Hugging Face format, with the checks of each direction",
}


def modules(room: str) -> dict[str, Path]:
    """Dotted name → file of every Python module under ``room`` (a package's ``__init__`` by the package name)."""
    found = {}
    for path in sorted((REPO / room).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, *, runtime_only: bool) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions; ``runtime_only`` leaves out the imports of an
    ``if TYPE_CHECKING:`` block (they never run, so they cannot close a circle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    if runtime_only:
        for block in ast.walk(tree):
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
                skipped |= {id(node) for statement in block.body for node in ast.walk(statement)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_arrows_point_one_way():
    wrong = []
    for room, forbidden in (("core", ("pipelines", "app")), ("pipelines", ("app",))):
        for name, path in modules(room).items():
            for imported in imports(path, runtime_only=False):
                if imported.split(".")[0] in forbidden:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "arrows must point from app and pipelines to core only:\n" + "\n".join(sorted(wrong))


def test_the_engine_has_no_import_circle():
    known = modules("core")
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for imported in imports(path, runtime_only=True):
            parts = imported.split(".")
            # Importing core.jobs.layout runs core/jobs/__init__.py first: an edge to each package on the way,
            # except the importer's own packages (Python is already running those).
            for end in range(2, len(parts) + 1):
                target = ".".join(parts[:end])
                if target in known and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    circle = _find_circle(graph)
    assert circle is None, "import circle: " + " → ".join(circle)


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_circles():
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_is_long_without_a_reason():
    too_long = []
    for room in ROOMS:
        for path in modules(room).values():
            relative = path.relative_to(REPO).as_posix()
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES and relative not in LONGER_ON_PURPOSE:
                too_long.append(f"{relative}: {lines} lines")
    assert not too_long, f"split these by concern (or say why in LONGER_ON_PURPOSE): {too_long}"


def test_the_list_of_long_modules_is_current():
    """A module that was split, or shrank, leaves the list: the exceptions stay the ones that are needed."""
    stale = []
    for relative in LONGER_ON_PURPOSE:
        path = REPO / relative
        if not path.is_file() or len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES:
            stale.append(relative)
    assert not stale, f"no longer long (or gone), take them off LONGER_ON_PURPOSE: {stale}"

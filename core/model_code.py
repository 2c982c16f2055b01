"""The code a registered model ships: :mod:`core.pyfunc_model` and the modules of ``core`` it imports, directly or
through one another, found by reading their imports. The training loop, jobs, sweeps and the rest of the engine stay
out of the model, which needs only to load its weights and generate."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

CORE_DIR = Path(__file__).resolve().parent
RUNTIME_ENTRY = "pyfunc_model"


def _imported_core_modules(path: Path) -> set[str]:
    """The ``core`` modules that ``path`` imports anywhere (also inside functions: they may be called at run time),
    leaving out imports made only for type checking."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "core" and len(parts) > 1 and (CORE_DIR / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found


def runtime_modules() -> list[str]:
    """Names of the ``core`` modules a registered model needs (``pyfunc_model`` and everything it imports)."""
    needed, queue = set(), [RUNTIME_ENTRY]
    while queue:
        name = queue.pop()
        if name in needed:
            continue
        needed.add(name)
        queue.extend(_imported_core_modules(CORE_DIR / f"{name}.py") - needed)
    return sorted(needed)


def stage_runtime_code(folder: Path) -> Path:
    """A ``core`` package under ``folder`` holding only :func:`runtime_modules`; returns it (a model's code path)."""
    package = folder / "core"
    package.mkdir(parents=True)
    for name in ["__init__", *runtime_modules()]:
        source = CORE_DIR / f"{name}.py"
        if source.is_file():
            shutil.copy2(source, package / source.name)
    return package

"""The house's import rules, read from the code (ast; nothing is imported): no import circle among the project's
modules, counting the imports made at module level (``if TYPE_CHECKING:`` and ``try:`` blocks included: a type-only
circle is still a circle for a reader), and imports that run downwards only — tools → pipeline → the task packages
and ``synthetic`` → ``maecore`` — counting the imports inside functions too."""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

from tests import ROOT

TASKS = ("pretrain", "classification", "detection", "segmentation", "synthetic")
PACKAGES = ("maecore", *TASKS, "pipeline")
# what a package must never import, anywhere in it
BELOW = {"maecore": {*TASKS, "pipeline", "tools"}, **{t: {"pipeline", "tools"} for t in TASKS}, "pipeline": {"tools"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            stack += [s for h in getattr(node, "handlers", []) for s in h.body]


def targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (``from pkg import mod`` names ``pkg.mod`` where that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def test_no_import_circle() -> None:
    graph = {m: {t for node in module_level_imports(ast.parse(p.read_text())) for t in targets(m, node)
                 if t in MODULES and t != m} for m, p in MODULES.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import circle: {' -> '.join(e.args[1])}") from None


def test_imports_run_downwards_only() -> None:
    upward = []
    for m, p in MODULES.items():
        banned = BELOW[m.partition(".")[0]]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                upward += [f"{m} imports {t}" for t in targets(m, node) if t.partition(".")[0] in banned]
    assert not upward, upward

"""The package's architecture read off its source: the layer order stated in ``llada/__init__.py``
holds for every import (lazy ones inside functions too), no module imports one of a higher layer,
there are no import circles but the model's checkpoint <-> transformer tie, library code never
imports the command line, and no module is much over 450 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import llada

SOURCE = Path(llada.__file__).resolve().parent
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The llada modules ``path`` imports, anywhere in it (``from llada.x import y`` counts as
    ``llada.x.y`` when that is a module, else as ``llada.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("llada"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("llada"))
    return found


FILES = sorted(SOURCE.rglob("*.py"))
MODULES = {_module_name(path) for path in FILES}
GRAPH = {_module_name(path): _imports(path) for path in FILES}


def _stated_layers() -> list[str]:
    """The layer order as ``llada/__init__.py``'s docstring states it: 'Layers, lowest first: a, b, ...'."""
    match = re.search(r"Layers, lowest first: ([a-z, ]+)\.", llada.__doc__ or "")
    assert match, "llada/__init__.py's docstring must state 'Layers, lowest first: ...'"
    return [name.strip() for name in match.group(1).split(",")]


def _layer(module: str, layers: list[str]) -> int | None:
    """The module's layer: the index of its package among ``layers``; None for the package's face
    (``llada``, ``llada.__main__``), which may import anything."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    return layers.index(parts[1])


def test_every_package_has_a_stated_layer() -> None:
    packages = {path.relative_to(SOURCE).parts[0] for path in FILES if len(path.relative_to(SOURCE).parts) > 1}
    assert packages == set(_stated_layers())


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module: str) -> None:
    layers = _stated_layers()
    own = _layer(module, layers)
    if own is None:
        return
    higher = sorted(target for target in GRAPH[module] if (_layer(target, layers) or -1) > own)
    assert not higher, f"{module} ({layers[own]}) imports {higher} from a higher layer"


def test_only_the_checkpoint_transformer_tie_is_a_circle() -> None:
    """The import graph's circles, by brute force: a module is in a circle with every module it
    reaches that reaches it back."""
    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for target in GRAPH.get(stack.pop(), ()):
                if target in MODULES and target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    reach = {module: reachable(module) for module in GRAPH}
    circles = {frozenset({m} | {other for other in reach[m] if m in reach[other]}) for m in GRAPH if m in reach[m]}
    assert circles <= {frozenset({"llada.model.checkpoint", "llada.model.transformer"})}, sorted(map(sorted, circles))


def test_library_code_never_imports_the_command_line() -> None:
    offenders = sorted(module for module, targets in GRAPH.items()
                       if not module.startswith("llada.cli") and module not in ("llada.__main__",)
                       and any(target.startswith("llada.cli") for target in targets))
    assert not offenders


def test_no_file_is_much_over_the_size_limit() -> None:
    long = {str(path.relative_to(SOURCE)): n for path in FILES
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"

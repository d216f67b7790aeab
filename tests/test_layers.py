"""The layers import only downward: config -> data -> tokenizer -> shards -> model -> train -> tune -> infer ->
serve -> eval -> demo/cli (docs/architecture.md). Every import counts, including those inside functions and
under ``TYPE_CHECKING``: a lazy upward import is still an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lmforge"

LAYERS = ["config", "data", "tokenizer", "shards", "model", "train", "tune", "infer", "serve", "eval", "demo"]
TOP_LEVEL = {
    "__init__": "config",
    "config": "config",
    "hub": "config",
    "lazy": "config",
    "cli": "demo",
    "__main__": "demo",
}


def layer_of(module: str) -> str:
    """``lmforge.shards.loader`` -> ``shards``; ``lmforge.cli`` -> ``demo`` (the top)."""
    parts = module.split(".")
    assert parts[0] == "lmforge", module
    if len(parts) == 1:
        return "config"
    head = parts[1]
    if head in TOP_LEVEL:
        return TOP_LEVEL[head]
    if head not in LAYERS:
        raise AssertionError(f"lmforge.{head} belongs to no layer: add it to LAYERS and docs/architecture.md")
    return head


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "lmforge" or name.startswith("lmforge.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_go_downward(path: Path) -> None:
    own = LAYERS.index(layer_of(module_name(path)))
    upward = [
        f"line {line}: {name} ({layer_of(name)})"
        for line, name in imported_modules(path)
        if LAYERS.index(layer_of(name)) > own
    ]
    assert not upward, f"{path.relative_to(SRC)} ({LAYERS[own]}) imports upward: " + "; ".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The test above would pass vacuously if the parser missed imports: check it on a known case.
    names = [name for _, name in imported_modules(PACKAGE / "cli.py")]
    assert "lmforge.config" in names
    assert LAYERS.index(layer_of("lmforge.serve.app")) > LAYERS.index(layer_of("lmforge.data.io"))


def module_graph() -> dict[str, set[str]]:
    """Module -> the lmforge modules it imports (an imported name that is a module counts as that module)."""
    modules = {module_name(path) for path in SOURCES}

    def resolve(name: str) -> str | None:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    graph = {}
    for path in SOURCES:
        own = module_name(path)
        graph[own] = {m for _, name in imported_modules(path) if (m := resolve(name)) not in (None, own)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    # package __init__ files re-export lazily, so they take no part in cycles
    assert cycles(module_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the check can tell


def test_the_engine_knows_nothing_of_training() -> None:
    # infer sits above train and tune in the order, but the engine must stay servable without the trainer:
    # code that needs both (GRPO's rollouts) is wired in the top layer (lmforge/demo/rl.py)
    offending = [
        f"{module_name(path)} imports {name}"
        for path in SOURCES
        if module_name(path).startswith("lmforge.infer")
        for _, name in imported_modules(path)
        if layer_of(name) in ("train", "tune")
    ]
    assert offending == []

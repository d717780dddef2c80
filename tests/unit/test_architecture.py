"""The package's shape: no import cycles, and a pure core that imports no web stack.

Read from the source with ``ast``, so a lazy import inside a function counts as much as
one at the top: a cycle that only bites at run time is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

#: The pure core: numbers and plain data in, numbers and decisions out.
CORE = ("proxy.confidence", "proxy.policy", "proxy.verdict", "proxy.judge", "proxy.evidence")
WEB = ("fastapi", "starlette", "httpx", "aiohttp", "uvicorn", "proxy.evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, name: str) -> Iterator[str]:
    """Every module ``path`` imports, type-only imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            # ``from proxy.confidence import selective`` imports a module, not a name.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for target in imports(path, name):
            # Importing a.b.c runs a/__init__ and a/b/__init__ first.
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        edges[name] = {
            t for t in targets if t in known and t != name and not name.startswith(t + ".")
        }
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None (depth-first, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " → ".join(cycle or [])


def _closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return seen


@pytest.mark.parametrize(
    "name", sorted(n for n in modules() if n.startswith(CORE)), ids=lambda n: n
)
def test_the_core_imports_no_web_stack_and_no_evaluation(name: str) -> None:
    known, edges = modules(), graph()
    # Everything the module pulls in, directly or through other proxy modules.
    reached = _closure(name, edges)
    external = {t for m in reached for t in imports(known[m], m)}
    banned = sorted(t for t in external | reached if t.split(".")[0] in WEB or t.startswith(WEB))
    assert banned == [], f"{name} reaches {banned}"

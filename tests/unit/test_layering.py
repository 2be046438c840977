"""The package's import graph: no cycles, and the cores stay free of asyncio.

Every import counts (module level, inside functions, under TYPE_CHECKING): a
lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import p2pnode

ROOT = Path(p2pnode.__file__).parent

# Pure cores: protocol logic that takes bytes and a time (DESIGN.md).
PURE = (
    "p2pnode.net.core",
    "p2pnode.net.session",
    "p2pnode.dht.core",
    "p2pnode.dht.codec",
    "p2pnode.dht.rpc_schema",
    "p2pnode.exchange.policy",
    "p2pnode.exchange.picker",
    "p2pnode.ratelimit",
    "p2pnode.wire.frame",
    "p2pnode.wire.messages",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _ignoring_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package __init__ that re-exports its modules is not a layer of its own:
    # `p2pnode.net` -> `p2pnode.net.host` -> `p2pnode.net.config` is no cycle.
    packages = {n for n in graph if (ROOT.parent / n.replace(".", "/") / "__init__.py").exists()}
    return {
        n: {m for m in deps if m not in packages} for n, deps in graph.items() if n not in packages
    }


def test_no_import_cycle_between_modules() -> None:
    assert _cycle(_ignoring_packages(_graph())) is None


def test_control_does_not_import_the_node() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("p2pnode.control"):
            assert "p2pnode.node" not in deps, name


def test_pure_cores_import_no_asyncio() -> None:
    for name in PURE:
        path = ROOT.parent / (name.replace(".", "/") + ".py")
        assert path.exists(), name
        assert not any(m == "asyncio" or m.startswith("asyncio.") for m in _imports(path, name)), (
            f"{name} imports asyncio"
        )

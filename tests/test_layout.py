"""The harness' module graph: imports at module level (those run when a module is imported) form no circle. A lazy
import inside a function is how a module reaches one that would close a circle, and says so where it stands."""

from __future__ import annotations

import ast
from pathlib import Path

import conformance

ROOT = Path(conformance.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports at its top level (not under ``if TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("conformance"):
                out.add(target)
                out.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import flux` imports a module
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("conformance"))
    return out


def test_no_import_circle():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}
    # a module's import also runs its packages' __init__: an edge to each enclosing package
    for name in list(graph):
        for target in list(graph[name]):
            parts = target.split(".")
            graph[name].update(p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if p in modules and not name.startswith(p))
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)

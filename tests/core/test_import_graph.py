"""The packages are layered: services import drivers and the kernel (gateway), drivers import
the kernel, and the kernel imports neither. It names drivers and services only in its
registry of parts (`gateway/parts.py`), as module paths loaded when a config uses them.

The graph is read from the source with `ast`: every import statement counts, those inside
functions too (they run, only later), except under `if TYPE_CHECKING:` (never run).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "drivers", "services")


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                assert isinstance(child, ast.If)
                todo.extend(child.orelse)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            todo.append(child)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not node.level:
        return [node.module or ""]
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return [".".join([*base, node.module] if node.module else base)]


def package_graph() -> dict[str, dict[str, list[str]]]:
    """importing package -> imported package -> the imports making that edge ("file:line")."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module, is_package = _module_name(path)
            for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
                for target in _targets(node, module, is_package):
                    top = target.split(".")[0]
                    if top in PACKAGES and top != package:
                        where = f"{path.relative_to(ROOT)}:{node.lineno} imports {target}"
                        graph[package].setdefault(top, []).append(where)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every cycle of packages, each once, as [a, b, ..., a]."""
    found: list[list[str]] = []

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], {})):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle from its smallest member
                walk([*path, nxt])

    for start in sorted(graph):
        walk([start])
    return found


def test_no_import_cycle_among_the_packages() -> None:
    graph = package_graph()
    problems = []
    for cycle in cycles(graph):
        problems.append(" -> ".join(cycle))
        for a, b in itertools.pairwise(cycle):
            problems.extend(f"    {where}" for where in graph[a][b][:5])
    assert not problems, "import cycle(s):\n" + "\n".join(problems)


def test_the_kernel_names_drivers_and_services_only_in_its_registry() -> None:
    """A module path in a string is an import too, only later: the registry is the one place."""
    found = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path == ROOT / "gateway" / "parts.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                head = node.value.split(":")[0].split(".")[0]
                if head in ("drivers", "services") and "." in node.value.split(":")[0]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


def test_the_check_sees_a_cycle() -> None:
    """The walk itself: a two-package and a three-package cycle are found, a chain is not."""
    graph: dict[str, dict[str, list[str]]] = {
        "a": {"b": ["x"]}, "b": {"a": ["y"], "c": ["z"]}, "c": {"d": ["w"]}, "d": {"b": ["v"]},
    }  # fmt: skip
    assert cycles(graph) == [["a", "b", "a"], ["b", "c", "d", "b"]]
    assert cycles({"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {}}) == []

"""The import graph of hf_memedit has no cycle: every import counts, those under `if TYPE_CHECKING:` and inside
functions included, so no module leans on another that leans back on it (a cycle that only runs because one edge
is type-only or deferred is still a cycle to a reader)."""

import ast
from pathlib import Path

from .helpers import ROOT


SRC = ROOT / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC, package: str = "hf_memedit") -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, read with `ast` from every file under src/<package>."""
    files = {_module_name(path, src): path for path in (src / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1 packages
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from package import module` imports the module; `from module import name`, the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[name].update(target for target in targets if target in files and target != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_src_has_no_import_cycle():
    graph = import_graph()
    assert "hf_memedit.experiments.job_config" in graph and graph["hf_memedit.experiments.run"]  # the walk found them
    found = cycles(graph)
    assert not found, "import cycles in src/hf_memedit:\n" + "\n".join(" <-> ".join(cycle) for cycle in found)


def test_the_walk_sees_type_only_deferred_and_relative_imports(tmp_path):
    """A cycle closed only under TYPE_CHECKING, or only inside a function, is found; `from . import module`,
    `from ..package import name` and absolute imports resolve to the right module."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "from . import a\nclass B: ...\n",
        "c.py": "def f():\n    from pkg.sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..c import f\n",
        "e.py": "import json\nfrom .sub import d\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"} and graph["pkg.e"] == {"pkg.sub.d"}
    assert graph["pkg.sub.d"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.sub.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]

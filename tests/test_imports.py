"""No import cycles among the Python modules of dct_kernels/ and of bench/.

Every import statement counts, at module level or inside a function (a deferred import hides a
cycle from the interpreter, not from a reader): it is an edge from the importing module to the
module it names (``from p import x`` names ``p.x`` when that is a module, else ``p``). Modules
are named as Python imports them: dct_kernels's from the repository root, bench's from bench/
(``run``, ``dlrm.cli``), which is sys.path[0] when a bench script runs. Imports of anything
else (torch, the standard library, a module that does not exist) are not edges.
"""

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (folder to scan, the folder module names are relative to)
TREES = (("dct_kernels", "."), ("bench", "bench"))
SKIPPED_DIRS = {"__pycache__", "results"}


def find_modules(root: str = ROOT) -> Dict[str, tuple]:
    """Every module of the scanned trees: dotted name -> (file path, whether it is a package's
    ``__init__``)."""
    found = {}
    for tree, base in TREES:
        for folder, dirs, files in os.walk(os.path.join(root, tree)):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.join(root, base))[:-3]
                dotted = dotted.replace(os.sep, ".")
                is_package = dotted == "__init__" or dotted.endswith(".__init__")
                if is_package:
                    dotted = dotted[:-len(".__init__")]
                found[dotted] = (path, is_package)
    return found


def import_graph(modules: Dict[str, tuple]) -> Dict[str, Set[str]]:
    """Each module mapped to the modules of ``modules`` that it imports."""
    graph = {}
    for name, (path, is_package) in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(p for p in parts + [node.module or ""] if p)
                else:
                    source = node.module
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    edges.add(submodule if submodule in modules else source)
        edges.discard(name)
        graph[name] = {edge for edge in edges if edge in modules}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The groups of two or more modules that import one another, directly or through others
    (the graph's strongly connected components), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_imports():
    graph = import_graph(find_modules())
    assert "dct_kernels.ops" in graph["dct_kernels"]
    assert "dct_kernels.payload" in graph["dct_kernels.ops"]
    assert "dlrm.cli" in graph["train_dlrm"]
    assert "results_table" in graph["run"]
    assert "dlrm.runner" in graph["dlrm.cli"]


def test_no_import_cycles():
    found = cycles(import_graph(find_modules()))
    assert not found, "modules that import one another: " + "; ".join(
        " <-> ".join(group) for group in found)

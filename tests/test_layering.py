"""The library's import graph points only down: every import of an ``ebft`` module from another one
(top-level or inside a function) goes to the same or a lower layer, and the module graph has no cycle.

The layers come from the folders: each package's ``__init__`` docstring starts with ``Layer N:``, and
every module belongs to the layer of its package (the modules at the top of ``ebft/`` to layer 0), so
no folder mixes layers and the map is the folders themselves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ebft"

NEVER = (("ebft.methods", "ebft.eval"),)
"""(importer, imported) packages of one layer that must not import each other that way."""


def package_layers() -> dict[str, int]:
    """``{package: layer}`` read from the first line ``Layer N:`` of each package's ``__init__`` docstring
    (the root package states it in a line of its docstring)."""
    layers = {}
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        found = re.search(r"^Layer (\d+):", doc, re.MULTILINE)
        assert found, f"{init} has no 'Layer N:' line in its docstring: say which layer the folder is"
        layers[module_name(init)] = int(found.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The ``ebft`` modules ``path`` imports anywhere in its code (``from a import b`` counts as
    ``a.b`` when that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "ebft" or name.startswith("ebft."))
    return found


def layer_of(module: str, layers: dict[str, int] | None = None) -> int:
    """The layer of the package that holds ``module`` (a package is in its own layer)."""
    layers = package_layers() if layers is None else layers
    package = module if module in layers else module.rpartition(".")[0]
    assert package in layers, f"{module} is in no package with a layer"
    return layers[package]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges = {name: imported(path, known) - {name} for name, path in mods.items()}
    for name, targets in edges.items():
        unknown = targets - known
        assert not unknown, f"{name} imports {sorted(unknown)}, which are not modules of the package"
    return edges


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_folder_states_its_layer_and_they_stack():
    layers = package_layers()
    assert layers["ebft"] == 0
    assert {p: layers[p] for p in layers if p.count(".") == 1} == {
        "ebft.core": 1, "ebft.execution": 1, "ebft.models": 2, "ebft.objectives": 2, "ebft.rollout": 2,
        "ebft.data": 3, "ebft.methods": 4, "ebft.eval": 4, "ebft.app": 5}


def upward(edges: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """The imports of ``edges`` that point to a higher layer."""
    return [f"{src} (layer {layer_of(src, layers)}) -> {dst} (layer {layer_of(dst, layers)})"
            for src, targets in edges.items() for dst in sorted(targets)
            if layer_of(dst, layers) > layer_of(src, layers)]


def test_imports_point_to_the_same_or_a_lower_layer():
    bad = upward(graph(), package_layers())
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_a_lower_folder_importing_a_higher_one_is_reported():
    edges = graph()
    edges["ebft.core.layout"] = edges["ebft.core.layout"] | {"ebft.methods.ebft"}
    assert upward(edges, package_layers()) == ["ebft.core.layout (layer 1) -> ebft.methods.ebft (layer 4)"]


def folder_graph() -> dict[str, set[str]]:
    """The import drawing by folder: package -> the packages its modules import from."""
    layers = package_layers()
    folder = {m: (m if m in layers else m.rpartition(".")[0]) for m in graph()}
    edges: dict[str, set[str]] = {}
    for src, targets in graph().items():
        edges.setdefault(folder[src], set()).update(folder[t] for t in targets if folder[t] != folder[src])
    return edges


def test_the_folder_drawing_has_no_arrow_up():
    layers = package_layers()
    up = [f"{a} -> {b}" for a, targets in folder_graph().items() for b in sorted(targets) if layers[b] > layers[a]]
    assert not up, up


def test_forbidden_imports_within_a_layer():
    bad = [f"{src} -> {dst}" for src, targets in graph().items() for dst in sorted(targets)
           for importer, target in NEVER if within(src, importer) and within(dst, target)]
    assert not bad, "imports that LAYERS' NEVER forbids:\n" + "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"d"}}) == ["d", "d"]


def test_module_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom ebft.data import sources\n\ndef f():\n    from ebft.eval.code import x\n"
                      "    import ebft.run\n")
    assert imported(source, {"ebft.data.sources", "ebft.eval.code", "ebft.run"}) == {
        "ebft.data.sources", "ebft.eval.code", "ebft.run"}

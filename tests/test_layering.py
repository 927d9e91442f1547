"""The library's import graph points only down: every import of an ``ebft`` module from another one
(top-level or inside a function) goes to the same or a lower layer of ``LAYERS``, and the module
graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ebft"

LAYERS = (
    ("ebft", "ebft.config", "ebft.reporting"),
    ("ebft.rollout.layout", "ebft.rollout.masks", "ebft.models.compat", "ebft.execution"),
    ("ebft.models", "ebft.data"),
    ("ebft.rollout", "ebft.objectives", "ebft.data.prompts",   # RLVR's prompts are kept by their verifier,
     "ebft.data.heldout", "ebft.data.datamodule"),             # and the held-out pipeline selects them
    ("ebft.methods", "ebft.eval"),
    ("ebft.run", "ebft.card", "ebft.strategies"),
)
"""Bottom to top; a module belongs to the layer of the longest name here that is it or a package above it."""

NEVER = (("ebft.methods", "ebft.eval"),)
"""(importer, imported) packages of one layer that must not import each other that way."""


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


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of LAYERS: add it to the layer it belongs to"
    return max(matches)[1]


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


def test_imports_point_to_the_same_or_a_lower_layer():
    upward = [f"{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)})"
              for src, targets in graph().items() for dst in sorted(targets) if layer_of(dst) > layer_of(src)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


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

"""No import cycle among the project's modules, and each layer has its family sub-packages (the layer
and independence rules themselves are the import contract in pyproject.toml, run by `make test`)."""

from __future__ import annotations

import networkx as nx

from flows.check import PROJECT_PACKAGES, imports_of

FAMILIES = {
    "models": {"text", "generative", "detection"},
    "tasks": {"text", "generative", "detection", "report"},
    "flows": {"text", "generative", "detection", "report"},
}


def import_graph(root) -> nx.DiGraph:
    graph = nx.DiGraph()
    for package in PROJECT_PACKAGES:
        for path in (root / package).rglob("*.py"):
            graph.add_node(path)
            graph.add_edges_from((path, dep) for dep in imports_of(root, path) if dep.name != "__init__.py")
    return graph


def test_no_import_cycle(repo_root):
    graph = import_graph(repo_root)
    assert graph.number_of_edges() > 100  # the graph is really built from the sources
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], [[str(p.relative_to(repo_root)) for p in c] for c in cycles[:3]]


def test_a_planted_cycle_is_found(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/a.py").write_text("from tasks.b import x\n")
    (tmp_path / "tasks/b.py").write_text("def f():\n    from tasks import a\n")
    assert list(nx.simple_cycles(import_graph(tmp_path)))


def test_every_layer_has_its_family_packages(repo_root):
    for layer, families in FAMILIES.items():
        found = {p.parent.name for p in (repo_root / layer).glob("*/__init__.py")}
        assert families <= found, (layer, families - found)

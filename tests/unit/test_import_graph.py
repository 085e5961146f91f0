"""No import cycles anywhere in the service: not between modules, not between worker's wings, not between
top-level packages (benchmarks import worker, so worker runs them as a process instead of importing them).

grimp (import-linter's graph) counts every import statement, those inside functions too: an import
moved into a function to dodge a cycle is still a cycle. `if TYPE_CHECKING:` imports never run and
are left out, as in the import-linter contracts.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("api_client", "model_runtime", "worker", "benchmarks")


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the components with more than one node (each one a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def wing(module: str) -> str:
    """worker.http.app -> worker.http; worker.cli -> worker.cli; model_runtime.x -> model_runtime."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "worker" else parts[0]


@pytest.fixture(scope="module")
def module_edges() -> dict[str, set[str]]:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i.split(".")[0] in PACKAGES}
            for m in graph.modules}


def test_tarjan_finds_a_cycle_it_is_given() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_module_cycles(module_edges: dict[str, set[str]]) -> None:
    assert len(module_edges) >= 50, "the graph should hold the whole service"
    assert strongly_connected(module_edges) == []


def test_no_cycles_between_wings(module_edges: dict[str, set[str]]) -> None:
    wings: dict[str, set[str]] = {}
    for module, imported in module_edges.items():
        if module.split(".")[0] == "worker" and module != "worker":
            wings.setdefault(wing(module), set()).update(
                wing(i) for i in imported if i.split(".")[0] == "worker" and wing(i) != wing(module))
    assert {"worker.http", "worker.jobs", "worker.model", "worker.io", "worker.ops"} <= set(wings)
    assert strongly_connected(wings) == []


def test_no_cycles_between_top_level_packages(module_edges: dict[str, set[str]]) -> None:
    packages: dict[str, set[str]] = {}
    for module, imported in module_edges.items():
        top = module.split(".")[0]
        packages.setdefault(top, set()).update(i.split(".")[0] for i in imported if i.split(".")[0] != top)
    assert "worker" in packages["benchmarks"]  # the edge that makes the other direction a cycle
    assert strongly_connected(packages) == []


def test_worker_top_level_is_entry_and_wiring_only() -> None:
    graph = grimp.build_graph("worker")
    top = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    assert top == {"cli", "settings", "celery_app", "runtime", "http", "jobs", "model", "io", "ops"}

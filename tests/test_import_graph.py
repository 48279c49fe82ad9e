"""The import graph between packages has no cycle, and its edges point the way the layering says.

Imports are read from the source with ast: module level, inside functions and under TYPE_CHECKING alike (a lazy
import is still a dependency); string lookups through importlib (the backend registries) are not imports. A
package is a subpackage of pd (pd.engine, pd.dist, ...), a top-level module of pd (pd.server_args), or one of
prefill, decode, kvtransfer and launch.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pd", "prefill", "decode", "kvtransfer", "launch")

# Imports that close a cycle today and are left for a later change, as (importing package, imported module).
# Each must still exist (test_known_cycle_edges_still_exist): delete an entry once its import is gone.
KNOWN_CYCLE_EDGES = {
    # The model side reads the batch and the KV cache, whose types live in pd/engine beside the runner that
    # imports the models.
    ("pd.models", "pd.engine.forward_batch"),
    ("pd.layers", "pd.engine.forward_batch"),
    ("pd.attention", "pd.engine.forward_batch"),
    ("pd.attention", "pd.engine.kv_cache"),
}

Edge = tuple[str, str]  # (importing module, imported module)


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pd" and len(parts) > 1 else parts[0]


def find_modules(root: Path, tops: tuple[str, ...] = TOP_LEVEL) -> dict[str, Path]:
    modules = {}
    for top in tops:
        for path in (root / top).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


@functools.cache
def module_imports(root: Path, tops: tuple[str, ...] = TOP_LEVEL) -> list[Edge]:
    """Every import of a module of ours by a module of ours, resolved to the most specific module named."""
    modules = find_modules(root, tops)

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    edges = set()
    for module, path in modules.items():
        package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package, one level up per extra dot
                    anchor = package_parts[: len(package_parts) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target is not None:
                    edges.add((module, target))
                    break  # `from a.b import c, d`: the most specific module named is the dependency
    return sorted(edges)


def package_graph(edges: list[Edge], skip: set[tuple[str, str]] | None = None) -> dict[Edge, list[Edge]]:
    """(package, package) -> the module imports behind it, leaving out imports matching ``skip``."""
    graph: dict[Edge, list[Edge]] = defaultdict(list)
    for src, dst in edges:
        a, b = package_of(src), package_of(dst)
        if a != b and (a, dst) not in (skip or set()):
            graph[(a, b)].append((src, dst))
    return graph


def package_cycles(graph: dict[Edge, list[Edge]]) -> list[list[str]]:
    """One cycle (first package repeated at the end) per strongly connected group of packages."""
    succ: dict[str, set[str]] = defaultdict(set)
    for a, b in graph:
        succ[a].add(b)

    def reaches(start: str, goal: str) -> list[str] | None:
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            for nxt in sorted(succ[path[-1]]):
                if nxt == goal:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append([*path, nxt])
        return None

    cycles, covered = [], set()
    for package in sorted(succ):
        if package in covered:
            continue
        cycle = reaches(package, package)
        if cycle is not None:
            cycles.append(cycle)
            covered.update(p for p in succ if reaches(package, p) and reaches(p, package))
    return cycles


def describe(cycle: list[str], graph: dict[Edge, list[Edge]]) -> str:
    steps = [f"{a} -> {b} ({', '.join(f'{s} imports {d}' for s, d in graph[(a, b)][:3])})"
             for a, b in zip(cycle, cycle[1:], strict=False)]  # fmt: skip
    return "\n  ".join(steps)


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph(module_imports(REPO), KNOWN_CYCLE_EDGES)
    cycles = package_cycles(graph)
    assert not cycles, "import cycles between packages:\n  " + "\n\n  ".join(describe(c, graph) for c in cycles)


def test_known_cycle_edges_still_exist() -> None:
    present = {(package_of(src), dst) for src, dst in module_imports(REPO)}
    gone = KNOWN_CYCLE_EDGES - present
    assert not gone, f"no longer imported: remove {sorted(gone)} from KNOWN_CYCLE_EDGES"


def test_dependencies_point_from_launch_to_the_roles_to_pd() -> None:
    """launch -> prefill, decode -> kvtransfer, pd: nothing in pd (but its `python -m pd` entry point) or
    kvtransfer imports prefill, decode or launch, and the roles do not import launch."""
    forbidden = {"pd": {"prefill", "decode", "launch"}, "kvtransfer": {"prefill", "decode", "launch"},
                 "prefill": {"launch"}, "decode": {"launch"}}  # fmt: skip
    wrong = [f"{src} imports {dst}" for src, dst in module_imports(REPO)
             if src != "pd.__main__" and dst.split(".")[0] in forbidden.get(src.split(".")[0], ())]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_pd_dist_imports_nothing_from_pd_engine() -> None:
    """pd/dist owns processes and groups; what a rank runs is handed to it (pd.engine imports pd.dist)."""
    wrong = [f"{s} imports {d}" for s, d in module_imports(REPO)
             if package_of(s) == "pd.dist" and package_of(d) == "pd.engine"]  # fmt: skip
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("style", ["module level", "inside a function", "relative, under TYPE_CHECKING"])
def test_the_checker_finds_a_cycle_closed_by_any_import_style(tmp_path: Path, style: str) -> None:
    """The checker itself on a made-up tree: pd.a -> pd.b at module level, pd.b -> pd.a in the given style."""
    for package in ("a", "b"):
        (tmp_path / "pd" / package).mkdir(parents=True)
        (tmp_path / "pd" / package / "__init__.py").write_text("")
    (tmp_path / "pd" / "__init__.py").write_text("")
    (tmp_path / "pd" / "a" / "x.py").write_text("from pd.b.y import f\n")
    back = {
        "module level": "import pd.a.x\n",
        "inside a function": "def f():\n    from pd.a import x\n    return x\n",
        "relative, under TYPE_CHECKING": "import typing\nif typing.TYPE_CHECKING:\n    from ..a.x import f\n",
    }[style]
    (tmp_path / "pd" / "b" / "y.py").write_text(back)
    edges = module_imports(tmp_path, ("pd",))
    assert ("pd.b.y", "pd.a.x") in edges
    graph = package_graph(edges)
    assert package_cycles(graph) == [["pd.a", "pd.b", "pd.a"]]
    assert "pd.b.y imports pd.a.x" in describe(["pd.a", "pd.b", "pd.a"], graph)

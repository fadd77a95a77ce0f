"""The layout's rules, checked on every test run (docs/architecture.md "Two sides"):
import-linter's contracts in pyproject.toml's [tool.importlinter], and no import cycle
between gpubake's modules (function-level imports count: grimp sees them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# Cycles another change is removing, each named until it is gone (then this file says to delete it).
KNOWN_CYCLES: dict[str, frozenset[str]] = {}


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` against the package tree under `src`, with this repository's contracts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=src, env=env, capture_output=True, text=True, timeout=300,
    )


def cycles(graph: grimp.ImportGraph) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


@pytest.fixture(scope="module")
def copy_of_src(tmp_path_factory: pytest.TempPathFactory):
    """copy_of_src() -> a fresh copy of src/ to break on purpose."""

    def make() -> Path:
        dest = tmp_path_factory.mktemp("src")
        shutil.copytree(REPO / "src" / "gpubake", dest / "gpubake", ignore=shutil.ignore_patterns("__pycache__"))
        return dest

    return make


def test_import_contracts_hold():
    proc = lint_imports(REPO / "src")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_build_side_import_in_the_self_test_breaks_a_contract(copy_of_src):
    src = copy_of_src()
    stages = src / "gpubake" / "smoke_tests" / "stages.py"
    stages.write_text(stages.read_text() + "\n\ndef _late():\n    from gpubake.images.compat import min_driver  # noqa: F401\n")
    proc = lint_imports(src)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1, out[-3000:]
    assert "The in-image side never imports the build side" in out and "BROKEN" in out
    assert "gpubake.smoke_tests.stages -> gpubake.images.compat" in out


def test_the_build_side_reaching_past_the_named_api_breaks_a_contract(copy_of_src):
    src = copy_of_src()
    layer = src / "gpubake" / "images" / "model_layer.py"
    layer.write_text(layer.read_text() + "\nfrom gpubake.provisioning.quantize import quantize_checkpoint  # noqa: E402,F401\n")
    proc = lint_imports(src)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1, out[-3000:]
    assert "gpubake.images.model_layer -> gpubake.provisioning.quantize" in out


def test_cycles_finds_a_back_edge():
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.e", "p.e")]:
        graph.add_import(importer=importer, imported=imported)
    assert cycles(graph) == [frozenset({"p.a", "p.b", "p.c"})]


def test_no_import_cycles_in_src():
    import gpubake

    assert Path(gpubake.__file__).resolve().is_relative_to(REPO / "src"), "run with this checkout's src first on PYTHONPATH"
    found = set(cycles(grimp.build_graph("gpubake", cache_dir=None)))
    known = set(KNOWN_CYCLES.values())
    assert not found - known, f"import cycles: {[sorted(c) for c in found - known]}"
    gone = [name for name, members in KNOWN_CYCLES.items() if members not in found]
    assert not gone, f"no longer a cycle, delete it from KNOWN_CYCLES: {gone}"

"""The one table of GPU architectures (`kernels.archs`) and who reads it; no import cycle
among the kernel modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gpubake.images import compat
from gpubake.images.spec import GPU_ARCHS
from gpubake.kernels import archs, backends
from gpubake.kernels.attention import LOWP_KERNELS
from gpubake.smoke_tests.probe import GpuInfo


def test_table_rows_are_consistent():
    caps = [a.capability for a in archs.ARCHS]
    assert len(set(caps)) == len(caps) and caps == sorted(caps)
    for a in (archs.CPU, *archs.ARCHS):
        assert a.nvfp4_backend in backends.BACKENDS
        assert set(a.attention) <= set(LOWP_KERNELS)
        assert backends.get_backend(a.nvfp4_backend).supports_capability(a.capability)  # its default runs there
        assert archs.arch_for(a.capability) is a


def test_every_arch_an_image_may_name_is_in_the_table():
    """Image specs and the CUDA data name architectures the kernels know."""
    names = {a.sm for a in archs.ARCHS}
    assert set(GPU_ARCHS) <= names
    assert set(k for k in compat.cuda_table()["arch_min_cuda"] if not k.startswith("_")) <= names


@pytest.mark.parametrize("name, cap", [("sm_80", (8, 0)), ("sm_89", (8, 9)), ("sm_90", (9, 0)),
                                       ("sm_100", (10, 0)), ("sm_103", (10, 3)), ("sm_120", (12, 0)),
                                       ("8.9", (8, 9)), ("12.0", (12, 0))])
def test_names_and_capabilities(name, cap):
    assert archs.parse_capability(name) == cap
    assert archs.sm_name(cap) == ("sm_" + name.replace(".", "") if "." in name else name)
    assert compat.arch_runs(name, [name], [])  # the image facts' GPU rules (build side too) read the same rule


def test_unknown_gpu_gets_the_any_gpu_backend_and_no_lever():
    a = archs.arch_for((7, 5))
    assert (a.sm, a.family, a.nvfp4_backend, a.attention) == ("sm_75", "other", "dequant-bf16", ())
    # a Blackwell minor the FP4 backend was not built for: not blackwell-native, which would refuse it
    assert backends.default_backend_name((10, 1)) == "dequant-bf16"


def test_hopper_row_carries_the_measured_attention_preference():
    h = archs.arch_for((9, 0))
    assert (h.sm, h.family, h.nvfp4_backend, h.attention) == ("sm_90", "hopper", "hopper-fp8", ("fa3-fp8", "cudnn-fp8"))
    assert archs.CPU.sm == "cpu" and archs.arch_for(None) is archs.CPU


def test_gpu_backends_run_where_the_table_sends_them():
    assert backends.HopperFp8.caps == ((8, 9), (9, 0))
    assert backends.BlackwellNative.caps == ((10, 0), (10, 3), (12, 0), (12, 1))
    assert backends.DequantBf16.caps is None  # any CUDA GPU


def test_probe_names_the_arch_from_the_table():
    gpu = GpuInfo(index=0, name="NVIDIA B200", memory_total_bytes=2**30, driver_version="580",
                  compute_capability=(10, 3))
    assert gpu.arch == "sm_103" == archs.arch_for((10, 3)).sm


def _kernel_imports(path: Path) -> set[str]:
    """gpubake.kernels modules `path` imports, at the top or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m.rsplit(".", 1)[-1] for m in out if m.startswith("gpubake.kernels.")}


def test_no_import_cycle_among_kernel_modules():
    pkg = Path(backends.__file__).parent
    mods = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph = {m: _kernel_imports(pkg / f"{m}.py") & mods for m in mods}
    assert "attention_common" in graph["attention_fp8"] and "attention" not in graph["attention_fp8"]

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [c for m in sorted(mods) if (c := cycle_from(m, m, (m,)))]
    assert cycles == []


def test_the_build_side_reads_the_table_without_torch():
    import subprocess
    import sys

    code = "import sys, gpubake.images.compat, gpubake.kernels.archs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

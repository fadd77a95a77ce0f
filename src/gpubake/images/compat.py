"""Which GPUs an image can run on, decided from data before any build step.

Two tables (JSON under `images/data/`, each citing its sources):
- `cuda_driver.json`: CUDA version -> minimum Linux host driver (NVIDIA release notes),
  and the first CUDA that compiles for each architecture.
- `torch_builds.json`: torch release series x CUDA wheel tag -> compute capabilities
  compiled into the wheel (SASS, and which also ship as PTX).

An architecture runs a wheel when the wheel carries SASS of the same major and an equal or
lower minor (cubins are binary compatible within a major: sm_86 code runs on sm_89), or PTX
of an equal or lower capability (the driver JIT-compiles it). That is the rule of the CUDA
C++ Programming Guide ("Binary Compatibility", "PTX Compatibility") and the one torch
itself applies when it warns about an unsupported GPU (`torch.cuda._check_capability`).
The rule and the driver floor's type are the image facts' (`gpubake.provisioning.facts`),
because the boot self-test applies them to `image.json`; the checks of a spec against
these tables are the spec's (`gpubake.images.spec.validate_spec`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from gpubake.errors import SpecError
from gpubake.provisioning.facts import GPU_ARCHS, DriverRequirement, arch_runs, version_key

__all__ = [
    "DriverRequirement", "arch_runs", "cuda_table", "first_cuda", "min_driver", "runnable_archs",
    "torch_series", "torch_table", "wheel_archs", "wheel_tag",
]


@cache
def _table(name: str) -> dict[str, Any]:
    return json.loads(resources.files("gpubake.images").joinpath("data", name).read_text(encoding="utf-8"))


def cuda_table() -> dict[str, Any]:
    return _table("cuda_driver.json")


def torch_table() -> dict[str, Any]:
    return _table("torch_builds.json")


def torch_series(torch: str) -> str:
    """'2.11.0' -> '2.11' (wheels of one minor series share their CUDA matrix)."""
    return ".".join(torch.split(".")[:2])


def wheel_tag(cuda: str) -> str:
    """'12.8' -> 'cu128'; 'none' -> 'cpu'."""
    return "cpu" if cuda == "none" else "cu" + cuda.replace(".", "")


def min_driver(cuda: str) -> DriverRequirement:
    """Minimum Linux driver for an image built on `cuda` (written into image.json for the boot)."""
    row = cuda_table()["cuda"].get(cuda)
    if row is None:
        known = ", ".join(sorted(cuda_table()["cuda"], key=version_key))
        raise SpecError(f"cuda: no driver data for CUDA {cuda} (known: {known})")
    return DriverRequirement(toolkit=row["toolkit"], minor_compat=row["minor_compat"])


def first_cuda(arch: str) -> str | None:
    """The first CUDA release that compiles for `arch` (None when the table has no floor)."""
    return cuda_table()["arch_min_cuda"].get(arch)


def wheel_archs(torch: str, cuda: str) -> dict[str, list[str]]:
    """{'sass': [...], 'ptx': [...]} for the (torch, cuda) wheel; SpecError if none is published."""
    series = torch_table()["series"]
    name = torch_series(torch)
    if name not in series:
        known = ", ".join(sorted(series, key=version_key))
        raise SpecError(f"torch: no compatibility data for torch {torch} (known series: {known})")
    tag = wheel_tag(cuda)
    if tag not in series[name]:
        offered = ", ".join(t[2:-1] + "." + t[-1] for t in sorted(series[name]))
        raise SpecError(f"cuda: torch {name} publishes no CUDA {cuda} wheels (it ships CUDA {offered})")
    return series[name][tag]


def runnable_archs(torch: str, cuda: str, candidates: list[str] | None = None) -> list[str]:
    """Which of the known architectures a (torch, cuda) image can run."""
    if cuda == "none":
        return []
    build = wheel_archs(torch, cuda)
    return [a for a in (candidates or list(GPU_ARCHS)) if arch_runs(a, build["sass"], build["ptx"])]

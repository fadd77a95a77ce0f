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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from gpubake.errors import SpecError
from gpubake.kernels.archs import parse_capability  # the in-image arch table: names <-> capabilities

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec


@cache
def _table(name: str) -> dict[str, Any]:
    return json.loads(resources.files("gpubake.images").joinpath("data", name).read_text(encoding="utf-8"))


def cuda_table() -> dict[str, Any]:
    return _table("cuda_driver.json")


def torch_table() -> dict[str, Any]:
    return _table("torch_builds.json")


def _cc(arch: str) -> tuple[int, int]:
    """'sm_89' or '8.9' -> (8, 9); 'sm_120' or '12.0' -> (12, 0) (the kernels' arch table's rule)."""
    return parse_capability(arch)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def torch_series(torch: str) -> str:
    """'2.11.0' -> '2.11' (wheels of one minor series share their CUDA matrix)."""
    return ".".join(torch.split(".")[:2])


def wheel_tag(cuda: str) -> str:
    """'12.8' -> 'cu128'; 'none' -> 'cpu'."""
    return "cpu" if cuda == "none" else "cu" + cuda.replace(".", "")


@dataclass(frozen=True)
class DriverRequirement:
    """Minimum host driver for a CUDA version."""

    cuda: str
    toolkit: str  # driver of the toolkit release (what NVIDIA lists for it)
    minor_compat: str  # floor under CUDA minor version compatibility

    def satisfied_by(self, driver: str, *, allow_minor_compat: bool = False) -> bool:
        floor = self.minor_compat if allow_minor_compat else self.toolkit
        return _version_key(driver) >= _version_key(floor)


def min_driver(cuda: str) -> DriverRequirement:
    """Minimum Linux driver for an image built on `cuda` (used by the boot self-test too)."""
    row = cuda_table()["cuda"].get(cuda)
    if row is None:
        known = ", ".join(sorted(cuda_table()["cuda"], key=_version_key))
        raise SpecError(f"cuda: no driver data for CUDA {cuda} (known: {known})")
    return DriverRequirement(cuda=cuda, toolkit=row["toolkit"], minor_compat=row["minor_compat"])


def arch_runs(arch: str, sass: list[str], ptx: list[str]) -> bool:
    """True when a GPU of `arch` can execute code compiled for `sass` / `ptx` capabilities."""
    major, minor = _cc(arch)
    for cc in sass:
        c_major, c_minor = _cc(cc)
        if c_major == major and c_minor <= minor:
            return True
    return any(_cc(cc) <= (major, minor) for cc in ptx)


def wheel_archs(torch: str, cuda: str) -> dict[str, list[str]]:
    """{'sass': [...], 'ptx': [...]} for the (torch, cuda) wheel; SpecError if none is published."""
    series = torch_table()["series"]
    name = torch_series(torch)
    if name not in series:
        known = ", ".join(sorted(series, key=_version_key))
        raise SpecError(f"torch: no compatibility data for torch {torch} (known series: {known})")
    tag = wheel_tag(cuda)
    if tag not in series[name]:
        offered = ", ".join(t[2:-1] + "." + t[-1] for t in sorted(series[name]))
        raise SpecError(f"cuda: torch {name} publishes no CUDA {cuda} wheels (it ships CUDA {offered})")
    return series[name][tag]


def runnable_archs(torch: str, cuda: str, candidates: list[str] | None = None) -> list[str]:
    """Which of the known architectures a (torch, cuda) image can run."""
    from gpubake.images.spec import GPU_ARCHS

    if cuda == "none":
        return []
    build = wheel_archs(torch, cuda)
    return [a for a in (candidates or list(GPU_ARCHS)) if arch_runs(a, build["sass"], build["ptx"])]


def check_spec(spec: ImageSpec, *, source: str, pins: list[str] | None = None) -> None:
    """Fail (one line naming file and field) when the spec asks for what it cannot run."""
    archs = list(spec.gpu_archs)
    if spec.cuda == "none":
        if archs:
            raise SpecError(
                f'{source}: gpu_archs: {", ".join(archs)} need a CUDA build, but cuda = "none" (CPU-only image)'
            )
        if not spec.cpu_ok:
            raise SpecError(f'{source}: cpu_ok: cuda = "none" builds a CPU-only image; set cpu_ok = true')
    else:
        try:
            min_driver(spec.cuda)
            build = wheel_archs(spec.torch, spec.cuda)
        except SpecError as exc:
            raise SpecError(f"{source}: {exc}") from None
        first_cuda = cuda_table()["arch_min_cuda"]
        for i, arch in enumerate(archs):
            need = first_cuda.get(arch)
            if need and _version_key(spec.cuda) < _version_key(need):
                raise SpecError(f"{source}: gpu_archs[{i}]: {arch} needs CUDA {need}+ but cuda = {spec.cuda!r}")
            if not arch_runs(arch, build["sass"], build["ptx"]):
                have = ", ".join("sm_" + c.replace(".", "") for c in build["sass"])
                raise SpecError(
                    f"{source}: gpu_archs[{i}]: torch {spec.torch}+{wheel_tag(spec.cuda)} cannot run {arch} "
                    f"(its wheel carries {have})"
                )
        _check_base_cuda(spec, source)
    _check_torch_pin(spec, source, pins or [])


def _check_base_cuda(spec: ImageSpec, source: str) -> None:
    """An nvidia/cuda base image's tag must carry the spec's CUDA version."""
    if spec.base.image is None or "nvidia/cuda" not in spec.base.image:
        return
    tag = spec.base.image_tag or ""
    if not (tag == spec.cuda or tag.startswith(spec.cuda + ".") or tag.startswith(spec.cuda + "-")):
        raise SpecError(f"{source}: base.image: tag {tag!r} is not CUDA {spec.cuda} (cuda = {spec.cuda!r})")


def _check_torch_pin(spec: ImageSpec, source: str, pins: list[str]) -> None:
    """If the lock pins torch, it must be the spec's torch release (local tag like +cu128 allowed)."""
    for pin in pins:
        name, _, version = pin.partition("==")
        if name.lower() == "torch":
            public, _, local = version.partition("+")
            if public != spec.torch:
                raise SpecError(f"{source}: torch: {spec.torch!r} but {spec.python.lock} pins torch=={version}")
            want = wheel_tag(spec.cuda)
            if local and local != want:
                raise SpecError(f"{source}: cuda: {spec.cuda!r} but {spec.python.lock} pins torch=={version}")

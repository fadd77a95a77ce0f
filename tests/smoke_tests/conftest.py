"""Fixtures for the self-test: a fake GPU probe (the fault-injection seam), the image facts
(image.json) of GPU and CPU images of the real catalog, as the build side derives them,
and a runner that returns the finished report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpubake.smoke_tests.probe import GpuInfo, ProbeResult

H100 = dict(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    memory_total_bytes=85520809984,
    driver_version="580.95.05",
    compute_capability=(9, 0),
    ecc_uncorrected_volatile=0,
    ecc_uncorrected_aggregate=0,
    ecc_corrected_volatile=0,
    throttle_reasons=["gpu_idle"],
)


class FakeProbe:
    """A GpuProbe that reports what the test says (no GPU, an old driver, ...)."""

    def __init__(self, gpus: list[GpuInfo], error: str | None = None, after: list[str] | None = None) -> None:
        self.gpus = gpus
        self.error = error
        self.after = after or []
        self.throttle_calls: list[int] = []

    def probe(self) -> ProbeResult:
        return ProbeResult(list(self.gpus), self.error)

    def throttle_reasons(self, index: int) -> list[str]:
        self.throttle_calls.append(index)
        return list(self.after)


@pytest.fixture
def fake_gpu() -> Callable[..., FakeProbe]:
    """fake_gpu(**overrides) -> a probe reporting one H100 with those fields changed."""

    def make(*, after: list[str] | None = None, **overrides: Any) -> FakeProbe:
        return FakeProbe([GpuInfo(**{**H100, **overrides})], after=after)

    return make


@pytest.fixture
def fake_host() -> Callable[..., FakeProbe]:
    """fake_host(n, {index: overrides}, uuids=True) -> a probe reporting n H100s (NVML
    indices 0..n-1, UUIDs GPU-0000000i-aaaa unless uuids=False)."""

    def make(n: int, overrides: dict[int, dict[str, Any]] | None = None, *, uuids: bool = True) -> FakeProbe:
        return FakeProbe([GpuInfo(**{**H100, "index": i, "uuid": f"GPU-{i:08x}-aaaa" if uuids else None,
                                     **(overrides or {}).get(i, {})}) for i in range(n)])

    return make


@pytest.fixture
def no_gpu() -> FakeProbe:
    return FakeProbe([], "NVML unavailable: NVML Shared Library Not Found")


@pytest.fixture(scope="session")
def gpu_spec() -> Any:
    """The facts of the Hopper/Ada image (CUDA 13.0, sm_89/sm_90, not cpu_ok), carrying
    the tiny model so a CPU can render it."""
    from gpubake.images.catalog import find
    from gpubake.images.render import image_facts

    spec = find("wan22-t2v-a14b-nvfp4-hopper")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"id": "tiny-wan2.2"})})
    return image_facts(spec, "runpod")


@pytest.fixture(scope="session")
def demo_spec() -> Any:
    """The facts of the demo image (CPU-capable, tiny model)."""
    from gpubake.images.catalog import find
    from gpubake.images.render import image_facts

    return image_facts(find("demo"), "runpod")


@pytest.fixture
def write_table(tmp_path: Path) -> Callable[..., Path]:
    """write_table(seconds_per_step=..., end_to_end_seconds=..., **top) -> a table file
    whose tiny-model H100 row holds those values."""

    def make(seconds_per_step: float, end_to_end_seconds: float, **top: Any) -> Path:
        from importlib import resources

        data = json.loads(resources.files("gpubake.smoke_tests").joinpath("data/throughput.json").read_text())
        data["models"]["tiny-wan2.2"].pop("spread_tolerance", None)  # the top-level one applies
        row = data["models"]["tiny-wan2.2"]["gpus"][0]
        row.update(seconds_per_step=seconds_per_step, end_to_end_seconds=end_to_end_seconds)
        data.update(top)
        path = tmp_path / "table.json"
        path.write_text(json.dumps(data))
        return path

    return make


@pytest.fixture
def run_selftest(tmp_path: Path, tiny_nvfp4_checkpoint: Path) -> Callable[..., Any]:
    """run_selftest(spec, probe, **options) -> the finished Report (device forced to
    CPU: the fake GPUs are not real)."""
    from gpubake.smoke_tests.api import create_selftest

    def run(spec: Any, probe: Any, *, model_dir: Path | None = None, device: str | None = "cpu", **kw: Any) -> Any:
        updates: list[tuple[str, int]] = []
        test = create_selftest(
            spec, model_dir or tiny_nvfp4_checkpoint, tmp_path / "clip", probe=probe, device=device,
            on_update=lambda r: updates.append((r.state, len(r.stages))), **kw,
        )
        report = test.run()
        report.updates = updates  # type: ignore[attr-defined]
        report.pipeline = test.ctx.pipeline  # type: ignore[attr-defined]
        return report

    return run

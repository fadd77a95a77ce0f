"""The CUDA 12.8 variants of the GPU images (`*-cu128.toml`): for marketplace hosts whose
driver is older than CUDA 13's 580, and only for hosts with the 570 driver CUDA 12.8 needs.

What makes a variant possible is what PyPI holds (checked when the lock was made, see
locks/wan22-cu128.txt): torch 2.10.0's Linux wheel on PyPI is the CUDA 12.8 build (it
requires nvidia-cuda-runtime-cu12==12.8.90), its triton pin is 3.6.0, and fa3-fwd 0.0.2 is
built for CUDA 12 on torch's stable ABI (0.0.3 links libcudart.so.13, which a 570 driver
cannot run).
"""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gpubake.images import catalog, compat
from gpubake.images.catalog import CATALOG_DIR
from gpubake.images.marketplace.offers import OfferPolicy, min_driver, resolve_gpu, runpod_cuda_versions
from gpubake.images.spec import check_lock

GPU_IMAGES = [n for n in catalog.names() if catalog.find(n).cuda == "13.0"]
LOCK = CATALOG_DIR / "locks" / "wan22-cu128.txt"


def test_every_cuda13_image_has_a_cuda128_variant_differing_only_in_its_stack():
    assert GPU_IMAGES, "no CUDA 13 image in the catalog"
    for name in GPU_IMAGES:
        parent, variant = catalog.find(name), catalog.find(name + "-cu128")
        assert (variant.cuda, variant.torch, variant.python.lock) == ("12.8", "2.10.0", "locks/wan22-cu128.txt")
        assert variant.base.image_tag.startswith("12.8.1-base-ubuntu24.04")
        assert variant.runtime.env == {**parent.runtime.env, "GPUBAKE_IMAGE": variant.name}
        same = ("targets", "gpu_archs", "min_gpu_memory_gb", "cpu_ok", "model")
        assert {k: getattr(variant, k) for k in same} == {k: getattr(parent, k) for k in same}
        assert variant.runtime.model_dump(exclude={"env"}) == parent.runtime.model_dump(exclude={"env"})
        # torch 2.10+cu128 still runs every architecture the parent runs
        assert compat.runnable_archs(variant.torch, variant.cuda, list(variant.gpu_archs)) == list(variant.gpu_archs)


def test_variants_need_driver_570_and_launch_rents_only_such_hosts():
    for name in GPU_IMAGES:
        parent, variant = catalog.find(name), catalog.find(name + "-cu128")
        assert min_driver(parent) == "580.95.05" and min_driver(variant) == "570.124.06"
        gpu = resolve_gpu("H100" if "sm_90" in variant.gpu_archs else "RTX 5090", "vastai")
        policy = OfferPolicy.for_spec(variant, gpu, max_price=None, min_reliability=0.9)
        assert policy.query()["driver_version"] == {"gte": 570124006}  # Vast.ai's integer driver filter
        base = {"id": 1, "gpu_name": gpu.market_id, "num_gpus": 1, "dph_total": 1.0, "reliability2": 0.99,
                "compute_cap": int(gpu.arch[3:]) * 10, "disk_space": 500, "gpu_ram": 81559}  # an 80 GB card's MB
        on_575 = {**base, "driver_version": "575.57.08", "cuda_max_good": 12.9}
        on_565 = {**base, "driver_version": "565.57.01", "cuda_max_good": 12.7}
        assert policy.rejects(on_575) is None  # a host the CUDA 13 image cannot use
        assert "driver 565.57.01 < 570.124.06" in policy.rejects(on_565)
        assert "driver 575.57.08 < 580.95.05" in OfferPolicy.for_spec(parent, gpu, max_price=None,
                                                                      min_reliability=0.9).rejects(on_575)
        # RunPod: the template's CUDA set and launch's numeric floor (gpu.minCudaVersion = spec.cuda)
        assert runpod_cuda_versions(variant) == ["12.8", "12.9", "13.0"]


def _pins() -> dict[str, str]:
    return dict(p.split("==", 1) for p in check_lock(LOCK, source=LOCK.name))


def test_the_cu128_lock_is_a_cuda_12_stack_with_hashes():
    pins = _pins()  # check_lock: every requirement == pinned and hashed
    assert (pins["torch"], pins["triton"], pins["fa3-fwd"]) == ("2.10.0", "3.6.0", "0.0.2")
    assert pins["nvidia-cuda-runtime-cu12"].startswith("12.8.") and pins["nvidia-cublas-cu12"].startswith("12.8.")
    cuda13 = [n for n, v in pins.items() if n.endswith("-cu13") or (
        n.startswith(("nvidia-", "cuda-")) and v.startswith("13.") and n != "nvidia-ml-py")]  # NVML's binding: any driver
    assert cuda13 == [] and "cuda-toolkit" not in pins
    text = LOCK.read_text()
    assert "--index-url https://pypi.org/simple" in text  # everything from PyPI, no other index
    assert re.search(r"^torch==2\.10\.0 \\\n(    --hash=sha256:[0-9a-f]{64} \\\n)*    --hash=sha256:[0-9a-f]{64}$", text, re.M)


def test_the_cu128_lock_satisfies_its_input_and_shares_the_cu130_stack():
    pins = _pins()
    for line in (CATALOG_DIR / "locks" / "wan22-cu128.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), line
    cuda = re.compile(r"^(torch|triton|fa3-fwd|cuda-.*|nvidia-cu.*|nvidia-nccl.*|nvidia-nvjitlink.*|nvidia-nvshmem.*|nvidia-nvtx.*)$")
    cu130 = CATALOG_DIR / "locks" / "wan22-cu130.txt"
    other = dict(p.split("==", 1) for p in check_lock(cu130, source=cu130.name))
    assert {n for n in pins if not cuda.match(n)} == {n for n in other if not cuda.match(n)}


@pytest.mark.parametrize("name", GPU_IMAGES)
def test_each_variant_renders_for_both_targets(name, tmp_path):
    from gpubake.images.render import RenderOptions, render_context

    for target in ("runpod", "vastai"):
        ctx = tmp_path / target
        render_context(catalog.find(name + "-cu128"), target, ctx, RenderOptions(timestamp=0))
        assert "requirements.lock.txt" in {p.name for p in ctx.iterdir()}
        assert "FROM docker.io/nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:" in (ctx / "Containerfile").read_text()

"""An image's `min_gpu_memory_gb` on the marketplaces: refused before anything is rented on a
smaller GPU (gpubake's table, then the marketplace's own figure), sent as Vast.ai's `gpu_ram`
(MB) and re-checked on every offer, applied to RunPod's catalog for pods and serverless pools.

Against the fakes (fake_vastai.py, fake_runpod.py), which hold every request and answer to
the vendors' vendored OpenAPI documents; Vast.ai's document: `gpu_ram` "GPU RAM in MB.
Example: {"gte": 24000}" (search offers) and "`gpu_ram` in CLI = GB; in REST API = MB".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from marketplace.fake_vastai import offer

from gpubake.errors import GpubakeError
from gpubake.images.marketplace.offers import OfferPolicy, check_gpu_memory, resolve_gpu
from gpubake.images.spec import load_spec

FAST = ["--poll-interval", "0.05", "--timeout", "10"]
A100_40GB_MB, A100_80GB_MB = 40960, 81920  # Vast.ai's gpu_ram of the two cards its "A100 SXM4" names


@pytest.fixture
def big_spec_path(spec_path: Path) -> Path:
    """The test GPU image with an 80 GB floor, for Ampere, Ada and Hopper (A100 has 40 and 80 GB parts, Ada 48 GB at most)."""
    text = spec_path.read_text().replace('gpu_archs = ["sm_89", "sm_90"]', 'gpu_archs = ["sm_80", "sm_89", "sm_90"]\nmin_gpu_memory_gb = 80')
    spec_path.write_text(text)
    return spec_path


# ------------------------------------------------------------------ the rule


def test_check_gpu_memory_refuses_a_smaller_gpu_and_takes_a_large_enough_one(big_spec_path, spec_path):
    spec = load_spec(big_spec_path)
    with pytest.raises(GpubakeError) as info:
        check_gpu_memory(spec, resolve_gpu("L40S", "runpod"))
    assert str(info.value) == ("--gpu: L40S has 48 GB of memory (gpubake's GPU table), but image 'gpuimg' needs "
                               ">= 80 GB (min_gpu_memory_gb)")
    assert info.value.exit_code == 2
    for name in ("H100", "H100 PCIe", "H100 NVL", "H200", "A100 SXM"):
        check_gpu_memory(spec, resolve_gpu(name, "vastai"))  # 80, 80, 94, 141, 80 GB
    check_gpu_memory(spec, resolve_gpu("Quantum QX-9", "vastai"))  # unknown here: the marketplace's filter decides
    with pytest.raises(GpubakeError, match=r"^--gpu: H100 SXM has 40 GB of memory \(RunPod's catalog\)"):
        check_gpu_memory(spec, resolve_gpu("H100", "runpod"), memory_gb=40, where="RunPod's catalog")
    no_floor = spec.model_copy(update={"min_gpu_memory_gb": None})
    check_gpu_memory(no_floor, resolve_gpu("RTX 4090", "vastai"))


def test_every_gpu_of_the_table_has_its_memory():
    assert {n: resolve_gpu(n, "vastai").memory_gb for n in ("RTX 5090", "RTX 4090", "L40S", "H100", "H100 NVL", "H200", "B200")} == {
        "RTX 5090": 32, "RTX 4090": 24, "L40S": 48, "H100": 80, "H100 NVL": 94, "H200": 141, "B200": 180}


def test_the_vast_query_asks_for_gpu_ram_in_mb_and_rechecks_each_offer(big_spec_path, spec_path):
    spec = load_spec(big_spec_path)
    policy = OfferPolicy.for_spec(spec, resolve_gpu("A100 SXM", "vastai"), max_price=None, min_reliability=0.9)
    assert policy.query()["gpu_ram"] == {"gte": 76000}  # 95% of 80 GB x 1000: an 80 GB card reports ~81559-81920
    base = {"id": 1, "gpu_name": "A100 SXM4", "num_gpus": 1, "dph_total": 1.0, "reliability2": 0.99,
            "compute_cap": 800, "disk_space": 500, "driver_version": "575.57.08", "cuda_max_good": 12.9}
    assert policy.rejects({**base, "gpu_ram": A100_80GB_MB}) is None
    assert policy.rejects({**base, "gpu_ram": 81559}) is None  # an H100's MiB, called MB
    assert policy.rejects({**base, "gpu_ram": A100_40GB_MB}) == "GPU memory 40960 MB < 76000 MB"
    assert policy.rejects(base) == "GPU memory None MB < 76000 MB"  # unknown memory is not enough
    plain = OfferPolicy.for_spec(spec.model_copy(update={"min_gpu_memory_gb": None}), resolve_gpu("A100 SXM", "vastai"),
                                 max_price=None, min_reliability=0.9)
    assert "gpu_ram" not in plain.query() and plain.rejects(base) is None


# ------------------------------------------------------------------ Vast.ai


def _vast_launch(cli, path, gpu: str, *extra: str):
    code, out, err = cli("launch", "--target", "vastai", "--image", path, "--gpu", gpu, *FAST, *extra, "--json")
    return code, (json.loads(out) if out.strip() else None), err


def test_vast_publish_filters_the_templates_offers_by_gpu_ram(vast, cli, big_spec_path, image_ref):
    assert cli("publish", "--target", "vastai", "--image", big_spec_path, "--image-ref", image_ref)[0] == 0
    (post,) = vast.calls("POST", "/template/$")
    assert post.body["extra_filters"]["gpu_ram"] == {"gte": 76000}


def test_vast_rents_an_80_gb_a100_not_the_cheaper_40_gb_one(vast, cli, big_spec_path, image_ref, make_report):
    assert cli("publish", "--target", "vastai", "--image", big_spec_path, "--image-ref", image_ref)[0] == 0
    vast.offers = [{**offer(51, price=0.40, gpu="A100 SXM4", cap=800), "gpu_ram": A100_40GB_MB},
                   {**offer(52, price=0.90, gpu="A100 SXM4", cap=800), "gpu_ram": A100_80GB_MB}]
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = _vast_launch(cli, big_spec_path, "A100 SXM")
    assert code == 0, err
    (search,) = vast.calls("POST", "/bundles/$")
    assert search.body["gpu_ram"] == {"gte": 76000} and search.body["gpu_name"] == {"eq": "A100 SXM4"}
    assert result["offer"]["id"] == 52 and result["offer"]["gpu_ram"] == A100_80GB_MB
    assert result["min_gpu_memory_gb"] == 80


def test_vast_offers_the_server_let_through_are_rechecked(vast, cli, big_spec_path, image_ref, make_report):
    assert cli("publish", "--target", "vastai", "--image", big_spec_path, "--image-ref", image_ref)[0] == 0
    vast.offers = [{**offer(61, price=0.40, gpu="A100 SXM4", cap=800), "gpu_ram": A100_40GB_MB},
                   {**offer(62, price=0.90, gpu="A100 SXM4", cap=800), "gpu_ram": A100_80GB_MB}]
    vast.unfiltered = {"gpu_ram"}  # a server that does not apply the memory filter
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = _vast_launch(cli, big_spec_path, "A100 SXM")
    assert code == 0, err
    assert result["offer"]["id"] == 62 and "#61: GPU memory 40960 MB < 76000 MB" in err
    assert [r.path for r in vast.calls("PUT", "/asks/")] == ["/api/v0/asks/62/"]


def test_vast_with_only_small_offers_rents_nothing(vast, cli, big_spec_path, image_ref):
    assert cli("publish", "--target", "vastai", "--image", big_spec_path, "--image-ref", image_ref)[0] == 0
    vast.offers = [{**offer(71, price=0.40, gpu="A100 SXM4", cap=800), "gpu_ram": A100_40GB_MB}]
    code, result, err = _vast_launch(cli, big_spec_path, "A100 SXM")
    assert code == 2 and result is None
    assert len(err.strip().splitlines()) == 1 and "no Vast.ai offer for A100 SXM" in err and "GPU memory >= 76000 MB" in err
    assert vast.calls("PUT", "/asks/") == [] and vast.instances == {}


def test_vast_launch_on_a_smaller_gpu_is_refused_before_any_request(vast, cli, big_spec_path, image_ref):
    assert cli("publish", "--target", "vastai", "--image", big_spec_path, "--image-ref", image_ref)[0] == 0
    before = len(vast.requests)
    code, out, err = cli("launch", "--target", "vastai", "--image", big_spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and out == ""
    assert err.strip() == ("error: --gpu: L40S has 48 GB of memory (gpubake's GPU table), but image 'gpuimg' "
                           "needs >= 80 GB (min_gpu_memory_gb)")
    assert len(vast.requests) == before  # not even a search


# ------------------------------------------------------------------ RunPod


def _runpod_publish(cli, path, image_ref, *extra):
    code, out, err = cli("publish", "--target", "runpod", "--image", path, "--image-ref", image_ref, *extra, "--json")
    assert code == 0, err
    return json.loads(out)


def test_runpod_launch_on_a_smaller_gpu_is_refused_before_any_request(runpod, cli, big_spec_path, image_ref):
    _runpod_publish(cli, big_spec_path, image_ref)
    before = len(runpod.requests)
    code, out, err = cli("launch", "--target", "runpod", "--image", big_spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and out == "" and "has 48 GB of memory (gpubake's GPU table)" in err
    assert len(runpod.requests) == before and runpod.pods == {}


def test_runpod_refuses_a_gpu_its_catalog_lists_below_the_floor(runpod, cli, big_spec_path, image_ref):
    """A GPU not in gpubake's table: RunPod's catalog `memory` ("VRAM in GB") decides."""
    small = {**runpod.gpu("NVIDIA RTX A6000"), "id": "NVIDIA RTX A4000", "name": "RTX A4000", "pool": "AMPERE_16",
             "memory": 16}
    runpod.catalog.append(small)
    _runpod_publish(cli, big_spec_path, image_ref)
    code, out, err = cli("launch", "--target", "runpod", "--image", big_spec_path, "--gpu", "NVIDIA RTX A4000", *FAST)
    assert code == 2 and out == ""
    assert err.strip() == ("error: --gpu: NVIDIA RTX A4000 has 16 GB of memory (RunPod's catalog), but image 'gpuimg' "
                           "needs >= 80 GB (min_gpu_memory_gb)")
    assert runpod.calls("POST", "/v2/pods") == []


def test_runpod_launch_on_an_80_gb_gpu_reports_the_floor(runpod, cli, big_spec_path, image_ref, make_report):
    _runpod_publish(cli, big_spec_path, image_ref)
    runpod.set_health(f"pod{runpod._n + 1:04d}x", make_report("pass"))
    code, out, err = cli("launch", "--target", "runpod", "--image", big_spec_path, "--gpu", "H100", *FAST, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["min_gpu_memory_gb"] == 80 and result["gpu"] == "NVIDIA H100 80GB HBM3"
    (create,) = runpod.calls("POST", "/v2/pods$")
    assert create.body["gpu"]["id"] == "NVIDIA H100 80GB HBM3"


def test_runpod_serverless_pools_hold_only_gpus_with_enough_memory(runpod, cli, big_spec_path, spec_path, image_ref):
    """Every type of gpubake's table for sm_80/sm_89/sm_90 with >= 80 GB, as RunPod pools them; a
    pool's smaller types (here a 40 GB A100 beside the 80 GB one) are excluded."""
    runpod.catalog.append({**runpod.gpu("NVIDIA A100-SXM4-80GB"), "id": "NVIDIA A100-SXM4-40GB", "name": "A100 SXM 40GB",
                           "memory": 40})
    result = _runpod_publish(cli, big_spec_path, image_ref, "--serverless")
    assert result["serverless"] is True
    (post,) = runpod.calls("POST", "/v2/serverless$")
    assert post.body["gpu"] == {"pools": ["ADA_80_PRO", "AMPERE_80", "HOPPER_141"], "count": 1, "minCudaVersion": "12.8",
                                "excludedTypes": ["NVIDIA A100-SXM4-40GB"]}


def test_runpod_serverless_refuses_a_named_gpu_below_the_floor(runpod, cli, big_spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", big_spec_path, "--image-ref", image_ref,
                         "--serverless", "--gpu", "L40S")
    assert code == 2 and out == "" and "--gpu: L40S has 48 GB of memory (gpubake's GPU table)" in err
    assert runpod.writes() == []
    runpod.catalog.append({**runpod.gpu("NVIDIA RTX A6000"), "id": "NVIDIA RTX A4000", "name": "RTX A4000", "memory": 16})
    code, out, err = cli("publish", "--target", "runpod", "--image", big_spec_path, "--image-ref", image_ref,
                         "--serverless", "--gpu", "NVIDIA RTX A4000")
    assert code == 2 and "--gpu: NVIDIA RTX A4000 has 16 GB of memory (RunPod's catalog)" in err
    assert runpod.writes() == []

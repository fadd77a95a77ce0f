"""The template payloads and the offer choice, as pure functions (no server).

Payload fields as documented by RunPod (REST v2 createTemplate: tests/contracts/openapi/runpod-v2.json)
and Vast.ai (https://docs.vast.ai/api-reference/templates/create-template); offer fields as
in Vast.ai's search-offers response (https://docs.vast.ai/api-reference/search/search-offers).
"""

from __future__ import annotations

import json

import pytest

from gpubake.errors import GpubakeError
from gpubake.images.marketplace.offers import OfferPolicy, check_gpu_for_spec, min_driver, resolve_gpu, runpod_cuda_versions
from gpubake.images.marketplace.payload import template_payload


def test_payloads_hold_no_secret_and_match_the_spec(spec, image_ref):
    for target in ("runpod", "vastai"):
        body = template_payload(spec, target, image_ref, registry_auth="ref-1")
        text = json.dumps(body)
        assert image_ref in text and "password" not in text.lower() and "docker_login_pass" not in body
        assert body["name"] == "gpubake-gpuimg"
    assert template_payload(spec, "runpod", image_ref)["ports"] == ["8000/http", "22/tcp"]
    assert "registry" not in template_payload(spec, "runpod", image_ref)


def test_runpod_payloads_are_v2_bodies_the_document_accepts(image_ref):
    from contracts.openapi_contract import contract

    from gpubake.images.marketplace.payload import runpod_payload

    c = contract("runpod-v2")
    specs = [s for s in _catalog_specs() if "runpod" in s.targets]
    assert specs
    for spec in specs:
        for serverless in (False, True):
            body = runpod_payload(spec, image_ref, registry_auth="cred1", serverless=serverless)
            assert c.check_request("POST", "/v2/templates", body=body, headers={"Authorization": "Bearer k"}) == "createTemplate"
            assert c.check_request("PATCH", "/v2/templates/t1", body=body, headers={"Authorization": "Bearer k"}) == "updateTemplate"
            assert body["serverless"] is serverless and body["name"].endswith("-serverless") is serverless
            if serverless:
                assert body["ports"] == [] and body["startSsh"] is False and "mounts" not in body
            elif spec.runtime.volume_disk_gb:
                assert body["mounts"] == {"persistent": {"size": spec.runtime.volume_disk_gb, "path": spec.runtime.volume_mount}}


def test_payload_bad_input(spec, image_ref):
    with pytest.raises(GpubakeError, match="--image-ref"):
        template_payload(spec, "runpod", "has space@sha256:x")
    udp = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={
        "ports": [*spec.runtime.ports, type(spec.runtime.ports[0])(port=9000, protocol="udp", name="rtp")]})})
    with pytest.raises(GpubakeError, match=r"runtime.ports\[2\]: RunPod exposes http and tcp ports only"):
        template_payload(udp, "runpod", image_ref)
    assert "-p 9000:9000/udp" in template_payload(udp, "vastai", image_ref)["env"]
    only_runpod = spec.model_copy(update={"targets": ["runpod"]})
    with pytest.raises(GpubakeError, match="not built for vastai"):
        template_payload(only_runpod, "vastai", image_ref)


def test_vast_env_values_are_shell_quoted(spec, image_ref):
    odd = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"env": {"PROMPT": "a cat; rm -rf /"}})})
    assert "-e PROMPT='a cat; rm -rf /'" in template_payload(odd, "vastai", image_ref)["env"]


@pytest.mark.parametrize(("typed", "runpod", "vast", "arch"), [
    ("RTX 5090", "NVIDIA GeForce RTX 5090", "RTX 5090", "sm_120"),
    ("rtx-4090", "NVIDIA GeForce RTX 4090", "RTX 4090", "sm_89"),
    ("H100", "NVIDIA H100 80GB HBM3", "H100 SXM", "sm_90"),
    ("NVIDIA L40S", "NVIDIA L40S", "L40S", "sm_89"),
])
def test_gpu_names(typed, runpod, vast, arch):
    assert resolve_gpu(typed, "runpod").market_id == runpod
    g = resolve_gpu(typed, "vastai")
    assert g.market_id == vast and g.arch == arch


def test_unknown_gpu_passes_through_without_arch_check(spec):
    g = resolve_gpu("Quantum QX-9", "vastai")
    assert g.market_id == "Quantum QX-9" and g.arch is None
    check_gpu_for_spec(g, spec)  # no error: the marketplace decides
    with pytest.raises(GpubakeError, match=r"RTX 5090 is sm_120"):
        check_gpu_for_spec(resolve_gpu("RTX 5090", "runpod"), spec)


def test_driver_floor_comes_from_the_compat_tables(spec):
    from gpubake.images import compat

    assert min_driver(spec) == compat.min_driver("12.8").toolkit == "570.124.06"
    assert runpod_cuda_versions(spec) == ["12.8", "12.9", "13.0"]


def test_offer_choice_rechecks_what_the_server_filters(spec):
    policy = OfferPolicy.for_spec(spec, resolve_gpu("L40S", "vastai"), max_price=1.0, min_reliability=0.98)
    base = {"gpu_name": "L40S", "num_gpus": 1, "driver_version": "575.51.03", "cuda_max_good": 12.9,
            "reliability2": 0.99, "compute_cap": 890, "disk_space": 100}
    offers = [
        {**base, "id": 1, "dph_total": 0.2, "driver_version": "1000.1.1"},  # newer than any floor: fine (numeric compare)
        {**base, "id": 2, "dph_total": 0.1, "driver_version": "570.86.10"},  # < 570.124.06 (same major)
        {**base, "id": 3, "dph_total": 0.15, "disk_space": 20},  # too little disk for the 40 GB container
        {**base, "id": 4, "dph_total": 0.2, "reliability2": 0.999},  # same price, more reliable than #1
        {**base, "id": 5, "dph_total": 1.5},  # over --max-price
        {**base, "id": 6, "dph_total": 0.05, "compute_cap": 1200},  # Blackwell: not in gpu_archs
    ]
    best, skipped = policy.pick(offers)
    assert best["id"] == 4
    assert {i for i, _ in skipped} == {2, 3, 5, 6}
    with pytest.raises(GpubakeError, match="--max-price"):
        OfferPolicy.for_spec(spec, resolve_gpu("L40S", "vastai"), max_price=0, min_reliability=0.9)


def _catalog_specs():
    from gpubake.images.catalog import CATALOG_DIR
    from gpubake.images.spec import load_toml, parse_spec

    return [parse_spec(load_toml(p), source=p.name) for p in sorted(CATALOG_DIR.glob("*.toml"))]


def test_every_catalog_image_has_a_payload_for_each_of_its_targets(image_ref):
    specs = _catalog_specs()
    assert specs
    for spec in specs:
        for target in spec.targets:
            body = template_payload(spec, target, image_ref)
            assert body["name"] == f"gpubake-{spec.name}"
            if target == "runpod":
                assert body["disk"] == spec.runtime.container_disk_gb
                assert set(body["ports"]) == {f"{p.port}/{p.protocol}" for p in spec.runtime.ports}
            else:
                assert body["image"] == image_ref and "-p " in body["env"] or not spec.runtime.ports


# ------------------------------------------------------------------ Vast.ai: what the service takes


@pytest.mark.parametrize(("version", "number"), [
    ("570.124.06", 570124006), ("580.95.05", 580095005), ("535.86.10", 535086010), ("1000.1.1", 1000001001),
    ("550.54", 550054000),
])
def test_driver_versions_as_vasts_integer(version, number):
    from gpubake.images.marketplace.offers import vast_driver_number

    assert vast_driver_number(version) == number  # vast-cli's numeric_version: each part padded to 3 digits


@pytest.mark.parametrize("bad", ["570", "570.1x.2", "", "1.2.3.4", "570.1234.1"])
def test_a_driver_version_vast_cannot_encode_is_refused(bad):
    from gpubake.images.marketplace.offers import vast_driver_number

    with pytest.raises(GpubakeError, match="driver version"):
        vast_driver_number(bad)


def test_an_offers_driver_is_read_from_its_integer_column_first():
    from gpubake.images.marketplace.offers import offer_driver

    assert offer_driver({"driver_vers": 570124006, "driver_version": "999.99.99"}) == (570, 124, 6)
    assert offer_driver({"driver_version": "575.57.08"}) == (575, 57, 8)
    assert offer_driver({}) == (0,)


def test_the_offer_query_carries_the_real_disk_the_integer_driver_and_the_price_range(spec):
    policy = OfferPolicy.for_spec(spec, resolve_gpu("L40S", "vastai"), max_price=1.0, min_reliability=0.98)
    q = policy.query()
    assert q["allocated_storage"] == 40 == policy.min_disk_gb  # container 40 + volume 0
    assert q["driver_version"] == {"gte": 570124006} and q["dph_total"] == {"lte": 1.0}
    assert policy.query(cheapest=0.3)["dph_total"] == {"lte": 1.0, "gte": 0.3}  # the next page


def test_vast_template_is_private_and_env_refuses_what_vast_cannot_parse(spec, image_ref):
    body = template_payload(spec, "vastai", image_ref)
    assert body["private"] is True
    for value in ("it's", 'say "hi"', "two\nlines"):
        odd = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"env": {"MSG": value}})})
        with pytest.raises(GpubakeError, match=r"runtime.env.MSG: Vast.ai's env string cannot carry quotes or line breaks"):
            template_payload(odd, "vastai", image_ref)


def test_create_env_holds_vasts_limits():
    from gpubake.images.marketplace.vastai import create_env

    assert create_env({"SSH_PUBLIC_KEY": "ssh-ed25519 AAAA me@x"}) == "-e SSH_PUBLIC_KEY='ssh-ed25519 AAAA me@x'"
    assert create_env({}) is None
    with pytest.raises(GpubakeError, match=r"--ssh-key: the public key is 300 characters; .*over 256.*ed25519"):
        create_env({"PUBLIC_KEY": "k" * 300})
    with pytest.raises(GpubakeError, match=r"env HF_HOME is 257 characters"):
        create_env({"HF_HOME": "/" * 257})


def test_every_catalog_vast_body_validates_against_vasts_document(image_ref):
    """The bodies gpubake builds for each catalog image, checked with the vendored OpenAPI document."""
    from contracts.openapi_contract import contract

    c, auth = contract("vastai"), {"Authorization": "Bearer k"}
    for spec in _catalog_specs():
        if "vastai" not in spec.targets:
            continue
        body = template_payload(spec, "vastai", image_ref)
        assert c.check_request("POST", "/api/v0/template/", body=body, headers=auth) == "createTemplate"
        assert c.check_request("PUT", "/api/v0/template/", body={"hash_id": "h", **body}, headers=auth) == "editTemplate"
        gpu = resolve_gpu("H100", "vastai") if spec.gpu_archs else resolve_gpu("RTX 4090", "vastai")
        policy = OfferPolicy.for_spec(spec, gpu, max_price=2.5, min_reliability=0.98)
        assert c.check_request("POST", "/api/v0/bundles/", body=policy.query(cheapest=0.5), headers=auth) == "searchOffers"


def test_vast_template_opens_the_api_port_and_starts_in_every_launch_mode(spec, image_ref):
    """OPEN_BUTTON_PORT points the portal's Open button at the API; `onstart` starts the image
    in Vast.ai's SSH and Jupyter launch modes, where its entrypoint is replaced."""
    import shlex

    from contracts.openapi_contract import env_entries

    body = template_payload(spec, "vastai", image_ref)
    assert env_entries(body["env"])["OPEN_BUTTON_PORT"] == "8000"
    assert shlex.split(body["onstart"]) == ["/opt/gpubake/start.sh", "--detach"] and body["runtype"] == "args"
    moved = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={
        "ports": [type(p)(port=9100 if p.name == "api" else p.port, protocol=p.protocol, name=p.name)
                  for p in spec.runtime.ports]})})
    assert env_entries(template_payload(moved, "vastai", image_ref)["env"])["OPEN_BUTTON_PORT"] == "9100"
    own = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"env": {"OPEN_BUTTON_PORT": "22"}})})
    assert template_payload(own, "vastai", image_ref)["env"].count("OPEN_BUTTON_PORT") == 1  # the spec's wins
    assert env_entries(template_payload(own, "vastai", image_ref)["env"])["OPEN_BUTTON_PORT"] == "22"
    assert "OPEN_BUTTON_PORT" not in template_payload(spec, "runpod", image_ref)["env"]


def test_vast_onstart_is_the_installed_start_script_of_every_catalog_image(image_ref):
    from gpubake.provisioning.facts import INSTALL_PREFIX  # where build step 30 installs start.sh

    for spec in _catalog_specs():
        if "vastai" in spec.targets:
            body = template_payload(spec, "vastai", image_ref)
            assert body["onstart"] == f"{INSTALL_PREFIX}/start.sh --detach"
            assert spec.runtime.entrypoint == [f"{INSTALL_PREFIX}/start.sh"]  # the same script as the entrypoint

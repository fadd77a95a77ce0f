"""publish / launch / destroy against a local Vast.ai API server.

Contract followed: Vast.ai's OpenAPI document, vendored as tests/contracts/openapi/vastai.yaml
(templates, search offers, create/show/destroy instance). The server is `FakeVast`
(fake_vastai.py): every request gpubake sends and every answer it gives is validated against
that document, and a test fails on any request outside it. Renting without orphans, the
instance lifecycle and bad input are in test_vastai_rent.py.
"""

from __future__ import annotations

import json

from marketplace.fake_vastai import offer

FAST = ["--poll-interval", "0.05", "--timeout", "10"]


def test_publish_creates_then_keeps_then_updates(vast, cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0, err
    created = json.loads(out)
    assert created["action"] == "created" and created["hash_id"]
    (post,) = vast.calls("POST", "/template/$")
    assert post.body["image"] == image_ref
    assert post.body["env"] == ("-p 8000:8000 -p 22:22 -e GPUBAKE_IMAGE=gpuimg -e GPUBAKE_MODEL_DIR=/opt/gpubake/model"
                                " -e OPEN_BUTTON_PORT=8000")  # the portal's Open button: the API
    assert post.body["runtype"] == "args"  # keeps the image's entrypoint (the gpubake start script)
    assert post.body["onstart"] == "/opt/gpubake/start.sh --detach"  # what SSH/Jupyter launch modes run instead
    assert post.body["recommended_disk_space"] == 40
    assert post.body["extra_filters"] == {"cuda_max_good": {"gte": 12.8}, "compute_cap": {"in": [890, 900]}}
    assert post.body["private"] is True  # not in Vast.ai's public template search
    # the lookup is restricted to our own account's templates, and asks for every column
    lookup = vast.calls("GET", "/template/$")[0]
    assert json.loads(lookup.query["select_filters"][0]) == {"creator_id": {"eq": 4242}, "name": {"eq": "gpubake-gpuimg"}}
    assert json.loads(lookup.query["select_cols"][0]) == ["*"]

    code, out, _ = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0 and json.loads(out)["action"] == "unchanged"
    assert vast.calls("PUT", "/template/") == []

    new_ref = image_ref.replace("ab" * 32, "ef" * 32)
    code, out, _ = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", new_ref, "--json")
    updated = json.loads(out)
    assert code == 0 and updated["action"] == "updated" and updated["changed"] == ["image"]
    (put,) = vast.calls("PUT", "/template/$")
    assert put.body["hash_id"] == created["hash_id"]
    assert updated["id"] == created["id"] and updated["hash_id"] != created["hash_id"]  # Vast re-hashes on edit
    assert len(vast.templates) == 1


def test_private_registry_login_is_sent_but_never_shown(vast, cli, spec_path, image_ref, monkeypatch):
    password = "ghp_REGISTRYSECRET_55aa66bb"
    monkeypatch.setenv("GPUBAKE_REGISTRY_USER", "acme-bot")
    monkeypatch.setenv("GPUBAKE_REGISTRY_PASSWORD", password)
    code, out, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref,
                         "--registry-auth", "ghcr.io", "--dry-run", "--json")
    assert code == 0, err
    assert password not in out + err and vast.writes() == []
    planned = [r for r in json.loads(out)["requests"] if not r["sent"]][0]
    assert planned["body"]["docker_login_pass"] == "***" and planned["body"]["docker_login_user"] == "acme-bot"

    code, out, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref,
                         "--registry-auth", "ghcr.io", "--json")
    assert code == 0 and password not in out + err
    body = vast.calls("POST", "/template/$")[0].body
    assert body["docker_login_repo"] == "ghcr.io" and body["docker_login_pass"] == password


def test_registry_auth_without_credentials_is_an_error(vast, cli, spec_path, image_ref):
    code, _, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref, "--registry-auth", "ghcr.io")
    assert code == 2 and "GPUBAKE_REGISTRY_PASSWORD" in err and vast.writes() == []


def _published(cli, spec_path, image_ref):
    assert cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref)[0] == 0


def test_launch_picks_the_cheapest_acceptable_offer_and_reads_the_verdict(vast, cli, spec_path, image_ref, make_report):
    _published(cli, spec_path, image_ref)
    vast.offers = [
        offer(1, price=0.30, driver="550.54.15"),  # cheapest, but its driver is older than CUDA 12.8 needs
        offer(2, price=0.35, rel=0.90),  # unreliable host
        offer(3, price=0.52),
        offer(4, price=0.45, cuda=12.4),  # CUDA too old
        offer(5, price=0.48),  # the one to rent
        offer(6, price=0.47, gpu="RTX 4090", cap=890),  # another GPU
    ]
    vast.set_health(str(vast._n + 1), make_report(None), make_report("degraded", step_s=2.0))
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "l40s", *FAST, "--json")
    assert code == 1, err  # degraded
    result = json.loads(out)
    assert result["offer"]["id"] == 5 and result["verdict"] == "degraded"
    assert result["urls"]["api"] == f"http://127.0.0.1:{vast.port}" and result["urls"]["ssh"] == "ssh://127.0.0.1:40022"
    assert result["throughput"]["seconds_per_step"] == 2.0
    (search,) = vast.calls("POST", "/bundles/$")
    q = search.body
    # the driver floor as Vast.ai's integer (570.124.06 -> 570124006), priced for the real disk
    assert q["gpu_name"] == {"eq": "L40S"} and q["driver_version"] == {"gte": 570124006}
    assert q["cuda_max_good"] == {"gte": 12.8} and q["reliability"] == {"gte": 0.98}
    assert q["order"] == [["dph_total", "asc"]] and q["compute_cap"] == {"in": [890, 900]}
    assert q["allocated_storage"] == 40
    (rent,) = vast.calls("PUT", "/asks/")
    assert rent.path == "/api/v0/asks/5/" and rent.body["template_hash_id"] == next(iter(vast.templates.values()))["hash_id"]
    # the only env of a plain launch is the service's key (generated here), as Vast.ai's flag string
    assert rent.body["disk"] == 40 and "image" not in rent.body
    assert rent.body["env"].startswith("-e GPUBAKE_API_KEY=") and " -e " not in rent.body["env"]
    assert rent.body["label"].startswith("gpubake-gpuimg-")


def test_launch_with_max_price_and_no_offer_left_rents_nothing(vast, cli, spec_path, image_ref):
    _published(cli, spec_path, image_ref)
    vast.offers = [offer(1, price=0.9), offer(2, price=1.2)]
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--max-price", "0.5", *FAST)
    assert code == 2 and "no Vast.ai offer for L40S at most $0.5/h" in err
    assert vast.calls("PUT", "/asks/") == [] and vast.calls("POST", "/bundles/")[0].body["dph_total"] == {"lte": 0.5}


def test_launch_whose_self_test_fails_destroys_itself(vast, cli, spec_path, image_ref, make_report):
    _published(cli, spec_path, image_ref)
    vast.offers = [offer(7, price=0.4)]
    iid = str(vast._n + 1)
    vast.set_health(iid, make_report("fail"))
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json")
    assert code == 3, err
    result = json.loads(out)
    assert result["verdict"] == "fail" and result["destroyed"] is True and result["instance_id"] == iid
    assert vast.instances == {} and [r.path for r in vast.calls("DELETE")] == [f"/api/v0/instances/{iid}/"]


def test_an_offer_gone_before_renting_is_a_clear_error(vast, cli, spec_path, image_ref):
    _published(cli, spec_path, image_ref)
    vast.offers = [offer(8, price=0.4)]
    vast.inject("PUT", "/asks/8/", 404)
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and "not found (HTTP 404): PUT /asks/8/" in err
    assert vast.instances == {}


def test_status_errors_after_renting_tear_down_with_destroy_on_fail(vast, cli, spec_path, image_ref):
    _published(cli, spec_path, image_ref)
    vast.offers = [offer(9, price=0.4)]
    vast.inject("GET", "/instances/", 500, times=10)  # more than the retries
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST)
    assert code == 2 and "server error (HTTP 500)" in err
    assert vast.instances == {} and len(vast.calls("DELETE")) == 1


def test_destroy_and_rate_limit(vast, cli):
    vast.instances["555"] = {"id": 555, "polls": 0, "dph_total": 0.4}
    vast.inject("DELETE", "/instances/555/", 429, times=2)
    code, out, err = cli("destroy", "--target", "vastai", "555", "--json")
    assert code == 0, err
    assert json.loads(out)["destroyed"] is True and vast.instances == {}
    assert len(vast.calls("DELETE")) == 3


def test_dry_run_without_any_key_shows_the_plan(vast, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY")
    code, out, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref, "--dry-run", "--json")
    assert code == 0, err
    assert [(r["method"], r["sent"]) for r in json.loads(out)["requests"]] == [("POST", False)]
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--dry-run", "--json")
    assert code == 0, err
    planned = json.loads(out)["requests"]
    assert [r["url"].rsplit("/api/v0", 1)[1] for r in planned] == ["/bundles/", "/asks/<offer id>/"]
    assert vast.requests == []


def test_another_accounts_public_template_of_the_same_name_is_never_ours(vast, cli, spec_path, image_ref):
    """The template search "include[s] both your own templates and publicly shared templates"."""
    foreign = dict(vast.add_foreign_template("gpubake-gpuimg"))
    code, out, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0 and json.loads(out)["action"] == "created", err
    code, out, _ = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0 and json.loads(out)["action"] == "unchanged"
    assert vast.templates[7] == foreign and vast.calls("PUT", "/template/") == []

"""Renting on Vast.ai without orphans, for the real disk and driver, through the real lifecycle.

Against `FakeVast` (fake_vastai.py), which holds gpubake's requests and its own answers to
Vast.ai's vendored OpenAPI document (tests/contracts/openapi/vastai.yaml) and plays what the
service does: an offer is rented once (a second `PUT /asks/{id}/` is `no_such_ask`), offers
vanish between search and create, answers come as 429 with `Retry-After` or as a 5xx after
the instance was already created, and an instance is null, then "loading", then "running".
"""

from __future__ import annotations

import json
import math
import time

import pytest
import requests
from marketplace.fake_vastai import READONLY_KEY, VAST_KEY, offer

from gpubake.images.marketplace.http import ApiClient, MarketplaceError
from gpubake.images.marketplace.offers import OfferPolicy, resolve_gpu
from gpubake.images.marketplace.vastai import Vast

FAST = ["--poll-interval", "0.05", "--timeout", "10"]


def publish(cli, spec_path, image_ref) -> None:
    assert cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref)[0] == 0


def launch(cli, spec_path, *extra: str) -> tuple[int, dict | None, str]:
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", *FAST, *extra, "--json")
    return code, (json.loads(out) if out.strip() else None), err


def client(vast, **kw) -> ApiClient:
    return ApiClient(api="Vast.ai", base_url=vast.url + "/api/v0", api_key=kw.pop("key", VAST_KEY),
                     key_hint="set VAST_API_KEY", backoff=0.01, **kw)


def template_of(vast) -> dict:
    (tpl,) = [t for t in vast.templates.values() if t.get("creator_id") == vast.user_id]
    return tpl


# ------------------------------------------------------------------ no orphan after an ambiguous create


def test_a_5xx_after_the_rental_is_not_retried_and_the_instance_is_adopted(vast, cli, spec_path, image_ref, make_report):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(11, price=0.40)]
    vast.inject("PUT", "/asks/11/", 500, after=True)  # the instance exists, the answer says 500
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = launch(cli, spec_path)
    assert code == 0, err
    assert len(vast.calls("PUT", "/asks/")) == 1  # never retried: a second PUT would be no_such_ask
    (lookup,) = vast.calls("GET", "/api/v1/instances/$")
    label = vast.calls("PUT", "/asks/")[0].body["label"]
    assert json.loads(lookup.query["select_filters"][0]) == {"label": {"eq": label}}
    assert list(vast.instances) == [result["instance_id"]] and vast.instances[result["instance_id"]]["label"] == label
    assert result["verdict"] == "pass" and "adopted instance" in err


def test_a_5xx_with_nothing_rented_is_proved_empty_and_rents_nothing(vast, cli, spec_path, image_ref):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(12, price=0.40)]
    vast.inject("PUT", "/asks/12/", 502)  # refused before anything happened
    code, _, err = launch(cli, spec_path)
    assert code == 2 and "server error (HTTP 502) on PUT /asks/12/" in err
    assert "no instance labelled gpubake-gpuimg-" in err and "nothing rented" in err
    assert len(vast.calls("PUT", "/asks/")) == 1 and len(vast.calls("GET", "/api/v1/instances/$")) == Vast.lookup_tries
    assert vast.instances == {}


def test_a_read_timeout_after_the_rental_is_adopted(vast, spec):
    """The answer comes after the client's read timeout; the instance was made: adopted, once."""
    vast.offers = [offer(13, price=0.40)]
    tpl = {"hash_id": "h" * 32}
    vast.templates[1] = {"id": 1, "name": "gpubake-gpuimg", "image": "i", "hash_id": "h" * 32, "creator_id": vast.user_id}
    vast.inject("PUT", "/asks/13/", None, after=True, delay=1.0)
    mk = Vast(client(vast, timeout=(2.0, 0.3)))
    policy = OfferPolicy.for_spec(spec, resolve_gpu("L40S", "vastai"), max_price=None, min_reliability=0.9)
    started = time.monotonic()
    iid, rented = mk.rent(spec, tpl, policy, label="gpubake-gpuimg-1")
    assert time.monotonic() - started < 1.0  # it did not wait for the late answer
    assert rented["id"] == 13 and list(vast.instances) == [iid]
    assert vast.instances[iid]["label"].startswith("gpubake-gpuimg-1-")  # made unique per launch
    assert len(vast.calls("PUT")) == 1


def test_an_ambiguous_create_that_cannot_be_checked_says_what_to_do(vast, cli, spec_path, image_ref):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(14, price=0.40)]
    vast.inject("PUT", "/asks/14/", 503, after=True, retry_after="0")
    vast.inject("GET", "/api/v1/instances/", 500, times=100)
    code, _, err = launch(cli, spec_path)
    assert code == 2 and "could not check for an instance labelled" in " ".join(err.split())
    assert "gpubake destroy --target vastai ID" in " ".join(err.split())
    assert len(vast.instances) == 1 and len(vast.calls("PUT", "/asks/")) == 1  # reported, not hidden


def test_twins_with_the_launch_label_are_destroyed_and_the_newest_adopted(vast):
    vast.add_instance("301", label="gpubake-x-1-ab")
    vast.add_instance("302", label="gpubake-x-1-ab")
    vast.add_instance("303", label="someone-else")
    assert Vast(client(vast)).settle("gpubake-x-1-ab", "PUT /asks/1/: HTTP 500") == "302"
    assert sorted(vast.instances) == ["302", "303"]


def test_label_lookup_follows_the_pages(vast):
    for i in range(30):
        vast.add_instance(str(400 + i), label="gpubake-x-2-cd" if i != 7 else "other")
    found = Vast(client(vast)).find_by_label("gpubake-x-2-cd")
    assert [r["id"] for r in found] == [400 + i for i in range(30) if i != 7]
    first, second = vast.calls("GET", "/api/v1/instances/$")  # 25 per page, then next_token
    assert "after_token" not in first.query and second.query["after_token"]


def test_429_with_retry_after_is_waited_for_then_rents_once(vast, cli, spec_path, image_ref, make_report):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(15, price=0.40)]
    vast.inject("PUT", "/asks/15/", 429, retry_after="1")  # rate limited: not processed, safe to resend
    vast.set_health(str(vast._n + 1), make_report("pass"))
    started = time.monotonic()
    code, result, err = launch(cli, spec_path)
    assert code == 0, err
    puts = vast.calls("PUT", "/asks/")
    assert len(puts) == 2 and time.monotonic() - started >= 1.0  # Retry-After: 1 honoured (backoff is 0.01 s)
    assert list(vast.instances) == [result["instance_id"]]


# ------------------------------------------------------------------ offers


def test_an_offer_taken_between_search_and_create_moves_to_the_next(vast, cli, spec_path, image_ref, make_report):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(21, price=0.30), offer(22, price=0.35)]
    vast.taken_after_search = {21}  # someone else rents the cheapest right after our search
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = launch(cli, spec_path)
    assert code == 0, err
    assert [r.path for r in vast.calls("PUT", "/asks/")] == ["/api/v0/asks/21/", "/api/v0/asks/22/"]
    assert "offer #21 is gone" in err and "no_such_ask" in err
    assert result["offer"]["id"] == 22 and len(vast.instances) == 1


def test_prices_are_judged_for_the_disk_that_is_rented(vast, cli, spec_path, image_ref, make_report):
    """Offer 31 is $0.38/h with Vast.ai's default 8 GB but $0.70/h with the image's 40 GB."""
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(31, price=0.30, storage_cost=7.2), offer(32, price=0.45)]
    assert vast.price(vast.offers[0], 8) == 0.38 and vast.price(vast.offers[0], 40) == 0.7
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = launch(cli, spec_path, "--max-price", "0.5")
    assert code == 0, err
    (search,) = vast.calls("POST", "/bundles/$")
    assert search.body["allocated_storage"] == 40 and search.body["dph_total"] == {"lte": 0.5}
    assert result["offer"]["id"] == 32 and result["offer"]["dph_total"] == 0.45
    assert vast.instances[result["instance_id"]]["dph_total"] == 0.45  # what it bills


def test_the_driver_floor_is_vasts_integer_and_rechecked(vast, cli, spec_path, image_ref, make_report):
    """570.86.10 < 570.124.06 although "570.86.10" > "570.124.06" as text: the server compares
    `driver_vers`; when it lets such an offer through anyway, gpubake's own check skips it."""
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(41, price=0.20, driver="570.86.10"), offer(42, price=0.50, driver="570.124.06")]
    vast.unfiltered = {"driver_version"}  # a server that does not apply the driver filter
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = launch(cli, spec_path)
    assert code == 0, err
    assert vast.calls("POST", "/bundles/$")[0].body["driver_version"] == {"gte": 570124006}
    assert result["offer"]["id"] == 42 and "#41: driver 570.86.10 < 570.124.06" in err


def test_offers_are_paged_by_price_when_a_page_holds_no_acceptable_one(vast, cli, spec_path, image_ref, make_report):
    publish(cli, spec_path, image_ref)
    old = [offer(500 + i, price=round(0.10 + i * 0.001, 3), driver="550.54.15") for i in range(70)]
    vast.offers = [*old, offer(99, price=0.40)]
    vast.unfiltered = {"driver_version"}
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = launch(cli, spec_path)
    assert code == 0, err
    first, second = vast.calls("POST", "/bundles/$")
    assert first.body["limit"] == Vast.page_size and "dph_total" not in first.body
    assert second.body["dph_total"] == {"gte": old[Vast.page_size - 1]["dph_base"]}  # the next price range
    assert result["offer"]["id"] == 99


def test_string_driver_filters_are_refused_by_the_fake(vast):
    """What gpubake used to send: the fake, like the service, refuses it (400, not a contract breach)."""
    body = {"gpu_name": {"eq": "L40S"}, "driver_version": {"gte": "570.124.06"}, "limit": 5}
    resp = requests.post(vast.url + "/api/v0/bundles/", json=body, headers={"Authorization": f"Bearer {VAST_KEY}"}, timeout=5)
    assert resp.status_code == 400 and "driver_version" in resp.json()["msg"]
    assert vast.violations == []


# ------------------------------------------------------------------ the fake holds the contract


@pytest.mark.parametrize(("body", "expected"), [
    ({"template_hash_id": "h", "disk": 40, "env": "-e SSH_PUBLIC_KEY='ssh-rsa " + "A" * 716 + " u@h'"},
     "value of 728 characters > 256"),
    ({"template_hash_id": "h", "disk": 40, "env": {"A": "b"}}, "is not of type 'string'"),
    ({"template_hash_id": "h", "disk": "40"}, "is not of type 'number'"),
    ({"template_hash_id": "h", "volume_mount": "/workspace"}, "'volume_mount' was unexpected"),
])
def test_the_fake_refuses_requests_outside_the_document(vast, body, expected):
    vast.offers = [offer(61, price=0.4)]
    resp = requests.put(vast.url + "/api/v0/asks/61/", json=body, headers={"Authorization": f"Bearer {VAST_KEY}"}, timeout=5)
    assert resp.status_code == 400 and expected in resp.json()["msg"]
    assert vast.instances == {} and len(vast.violations) == 1 and expected in vast.violations[0]
    vast.violations.clear()  # refused on purpose here; any other test fails on a violation


def test_the_fake_refuses_bad_keys_as_documented(vast):
    bad = {"Authorization": "Bearer vast-WRONG-000"}
    resp = requests.get(vast.url + "/api/v0/instances/1/", headers=bad, timeout=5)
    assert resp.status_code == 401 and resp.json() == {"success": False, "error": "auth_error", "msg": "Invalid user key"}
    resp = requests.post(vast.url + "/api/v0/bundles/", json={"limit": 1}, headers=bad, timeout=5)
    assert resp.status_code == 404 and resp.json()["msg"] == "Invalid user key"  # the document's answer there
    assert vast.violations == []


def test_the_fake_holds_its_own_answers_to_the_document(vast):
    vast.user_id = "4242"  # the document says integer: an answer like this is a bug in the fake
    resp = requests.get(vast.url + "/api/v0/users/current/", headers={"Authorization": f"Bearer {VAST_KEY}"}, timeout=5)
    assert resp.status_code == 500 and resp.json()["error"] == "fake_bug"
    assert len(vast.violations) == 1 and "response GET /api/v0/users/current/ -> 200" in vast.violations[0]
    vast.violations.clear()


# ------------------------------------------------------------------ the lifecycle


def test_loading_then_running_then_the_verdict(vast, cli, spec_path, image_ref, make_report):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(71, price=0.40)]
    vast.pull_seconds = 0.4
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, result, err = launch(cli, spec_path)
    assert code == 0, err
    polls = vast.calls("GET", "/api/v0/instances/")
    assert len(polls) >= 3 and result["instance_state"] == "running"  # null, loading..., running
    assert vast.calls("GET", "^/health$")  # /health only once it runs with its port published


def test_a_pull_that_never_ends_times_out_and_is_destroyed(vast, cli, spec_path, image_ref):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(72, price=0.40)]
    vast.pull_seconds = math.inf
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--poll-interval", "0.05",
                         "--timeout", "0.6", "--destroy-on-fail", "--json")
    assert code == 4, err
    result = json.loads(out)
    assert result["verdict"] == "timeout" and result["destroyed"] is True
    assert "loading: Pulling image" in result["reason"] and vast.instances == {}
    assert vast.calls("GET", "^/health$") == []


# ------------------------------------------------------------------ bad input: one line, exit 2


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_wrong_key_is_one_line(vast, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("VAST_API_KEY", "vast-WRONG-123456")
    code, _, err = cli("publish", "--target", "vastai", "--image", spec_path, "--image-ref", image_ref)
    line = _one_error_line(err)
    assert code == 2 and "API key rejected (HTTP 401)" in line and "vast-WRONG-123456" not in err


def test_a_wrong_key_on_the_offer_search_names_the_key(vast, spec):
    mk = Vast(client(vast, key="vast-WRONG-123456"))
    policy = OfferPolicy.for_spec(spec, resolve_gpu("L40S", "vastai"), max_price=None, min_reliability=0.9)
    with pytest.raises(MarketplaceError, match=r"API key rejected on POST /bundles/ .*Invalid user key.*VAST_API_KEY"):
        mk.search_offers(policy)


def test_a_key_without_the_permission_to_rent_rents_nothing(vast, cli, spec_path, image_ref, monkeypatch):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(81, price=0.40)]
    monkeypatch.setenv("VAST_API_KEY", READONLY_KEY)
    code, _, err = launch(cli, spec_path)
    line = _one_error_line(err)
    assert code == 2 and "API key rejected (HTTP 401) on PUT /asks/81/" in line
    assert vast.instances == {} and len(vast.calls("PUT", "/asks/")) == 1 and vast.calls("GET", "/api/v1/") == []


def test_an_unknown_gpu_name_is_one_line(vast, cli, spec_path, image_ref):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(82, price=0.40)]
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "Quantum QX-9", *FAST)
    line = _one_error_line(err)
    assert code == 2 and "no Vast.ai offer for Quantum QX-9" in line and "not in gpubake's GPU table" in line
    assert vast.calls("PUT") == []


def test_no_offer_under_max_price_is_one_line(vast, cli, spec_path, image_ref):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(83, price=0.90)]
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--max-price", "0.5", *FAST)
    assert code == 2 and "at most $0.5/h" in _one_error_line(err) and vast.calls("PUT") == []


def _keypair(tmp_path, pub: str):
    key = tmp_path / "id"
    key.write_text("private\n")
    (tmp_path / "id.pub").write_text(pub + "\n")
    return key


RSA4096_PUB = "ssh-rsa " + "A" * 716 + " me@laptop"  # 734 characters: over Vast.ai's 256 for an env value


def test_an_rsa4096_ssh_key_is_attached_through_the_api_not_the_env(vast, cli, spec_path, image_ref, tmp_path):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(84, price=0.40)]
    key = _keypair(tmp_path, RSA4096_PUB)
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--ssh-key", key,
                         "--poll-interval", "0.05", "--timeout", "1", "--json")
    assert code == 4, err  # nothing answers SSH on the fake's port 40022: the report never comes
    (rent,) = vast.calls("PUT", "/asks/")
    assert "SSH_PUBLIC_KEY" not in rent.body["env"] and "AAAA" not in rent.body["env"]  # the create took no key
    iid = json.loads(out)["instance_id"]
    (attach,) = vast.calls("POST", "/ssh/$")
    assert attach.path == f"/api/v0/instances/{iid}/ssh/" and attach.body == {"ssh_key": RSA4096_PUB}
    assert vast.instances[iid]["ssh_keys"] == [RSA4096_PUB]
    assert vast.writes().index(attach) > vast.writes().index(rent)


def test_an_attach_that_fails_tears_the_rental_down(vast, cli, spec_path, image_ref, tmp_path):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(86, price=0.40)]
    vast.inject("POST", "/ssh/$", 400)
    key = _keypair(tmp_path, RSA4096_PUB)
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--ssh-key", key,
                       "--destroy-on-fail", *FAST)
    assert code == 2 and "POST /instances/" in err and "(HTTP 400)" in err
    assert vast.instances == {} and len(vast.calls("DELETE")) == 1  # rented, then destroyed


def test_dry_run_shows_the_attach_call(vast, cli, spec_path, image_ref, tmp_path):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(87, price=0.40)]
    key = _keypair(tmp_path, RSA4096_PUB)
    code, out, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--ssh-key", key,
                         "--dry-run", "--json")
    assert code == 0, err
    planned = [r for r in json.loads(out)["requests"] if not r["sent"]]
    assert [(r["method"], r["url"].rsplit("/api/v0", 1)[1]) for r in planned] == [
        ("PUT", "/asks/87/"), ("POST", "/instances/<instance id>/ssh/")]
    assert planned[1]["body"] == {"ssh_key": RSA4096_PUB} and vast.instances == {}


def test_an_ed25519_key_goes_in_the_env_string(vast, cli, spec_path, image_ref, tmp_path):
    publish(cli, spec_path, image_ref)
    vast.offers = [offer(85, price=0.40)]
    pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOt8xzV4cr me@laptop"
    key = _keypair(tmp_path, pub)
    code, _, err = cli("launch", "--target", "vastai", "--image", spec_path, "--gpu", "L40S", "--ssh-key", key,
                       "--poll-interval", "0.05", "--timeout", "1")
    assert code == 4, err  # nothing answers SSH on the fake's port 40022: the report never comes
    (rent,) = vast.calls("PUT", "/asks/")
    assert isinstance(rent.body["env"], str) and f"='{pub}'" in rent.body["env"]
    (inst,) = vast.instances.values()  # the key reached the instance's env, merged with the template's
    assert pub in inst["env"].values() and inst["env"]["GPUBAKE_IMAGE"] == "gpuimg"

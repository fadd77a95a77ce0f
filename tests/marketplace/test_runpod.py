"""publish / launch / destroy against a local RunPod REST v2 server.

Contract followed: RunPod REST API v2, as RunPod's own OpenAPI document says it
(`tests/contracts/openapi/runpod-v2.json`, source and date in SOURCE.md). The server is
`FakeRunPod` (fake_runpod.py): it validates every request gpubake sends and every answer it
gives against that document, so the `runpod` fixture fails a test in which gpubake sent a
body RunPod would refuse (422) or the fake answered a shape RunPod does not.
"""

from __future__ import annotations

import json
import time

import pytest
from contracts.openapi_contract import contract

FAST = ["--poll-interval", "0.05", "--timeout", "10"]
AUTH = {"Authorization": "Bearer k"}


def _next_pod(runpod) -> str:
    """The pod id the fake hands out next (templates and pods share one counter)."""
    return f"pod{runpod._n + 1:04d}x"


def _published(runpod, cli, spec_path, image_ref):
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)[0] == 0


# ------------------------------------------------------------------ publish


def test_publish_creates_the_template_from_the_spec(runpod, cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
                         "--registry-auth", "clzregauth0001", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["action"] == "created" and result["name"] == "gpubake-gpuimg"
    (post,) = runpod.calls("POST", "/v2/templates$")
    body = post.body
    assert body["image"] == image_ref
    assert body["disk"] == 40 and "mounts" not in body  # volume_disk_gb = 0: no persistent mount
    assert body["ports"] == ["8000/http", "22/tcp"]
    assert body["env"] == {"GPUBAKE_MODEL_DIR": "/opt/gpubake/model", "GPUBAKE_IMAGE": "gpuimg"}
    assert body["args"] == ""  # v2 has no entrypoint field: the image's ENTRYPOINT (the start script) runs
    assert body["registry"] == "clzregauth0001"  # a reference, never a password
    assert body["serverless"] is False and body["category"] == "NVIDIA" and body["public"] is False
    assert body["startSsh"] is True and body["startJupyter"] is False  # no generated JUPYTER_PASSWORD
    assert body["allowedCudaVersions"] == ["12.8", "12.9", "13.0"]
    assert not {"imageName", "containerDiskInGb", "dockerEntrypoint", "isServerless", "readme"} & set(body)
    assert post.headers["Authorization"].startswith("Bearer ")
    assert runpod.templates[result["id"]]["image"] == image_ref


def test_publish_is_idempotent_by_name(runpod, cli, spec_path, image_ref):
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)[0] == 0
    code, out, _ = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0 and json.loads(out)["action"] == "unchanged"
    assert len(runpod.writes()) == 1  # the create only
    new_ref = image_ref.replace("ab" * 32, "cd" * 32)
    code, out, _ = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", new_ref, "--json")
    result = json.loads(out)
    assert code == 0 and result["action"] == "updated" and result["changed"] == ["image"]
    (patch,) = runpod.calls("PATCH")
    assert patch.path == f"/v2/templates/{result['id']}" and patch.body["image"] == new_ref
    assert patch.body["category"] == "NVIDIA"  # documented on v2's updateTemplate (v1's lacked it)
    assert len(runpod.templates) == 1 and next(iter(runpod.templates.values()))["image"] == new_ref


def test_publish_with_a_volume_sends_a_persistent_mount(runpod, cli, spec_path, image_ref):
    spec_path.write_text(spec_path.read_text().replace("volume_disk_gb = 0", "volume_disk_gb = 50"))
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)[0] == 0
    assert runpod.calls("POST", "/v2/templates$")[0].body["mounts"] == {"persistent": {"size": 50, "path": "/workspace"}}
    spec_path.write_text(spec_path.read_text().replace("volume_disk_gb = 50", "volume_disk_gb = 5"))
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)
    assert code == 2 and err.strip() == "error: runtime.volume_disk_gb: RunPod's persistent volume is at least 10 GB, got 5"


def test_publish_dry_run_prints_requests_and_writes_nothing(runpod, cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--dry-run", "--json")
    assert code == 0, err
    assert runpod.writes() == []
    result = json.loads(out)
    planned = [r for r in result["requests"] if not r["sent"]]
    assert [(r["method"], r["url"]) for r in planned] == [("POST", runpod.url + "/v2/templates")]
    assert planned[0]["body"]["image"] == image_ref
    assert planned[0]["headers"]["Authorization"] == "Bearer ***"
    assert "POST " + runpod.url + "/v2/templates" in err and '"image"' in err


def test_publish_dry_run_without_a_key_shows_v2_requests_the_document_accepts(cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--dry-run", "--json")
    assert code == 0, err
    (req,) = json.loads(out)["requests"]
    assert (req["method"], req["url"], req["sent"]) == ("POST", "https://api.runpod.io/v2/templates", False)
    assert contract("runpod-v2").check_request("POST", "/v2/templates", body=req["body"], headers=AUTH) == "createTemplate"


def test_publish_needs_a_digest_pinned_ref(runpod, cli, spec_path):
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", "ghcr.io/acme/gpuimg:latest")
    assert code == 2 and "--image-ref" in err and "digest" in err
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path)
    assert code == 2 and "--image-ref: required" in err
    assert runpod.requests == []


def test_bad_target_and_unknown_image_are_one_line_errors(runpod, cli, spec_path, image_ref):
    code, _, err = cli("publish", "--target", "lambda", "--image", spec_path, "--image-ref", image_ref)
    assert code == 2 and "--target" in err and "lambda" in err
    code, _, err = cli("publish", "--target", "runpod", "--image", "no-such-image", "--image-ref", image_ref)
    assert code == 2 and "unknown image 'no-such-image'" in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_api_key_is_a_401_error_naming_where_keys_come_from(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_WRONGKEY_000000")
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)
    assert code == 2
    assert "API key rejected (HTTP 401)" in err and "RUNPOD_API_KEY" in err
    assert "rpa_WRONGKEY_000000" not in err


def test_a_key_without_write_permission_is_one_line(runpod, cli, spec_path, image_ref, monkeypatch):
    runpod.read_only_key = "rpa_READONLY_4242424242"
    monkeypatch.setenv("RUNPOD_API_KEY", runpod.read_only_key)
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "lacks the permission for POST /templates (HTTP 403" in err and "read/write" in err
    assert runpod.read_only_key not in err and runpod.templates == {}


def test_a_template_name_held_by_another_account_is_one_line(runpod, cli, spec_path, image_ref):
    runpod.foreign_template_names.add("gpubake-gpuimg")  # not listed to us, refused on create
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--image: RunPod refused the template name 'gpubake-gpuimg'" in err and "another account" in err


def test_missing_api_key_is_an_error_before_any_request(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY")
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)
    assert code == 2 and "no API key" in err and "RUNPOD_API_KEY" in err
    assert runpod.requests == []


def test_api_key_from_the_config_file(runpod, cli, spec_path, image_ref, monkeypatch, tmp_path):
    monkeypatch.delenv("RUNPOD_API_KEY")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[runpod]\napi_key = "{runpod.api_key}"\nregistry_auth_id = "clzfromconfig"\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("GPUBAKE_CONFIG", str(cfg))
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0, err
    assert runpod.calls("POST")[0].body["registry"] == "clzfromconfig"


def test_rate_limit_waits_for_retry_after(runpod, cli, spec_path, image_ref):
    runpod.inject("GET", "/v2/templates$", 429, retry_after="1")
    started = time.monotonic()
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)
    assert code == 0, err
    assert time.monotonic() - started >= 0.95  # the backoff factor is 0.01 s here: only Retry-After waits
    assert len(runpod.calls("GET", "/v2/templates$")) == 2 and len(runpod.templates) == 1


# ------------------------------------------------------------------ launch


def test_launch_follows_the_phases_to_a_passing_self_test(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.pull_polls = 2
    # the container runs, the service is not listening yet, then in progress, then pass
    runpod.set_health(pod_id, None, make_report(None), make_report("pass", step_s=1.25))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "pass" and result["instance_id"] == pod_id and result["phase"] == "ready"
    assert [p["phase"] for p in result["phases"]] == ["scheduled", "pulling", "booting", "self-test", "ready"]
    assert all(p["seconds"] >= 0 for p in result["phases"]) and result["phases"][0]["start_s"] == 0
    assert result["throughput"]["seconds_per_step"] == 1.25
    assert result["urls"]["api"] == f"{runpod.url}/proxy/{pod_id}/8000"
    assert result["urls"]["ssh"] == "ssh://127.0.0.1:40022"  # the pod's ssh.direct
    assert result["destroyed"] is False and pod_id in runpod.pods
    (create,) = runpod.calls("POST", "/v2/pods$")
    assert create.body["gpu"] == {"id": "NVIDIA L40S", "count": 1, "minCudaVersion": "12.8"}  # a floor, not an exact set
    assert create.body["cloud"] == "SECURE" and create.body["templateId"] in runpod.templates
    assert create.body["name"] == result["label"] and create.body["name"].startswith("gpubake-gpuimg-")
    assert set(create.body) == {"name", "templateId", "cloud", "gpu", "env"}  # the template gives image, disk, ports
    assert runpod.pods[pod_id]["env"]["GPUBAKE_IMAGE"] == "gpuimg"  # RunPod merged the template's env
    # ready was read from /health with the service's key, which went to the pod and to the user only
    key = create.body["env"]["GPUBAKE_API_KEY"]
    health = runpod.calls("GET", f"/proxy/{pod_id}/8000/health")
    assert len(health) == 3 and all(h.headers["Authorization"] == f"Bearer {key}" for h in health)
    assert err.count(key) == 1 and key not in out and "shown once" in err
    assert "self-test PASS" in err and "pulling" in err


def test_launch_uses_the_users_service_key_and_never_prints_it(runpod, cli, spec_path, image_ref, make_report, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", "svc_USERKEY_0123456789abcdef")
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    assert runpod.calls("POST", "/v2/pods$")[0].body["env"]["GPUBAKE_API_KEY"] == "svc_USERKEY_0123456789abcdef"
    assert "svc_USERKEY_0123456789abcdef" not in out + err


def test_a_service_that_refuses_the_key_is_a_fail(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.service_key = "a-key-gpubake-did-not-send-0001"
    runpod.set_health(pod_id, make_report("pass"))
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json")
    result = json.loads(out)
    assert code == 3 and result["verdict"] == "fail" and "refused GPUBAKE_API_KEY (HTTP 401)" in result["reason"]
    assert runpod.pods == {}


def test_a_pull_that_never_ends_times_out_and_tears_down(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.pull_polls = None  # STARTING forever: billed while it pulls
    runpod.set_health(pod_id, make_report("pass"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail",
                         "--poll-interval", "0.05", "--start-timeout", "0.4", "--timeout", "30", "--json")
    assert code == 4
    result = json.loads(out)
    assert result["verdict"] == "timeout" and result["destroyed"] is True and pod_id not in runpod.pods
    assert result["phase"] == "pulling" and "never ran" in result["reason"] and "0.4 s" in result["reason"]
    assert runpod.calls("GET", "/proxy/") == []  # never taken for running
    assert [r.path for r in runpod.calls("DELETE")] == [f"/v2/pods/{pod_id}"]


def test_a_container_in_error_is_a_fail(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    runpod.error_after_pull = True
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json")
    result = json.loads(out)
    assert code == 3 and result["verdict"] == "fail" and result["reason"] == "instance error" and runpod.pods == {}
    assert result["phases"][-1]["phase"] == "failed"


def test_launch_whose_self_test_fails_destroys_itself(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report(None), make_report("fail"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "RTX 4090",
                         "--destroy-on-fail", *FAST, "--json")
    assert code == 3
    result = json.loads(out)
    assert result["verdict"] == "fail" and result["destroyed"] is True
    assert pod_id not in runpod.pods
    assert [r.path for r in runpod.calls("DELETE")] == [f"/v2/pods/{pod_id}"]


def test_failed_launch_without_destroy_leaves_the_pod_and_says_so(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("fail"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "RTX 4090", *FAST, "--json")
    assert code == 3 and json.loads(out)["destroyed"] is False
    assert pod_id in runpod.pods and runpod.calls("DELETE") == []
    assert f"gpubake destroy --target runpod {pod_id}" in " ".join(err.split())


def test_launch_times_out_and_tears_down(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report(None))  # stays in progress
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail",
                       "--poll-interval", "0.05", "--timeout", "0.5", "--json")
    assert code == 4
    result = json.loads(out)
    assert result["verdict"] == "timeout" and result["destroyed"] is True and pod_id not in runpod.pods
    assert result["phase"] == "self-test" and "no verdict within 0.5 s" in result["reason"]


def test_launch_refuses_a_gpu_the_image_cannot_run_before_renting(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "RTX 5090", *FAST)
    assert code == 2 and "sm_120" in err and "sm_89, sm_90" in err
    assert runpod.calls("POST", "/v2/pods") == []


@pytest.mark.parametrize(("args", "setup", "expected"), [
    (["--gpu", "Quantum QX-9"], None, "--gpu: RunPod has no GPU type 'Quantum QX-9' (its catalog lists e.g. "),
    (["--gpu", "L40S", "--max-price", "0.5"], None,
     "--max-price: RunPod lists NVIDIA L40S at $0.790/h on SECURE cloud, over $0.5/h; nothing was rented"),
    (["--gpu", "H200", "--cloud", "COMMUNITY"], None, "--cloud: RunPod offers NVIDIA H200 on SECURE cloud only, not COMMUNITY"),
    (["--gpu", "L40S"], "stock", "--gpu: RunPod has no NVIDIA L40S free on SECURE cloud with CUDA >= 12.8 right now"),
    (["--gpu", "L40S"], "vanished", "RunPod: POST /pods refused (HTTP 400): There are no longer any instances available"),
    (["--gpu", "L40S", "--cloud", "SPOT"], None, "--cloud: must be one of SECURE, COMMUNITY, got 'SPOT'"),
])
def test_bad_launch_input_is_one_line_and_rents_nothing(runpod, cli, spec_path, image_ref, args, setup, expected):
    _published(runpod, cli, spec_path, image_ref)
    if setup == "stock":
        runpod.stock["NVIDIA L40S"] = "NONE"
    if setup == "vanished":  # the catalog said HIGH; gone by the time of the create
        runpod.no_capacity.add("NVIDIA L40S")
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, *args, *FAST)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert runpod.pods == {}
    if setup != "vanished":
        assert runpod.calls("POST", "/v2/pods") == []
    assert runpod.calls("GET", "/v2/pods$") == []  # a 400 is no ambiguous create: nothing to look up


def test_launch_over_max_price_is_destroyed_at_once(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    runpod.cost_override = 2.49  # billed more than the catalog's list price (1.39)
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "H100", "--max-price", "1.5", *FAST)
    assert code == 2 and "--max-price" in err and "2.490" in err
    assert runpod.pods == {} and len(runpod.calls("DELETE")) == 1
    assert runpod.calls("POST", "/v2/pods")[0].body["gpu"]["id"] == "NVIDIA H100 80GB HBM3"


def test_launch_before_publish_says_to_publish(runpod, cli, spec_path):
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and "gpubake publish --target runpod --image gpuimg" in err


def test_launch_dry_run_rents_nothing(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--dry-run", "--json")
    assert code == 0, err
    assert runpod.calls("POST", "/v2/pods") == [] and runpod.pods == {}
    planned = [r for r in json.loads(out)["requests"] if not r["sent"]]
    assert planned[0]["method"] == "POST" and planned[0]["url"].endswith("/v2/pods")
    assert planned[0]["body"]["gpu"]["id"] == "NVIDIA L40S"
    assert planned[0]["body"]["env"]["GPUBAKE_API_KEY"] == "***"
    sent = [r["url"] for r in json.loads(out)["requests"] if r["sent"]]
    assert any("/v2/catalog/gpus?" in u for u in sent)  # the catalog check reads, even in a dry-run


# ------------------------------------------------------------------ no orphan after an ambiguous create


def test_a_5xx_after_the_pod_was_created_adopts_it(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    runpod.inject("POST", "/v2/pods$", 502, after=True)  # RunPod created it, the answer was lost
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["instance_id"] == pod_id and result["adopted"] is True and result["verdict"] == "pass"
    assert len(runpod.calls("POST", "/v2/pods$")) == 1  # never retried blindly
    assert list(runpod.pods) == [pod_id] and runpod.pods[pod_id]["name"] == result["label"]
    assert "adopting it" in err


def test_no_rented_pod_is_left_orphaned_by_a_5xx_after_success(runpod, cli, spec_path, image_ref, make_report):
    """The fault test of issue 16: 5xx after success, then a failing self-test: destroyed, none left."""
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("fail"))
    runpod.inject("POST", "/v2/pods$", 503, after=True)
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json")
    result = json.loads(out)
    assert code == 3 and result["adopted"] is True and result["destroyed"] is True
    assert runpod.pods == {} and [r.path for r in runpod.calls("DELETE")] == [f"/v2/pods/{pod_id}"]


def test_a_read_timeout_after_the_pod_was_created_adopts_it(runpod, cli, spec_path, image_ref, make_report, monkeypatch):
    monkeypatch.setenv("GPUBAKE_HTTP_TIMEOUT", "0.5")
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    runpod.inject("POST", "/v2/pods$", 201, after=True, delay=1.5)  # created; the answer comes too late
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    assert json.loads(out)["instance_id"] == pod_id and list(runpod.pods) == [pod_id]
    assert len(runpod.calls("POST", "/v2/pods$")) == 1


def test_a_5xx_before_the_create_proves_nothing_was_rented(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    runpod.inject("POST", "/v2/pods$", 502)  # failed before RunPod did anything
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "server error (HTTP 502) on POST /pods" in err and "nothing was rented" in err
    assert runpod.pods == {} and len(runpod.calls("POST", "/v2/pods$")) == 1
    assert len(runpod.calls("GET", "/v2/pods$")) == 3  # looked three times before believing there is none


def test_a_failed_lookup_after_an_ambiguous_create_says_a_pod_may_run(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    runpod.inject("POST", "/v2/pods$", 502, after=True)
    runpod.inject("GET", "/v2/pods$", 500, times=100)
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a pod may be running and billed" in err and "gpubake destroy --target runpod" in err


def test_a_create_rate_limited_is_retried_and_rents_once(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    runpod.inject("POST", "/v2/pods$", 429, times=2)  # refused before processing: safe to send again
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    assert len(runpod.calls("POST", "/v2/pods$")) == 3 and list(runpod.pods) == [pod_id]
    assert "adopted" not in json.loads(out)


# ------------------------------------------------------------------ destroy


def test_destroy(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    assert cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)[0] == 0
    code, out, _ = cli("destroy", "--target", "runpod", pod_id, "--json")
    assert code == 0 and json.loads(out) == {"target": "runpod", "instance_id": pod_id, "destroyed": True, "dry_run": False}
    assert runpod.pods == {}
    code, _, err = cli("destroy", "--target", "runpod", pod_id)
    assert code == 2 and "not found (HTTP 404)" in err and f"/pods/{pod_id}" in err


@pytest.mark.parametrize("status", [500, 502, 503])
def test_destroy_retries_server_errors(runpod, cli, status, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    assert cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)[0] == 0
    runpod.inject("DELETE", "/v2/pods/", status, times=2)
    code, _, err = cli("destroy", "--target", "runpod", pod_id)
    assert code == 0, err
    assert len(runpod.calls("DELETE")) == 3 and runpod.pods == {}


def test_a_service_that_failed_before_its_verdict_counts_as_fail(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    crashed = {"status": "failed", "ready": False, "verdict": None, "reason": "CUDA error: no kernel image", "selftest": None}
    runpod.set_health(pod_id, crashed)
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json")
    assert code == 3 and json.loads(out)["verdict"] == "fail" and runpod.pods == {}


def test_a_report_this_gpubake_cannot_read_is_a_fail_with_the_reason(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = _next_pod(runpod)
    newer = make_report("pass")
    newer["selftest"]["schema_version"] = 2  # an image written by a newer gpubake
    runpod.set_health(pod_id, newer)
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    result = json.loads(out)
    assert code == 3 and result["verdict"] == "fail" and result["destroyed"] is False
    assert result["reason"] == "self-test report: schema_version: 2 (this gpubake reads 1)"


# ------------------------------------------------------------------ the service's key from a RunPod secret

SECRET_VALUE = "svc_FROMSECRET_5e6f7a8b9c0d1e2f"


def test_publish_with_api_key_secret_puts_a_reference_in_the_template(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", SECRET_VALUE)  # the user's key: it must not travel with the template
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
                         "--api-key-secret", "gpubake_svc", "--json")
    assert code == 0, err
    (post,) = runpod.calls("POST", "/v2/templates$")
    assert post.body["env"]["GPUBAKE_API_KEY"] == "{{ RUNPOD_SECRET_gpubake_svc }}"  # RunPod's reference syntax
    assert post.body["env"]["GPUBAKE_IMAGE"] == "gpuimg"
    assert all(SECRET_VALUE not in json.dumps(r.body) for r in runpod.requests)
    # switching an existing template to the secret is an update of its env
    code, out, _ = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
                       "--api-key-secret", "other_name", "--json")
    assert code == 0 and json.loads(out)["changed"] == ["env"]


def test_launch_from_a_secret_template_sends_no_key_and_reads_health_with_the_users(runpod, cli, spec_path, image_ref,
                                                                                   make_report, monkeypatch):
    runpod.secrets["gpubake_svc"] = SECRET_VALUE  # created by the user in RunPod's console
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
               "--api-key-secret", "gpubake_svc")[0] == 0
    monkeypatch.setenv("GPUBAKE_API_KEY", SECRET_VALUE)
    pod_id = _next_pod(runpod)
    runpod.set_health(pod_id, make_report("pass"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "pass" and result["api_key_secret"] == "gpubake_svc"
    (create,) = runpod.calls("POST", "/v2/pods$")
    assert "GPUBAKE_API_KEY" not in create.body.get("env", {})  # the pod's env would override the template's reference
    assert runpod.pods[pod_id]["env"]["GPUBAKE_API_KEY"] == "{{ RUNPOD_SECRET_gpubake_svc }}"
    health = runpod.calls("GET", f"/proxy/{pod_id}/8000/health")
    assert health and all(h.headers["Authorization"] == f"Bearer {SECRET_VALUE}" for h in health)
    assert SECRET_VALUE not in out + err and "shown once" not in err


def test_launch_from_a_secret_template_without_the_users_key_rents_nothing(runpod, cli, spec_path, image_ref):
    runpod.secrets["gpubake_svc"] = SECRET_VALUE
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
               "--api-key-secret", "gpubake_svc")[0] == 0
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "takes the service's key from the RunPod secret 'gpubake_svc'; set GPUBAKE_API_KEY" in err
    assert runpod.calls("POST", "/v2/pods") == []


def test_a_pod_whose_secret_does_not_exist_fails(runpod, cli, spec_path, image_ref, make_report, monkeypatch):
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
               "--api-key-secret", "never_created")[0] == 0
    monkeypatch.setenv("GPUBAKE_API_KEY", SECRET_VALUE)
    runpod.set_health(_next_pod(runpod), make_report("pass"))
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail",
                       *FAST, "--json")
    assert code == 3 and json.loads(out)["reason"] == "instance error" and runpod.pods == {}


@pytest.mark.parametrize(("target", "name", "expected"), [
    ("runpod", "has space", "--api-key-secret: 'has space' is not a RunPod secret name"),
    ("runpod", "x" * 65, "is not a RunPod secret name (letters, digits, _ and -, at most 64)"),
    ("vastai", "gpubake_svc", "--api-key-secret: RunPod only: Vast.ai has no secret store; `launch` sends GPUBAKE_API_KEY"),
])
def test_bad_api_key_secret_is_one_line_before_any_request(runpod, vast, cli, spec_path, image_ref, target, name, expected):
    code, _, err = cli("publish", "--target", target, "--image", spec_path, "--image-ref", image_ref, "--api-key-secret", name)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err
    assert runpod.requests == [] and vast.requests == []

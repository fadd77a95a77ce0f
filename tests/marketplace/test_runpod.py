"""publish / launch / destroy against a local RunPod REST v1 server.

Contract followed: RunPod REST API v1, https://docs.runpod.io/api-reference
(templates: https://docs.runpod.io/api-reference/templates/POST/templates,
pods: https://docs.runpod.io/api-reference/pods/POST/pods). The server is `FakeRunPod`
in conftest.py.
"""

from __future__ import annotations

import json

import pytest

FAST = ["--poll-interval", "0.05", "--timeout", "10"]


def test_publish_creates_the_template_from_the_spec(runpod, cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref,
                         "--registry-auth", "clzregauth0001", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["action"] == "created" and result["name"] == "gpubake-gpuimg"
    (post,) = runpod.calls("POST", "/v1/templates$")
    body = post.body
    assert body["imageName"] == image_ref
    assert body["containerDiskInGb"] == 40 and body["volumeInGb"] == 0 and body["volumeMountPath"] == "/workspace"
    assert body["ports"] == ["8000/http", "22/tcp"]
    assert body["env"] == {"GPUBAKE_MODEL_DIR": "/opt/gpubake/model", "GPUBAKE_IMAGE": "gpuimg"}
    assert body["dockerEntrypoint"] == ["/opt/gpubake/start.sh"]
    assert body["containerRegistryAuthId"] == "clzregauth0001"  # a reference, never a password
    assert body["isServerless"] is False and body["category"] == "NVIDIA"
    assert post.headers["Authorization"].startswith("Bearer ")


def test_publish_is_idempotent_by_name(runpod, cli, spec_path, image_ref):
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)[0] == 0
    code, out, _ = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--json")
    assert code == 0 and json.loads(out)["action"] == "unchanged"
    assert len(runpod.writes()) == 1  # the create only
    new_ref = image_ref.replace("ab" * 32, "cd" * 32)
    code, out, _ = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", new_ref, "--json")
    result = json.loads(out)
    assert code == 0 and result["action"] == "updated" and result["changed"] == ["imageName"]
    (patch,) = runpod.calls("PATCH")
    assert patch.path == f"/v1/templates/{result['id']}" and patch.body["imageName"] == new_ref
    assert len(runpod.templates) == 1 and next(iter(runpod.templates.values()))["imageName"] == new_ref


def test_publish_dry_run_prints_requests_and_writes_nothing(runpod, cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--dry-run", "--json")
    assert code == 0, err
    assert runpod.writes() == []
    result = json.loads(out)
    planned = [r for r in result["requests"] if not r["sent"]]
    assert [(r["method"], r["url"]) for r in planned] == [("POST", runpod.url + "/v1/templates")]
    assert planned[0]["body"]["imageName"] == image_ref
    assert planned[0]["headers"]["Authorization"] == "Bearer ***"
    assert "POST " + runpod.url + "/v1/templates" in err and '"imageName"' in err


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
    assert runpod.calls("POST")[0].body["containerRegistryAuthId"] == "clzfromconfig"


# ------------------------------------------------------------------ launch


def _published(runpod, cli, spec_path, image_ref):
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)[0] == 0


def test_launch_waits_for_a_passing_self_test(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    # the pod id the fake will hand out next: serve "in progress" twice, then pass
    pod_id = f"pod{runpod._n + 1:04d}x"
    runpod.set_health(pod_id, make_report(None), make_report(None), make_report("pass", step_s=1.25))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "pass" and result["instance_id"] == pod_id
    assert result["throughput"]["seconds_per_step"] == 1.25
    assert result["urls"]["api"] == f"{runpod.url}/proxy/{pod_id}/8000"
    assert result["urls"]["ssh"] == "ssh://127.0.0.1:40022"
    assert result["destroyed"] is False and pod_id in runpod.pods
    (create,) = runpod.calls("POST", "/v1/pods$")
    assert create.body["gpuTypeIds"] == ["NVIDIA L40S"]
    assert create.body["cloudType"] == "SECURE" and create.body["gpuCount"] == 1
    assert create.body["templateId"] in runpod.templates
    assert create.body["allowedCudaVersions"][0] == "12.8"  # never a host older than the image's CUDA
    assert len(runpod.calls("GET", f"/proxy/{pod_id}/8000/health")) == 3
    assert "self-test PASS" in err


def test_launch_whose_self_test_fails_destroys_itself(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
    runpod.set_health(pod_id, make_report(None), make_report("fail"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "RTX 4090",
                         "--destroy-on-fail", *FAST, "--json")
    assert code == 3
    result = json.loads(out)
    assert result["verdict"] == "fail" and result["destroyed"] is True
    assert pod_id not in runpod.pods
    assert [r.path for r in runpod.calls("DELETE")] == [f"/v1/pods/{pod_id}"]


def test_failed_launch_without_destroy_leaves_the_pod_and_says_so(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
    runpod.set_health(pod_id, make_report("fail"))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "RTX 4090", *FAST, "--json")
    assert code == 3 and json.loads(out)["destroyed"] is False
    assert pod_id in runpod.pods and runpod.calls("DELETE") == []
    assert f"gpubake destroy --target runpod {pod_id}" in " ".join(err.split())


def test_launch_times_out_and_tears_down(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
    runpod.set_health(pod_id, make_report(None))  # stays in progress
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail",
                       "--poll-interval", "0.05", "--timeout", "0.3", "--json")
    assert code == 4
    result = json.loads(out)
    assert result["verdict"] == "timeout" and result["destroyed"] is True and pod_id not in runpod.pods


def test_launch_refuses_a_gpu_the_image_cannot_run_before_renting(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "RTX 5090", *FAST)
    assert code == 2 and "sm_120" in err and "sm_89, sm_90" in err
    assert runpod.calls("POST", "/v1/pods") == []


def test_launch_over_max_price_is_destroyed_at_once(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    runpod.cost_per_hr = "2.49"
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "H100", "--max-price", "1.5", *FAST)
    assert code == 2 and "--max-price" in err and "2.490" in err
    assert runpod.pods == {} and len(runpod.calls("DELETE")) == 1
    assert runpod.calls("POST", "/v1/pods")[0].body["gpuTypeIds"] == ["NVIDIA H100 80GB HBM3"]


def test_launch_before_publish_says_to_publish(runpod, cli, spec_path):
    code, _, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)
    assert code == 2 and "gpubake publish --target runpod --image gpuimg" in err


def test_launch_dry_run_rents_nothing(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--dry-run", "--json")
    assert code == 0, err
    assert runpod.calls("POST", "/v1/pods") == [] and runpod.pods == {}
    planned = [r for r in json.loads(out)["requests"] if not r["sent"]]
    assert planned[0]["method"] == "POST" and planned[0]["url"].endswith("/v1/pods")
    assert planned[0]["body"]["gpuTypeIds"] == ["NVIDIA L40S"]


# ------------------------------------------------------------------ destroy


def test_destroy(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
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
    pod_id = f"pod{runpod._n + 1:04d}x"
    runpod.set_health(pod_id, make_report("pass"))
    assert cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST)[0] == 0
    runpod.inject("DELETE", "/v1/pods/", status, times=2)
    code, _, err = cli("destroy", "--target", "runpod", pod_id)
    assert code == 0, err
    assert len(runpod.calls("DELETE")) == 3 and runpod.pods == {}


def test_a_service_that_failed_before_its_verdict_counts_as_fail(runpod, cli, spec_path, image_ref):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
    crashed = {"status": "failed", "ready": False, "verdict": None, "reason": "CUDA error: no kernel image", "selftest": None}
    runpod.set_health(pod_id, crashed)
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json")
    assert code == 3 and json.loads(out)["verdict"] == "fail" and runpod.pods == {}


def test_a_report_this_gpubake_cannot_read_is_a_fail_with_the_reason(runpod, cli, spec_path, image_ref, make_report):
    _published(runpod, cli, spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
    newer = make_report("pass")
    newer["selftest"]["schema_version"] = 2  # an image written by a newer gpubake
    runpod.set_health(pod_id, newer)
    code, out, _ = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", *FAST, "--json")
    result = json.loads(out)
    assert code == 3 and result["verdict"] == "fail" and result["destroyed"] is False
    assert result["reason"] == "self-test report: schema_version: 2 (this gpubake reads 1)"

"""`publish --serverless`: a RunPod serverless endpoint from the same spec (REST v2).

Contract: RunPod's OpenAPI document (tests/contracts/openapi/runpod-v2.json): createEndpoint
needs a *serverless* template (422 otherwise) and serverless GPU *pools* (`GET
/v2/catalog/gpus` -> `pool`), narrowed with `excludedTypes`; an endpoint keeps no link to
its template, so an image change is re-applied with `templateId` in updateEndpoint. The
server is `FakeRunPod` (fake_runpod.py), which validates every request and answer.
"""

from __future__ import annotations

import json

from contracts.openapi_contract import contract

AUTH = {"Authorization": "Bearer k"}


def _publish(cli, spec_path, image_ref, *extra):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--serverless",
                         *extra, "--json")
    assert code == 0, err
    return json.loads(out), err


def test_serverless_publish_creates_a_serverless_template_and_a_queue_endpoint(runpod, cli, spec_path, image_ref):
    result, err = _publish(cli, spec_path, image_ref, "--max-workers", "2")
    assert result["action"] == "created" and result["serverless"] is True and result["endpoint"] == "gpubake-gpuimg"
    assert result["template"]["action"] == "created" and result["template"]["name"] == "gpubake-gpuimg-serverless"
    (tpl_post,) = runpod.calls("POST", "/v2/templates$")
    assert tpl_post.body["serverless"] is True and tpl_post.body["ports"] == [] and tpl_post.body["startSsh"] is False
    (ep_post,) = runpod.calls("POST", "/v2/serverless$")
    body = ep_post.body
    assert body["templateId"] == result["template"]["id"] and body["type"] == "QUEUE"
    # every GPU of gpubake's table with the image's archs (sm_89, sm_90), as the catalog pools them
    assert body["gpu"] == {"pools": ["ADA_24", "ADA_48_PRO", "ADA_80_PRO", "HOPPER_141"], "count": 1, "minCudaVersion": "12.8"}
    assert body["workers"] == {"min": 0, "max": 2, "idleTimeout": 5}
    assert body["scaling"] == {"type": "QUEUE_DELAY", "queueDelay": 4} and body["flashboot"] == "FLASHBOOT"
    assert body["timeout"] == 600_000
    ep = runpod.endpoints[result["id"]]
    assert ep["image"] == image_ref and ep["env"]["GPUBAKE_IMAGE"] == "gpuimg"  # the container came from the template
    assert result["url"] == f"https://api.runpod.ai/v2/{result['id']}/run" and result["url"] in err


def test_serverless_gpus_narrow_the_pool_with_excluded_types(runpod, cli, spec_path, image_ref):
    _publish(cli, spec_path, image_ref, "--gpu", "L40S")
    gpu = runpod.calls("POST", "/v2/serverless$")[0].body["gpu"]
    assert gpu["pools"] == ["ADA_48_PRO"] and gpu["excludedTypes"] == ["NVIDIA L40"]  # L40 shares the pool


def test_serverless_publish_is_idempotent_and_rolls_out_a_new_image(runpod, cli, spec_path, image_ref):
    first, _ = _publish(cli, spec_path, image_ref)
    again, _ = _publish(cli, spec_path, image_ref)
    assert again["action"] == "unchanged" and again["template"]["action"] == "unchanged" and again["id"] == first["id"]
    assert len(runpod.writes()) == 2  # the two creates only
    new_ref = image_ref.replace("ab" * 32, "ef" * 32)
    updated, _ = _publish(cli, spec_path, new_ref, "--max-workers", "3")
    assert updated["template"]["action"] == "updated" and updated["template"]["changed"] == ["image"]
    assert updated["action"] == "updated" and set(updated["changed"]) == {"image", "workers"}
    (patch,) = runpod.calls("PATCH", "/v2/serverless/")
    # the template's image is applied again through templateId: an endpoint keeps no link to it
    assert patch.body["templateId"] == first["template"]["id"] and patch.body["workers"]["max"] == 3
    assert "name" not in patch.body and "type" not in patch.body
    assert runpod.endpoints[first["id"]]["image"] == new_ref and len(runpod.endpoints) == 1


def test_serverless_endpoint_gets_the_users_service_key_at_send_time_only(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", "svc_ENDPOINTKEY_00112233")
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--serverless",
                         "--dry-run", "--json")
    assert code == 0, err
    planned = {r["url"].rsplit("/", 1)[-1]: r["body"] for r in json.loads(out)["requests"] if not r["sent"]}
    assert planned["serverless"]["env"] == {"GPUBAKE_API_KEY": "***"} and "GPUBAKE_API_KEY" not in planned["templates"]["env"]
    assert "svc_ENDPOINTKEY_00112233" not in out + err
    _publish(cli, spec_path, image_ref)
    assert runpod.calls("POST", "/v2/serverless$")[0].body["env"] == {"GPUBAKE_API_KEY": "svc_ENDPOINTKEY_00112233"}


def test_serverless_dry_run_without_a_key_shows_v2_requests_the_document_accepts(cli, spec_path, image_ref):
    code, out, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--serverless",
                         "--dry-run", "--json")
    assert code == 0, err
    reqs = json.loads(out)["requests"]
    assert [(r["method"], r["url"]) for r in reqs] == [("POST", "https://api.runpod.io/v2/templates"),
                                                      ("POST", "https://api.runpod.io/v2/serverless")]
    c = contract("runpod-v2")
    assert c.check_request("POST", "/v2/templates", body=reqs[0]["body"], headers=AUTH) == "createTemplate"
    assert c.check_request("POST", "/v2/serverless", body=reqs[1]["body"], headers=AUTH) == "createEndpoint"
    assert "runpod serverless endpoint 'gpubake-gpuimg': would be created or updated" in err


def test_serverless_bad_input_is_one_line(runpod, cli, spec_path, image_ref):
    cases = [
        (("--target", "vastai", "--serverless"), "--serverless: RunPod only"),
        (("--target", "runpod", "--serverless", "--gpu", "RTX 5090"), "--gpu: RTX 5090 is sm_120"),
        (("--target", "runpod", "--serverless", "--gpu", "RTX A6000"), "--gpu: RTX A6000 is sm_86"),
        (("--target", "runpod", "--serverless", "--max-workers", "0"), "--max-workers: must be >= 1, got 0"),
        (("--target", "runpod", "--serverless", "--idle-timeout", "0"), "--idle-timeout: must be 1..3600 seconds"),
        (("--target", "runpod", "--gpu", "L40S"), "--gpu: only with --serverless"),
    ]
    for args, expected in cases:
        code, out, err = cli("publish", "--image", spec_path, "--image-ref", image_ref, *args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and expected in err, (args, err)
    assert runpod.writes() == []


def test_a_gpu_in_no_serverless_pool_is_refused(runpod, cli, spec_path, image_ref):
    for g in runpod.catalog:
        g["pool"] = None  # "Null if GPU is not in a serverless pool"
    code, _, err = cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref, "--serverless", "--gpu", "L40S")
    assert code == 2 and "--gpu: none of NVIDIA L40S is in a RunPod serverless pool" in err
    assert runpod.calls("POST", "/v2/serverless") == []


def test_serverless_with_api_key_secret_sends_the_reference_not_the_key(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", "svc_LOCALKEY_0a1b2c3d4e5f")
    runpod.secrets["gpubake_svc"] = "svc_LOCALKEY_0a1b2c3d4e5f"
    result, _ = _publish(cli, spec_path, image_ref, "--api-key-secret", "gpubake_svc")
    (tpl_post,) = runpod.calls("POST", "/v2/templates$")
    assert tpl_post.body["env"]["GPUBAKE_API_KEY"] == "{{ RUNPOD_SECRET_gpubake_svc }}"
    (ep_post,) = runpod.calls("POST", "/v2/serverless$")
    assert "env" not in ep_post.body  # without the secret, publish sends the key itself here
    assert runpod.endpoints[result["id"]]["env"]["GPUBAKE_API_KEY"] == "{{ RUNPOD_SECRET_gpubake_svc }}"
    assert all("svc_LOCALKEY" not in json.dumps(r.body) for r in runpod.requests)

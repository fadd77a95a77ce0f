"""The vendored OpenAPI documents load, and gpubake's calls are checked against them.

For every call gpubake makes (RunPod REST v2: templates, pods, serverless endpoints;
Vast.ai: offers, instances, templates) a correct request and a correct answer validate, and
a request with an unknown field, a wrong type or a missing key is refused, as the real API
refuses it (or, for Vast.ai, ignores it: see openapi_contract's docstring).
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

import pytest
from contracts.openapi_contract import DOCS, HERE, Contract, ContractError, contract, vast_input_limits
from openapi_core import OpenAPI

AUTH = {"Authorization": "Bearer test-key"}
DIGEST_REF = "ghcr.io/acme/wan22-nvfp4@sha256:" + "ab" * 32
# An RSA-4096 public key is ~725 characters: over Vast.ai's 256-character env value limit.
RSA4096_PUB = "ssh-rsa " + "A" * 716 + " user@host"


# ------------------------------------------------------------------ the files themselves


def _source_rows() -> list[dict[str, str]]:
    rows = []
    for line in (HERE / "SOURCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].endswith((".json", ".yaml")):
            rows.append({"file": cells[0], "sha256": cells[4], "bytes": cells[5]})
    return rows


def test_every_vendored_file_is_as_recorded_in_source_md() -> None:
    rows = _source_rows()
    assert {r["file"] for r in rows} == {p.name for p in HERE.iterdir() if p.suffix in (".json", ".yaml")}
    for row in rows:
        data = (HERE / row["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["file"]
        assert len(data) == int(row["bytes"]), row["file"]
        assert len(data) < 2 * 1024 * 1024, row["file"]


@pytest.mark.parametrize("name", ["runpod-v2", "vastai"])
def test_current_documents_pass_openapi_spec_validation(name: str) -> None:
    from openapi_spec_validator import validate

    c = contract(name)
    assert c.vendor.check_spec and c.published["openapi"].startswith("3.1")
    validate(c.published)  # as published
    validate(c.doc)  # and with the helper's corrections and closed bodies


def test_runpod_v1_is_loaded_unchecked_because_its_operation_ids_repeat() -> None:
    from openapi_core.exceptions import OpenAPIError
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    with pytest.raises((OpenAPIError, OpenAPIValidationError), match="UpdatePod"):
        OpenAPI.from_dict(contract("runpod-v1").published)
    assert contract("runpod-v1").operation_id("PATCH", "/templates/t1") == "UpdateTemplate"


def test_unknown_document_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="runpod-v2"):
        contract("runpod-v3")


# ------------------------------------------------------------------ RunPod REST v2 samples


def rp_template(**over: Any) -> dict[str, Any]:
    body = {
        "id": "tpl123", "name": "gpubake-wan22", "image": DIGEST_REF, "args": "", "disk": 40,
        "mounts": {"persistent": {"size": 100, "path": "/workspace"}}, "ports": ["8000/http", "22/tcp"],
        "env": {"GPUBAKE_SELFTEST": "full"}, "registry": "cred123", "serverless": False, "public": False,
        "category": "NVIDIA", "startSsh": True, "startJupyter": False, "allowedCudaVersions": ["12.8", "12.9"],
    }
    return {**body, **over}


def rp_pod(status: str = "RUNNING", **over: Any) -> dict[str, Any]:
    running = status == "RUNNING"
    body = {
        "id": "pod123", "name": "gpubake-wan22-1764576000", "status": status,
        "actions": ["stop", "restart", "terminate"] if running else ["stop", "terminate"],
        "image": DIGEST_REF, "args": "", "disk": 40, "mounts": {"persistent": {"size": 100, "path": "/workspace"}},
        "ports": ["8000/http", "22/tcp"], "env": {"SSH_PUBLIC_KEY": "ssh-ed25519 AAAA user@host"}, "registry": None,
        "gpu": {"id": "NVIDIA H100 80GB HBM3", "count": 1}, "cloud": "SECURE", "dataCenterId": "US-KS-2",
        "cudaVersion": "12.8",
        "ssh": {"proxy": {"host": "ssh.runpod.io", "port": 22, "username": "pod123-64411eb2", "command": "ssh pod123-64411eb2@ssh.runpod.io"},
                "direct": {"host": "195.26.233.3", "port": 34446, "username": "root", "command": "ssh root@195.26.233.3 -p 34446"}
                if running else None},
        "template": None, "cost": 2.99, "locked": False, "globalNetworking": {"enabled": False},
        "runtime": {"uptime": 60, "ports": [{"private": 22, "public": 34446, "type": "tcp", "ip": "195.26.233.3"},
                                            {"private": 8000, "public": None, "type": "http", "ip": None}]} if running else None,
        "createdAt": "2026-12-01T10:00:00Z", "startedAt": "2026-12-01T10:02:00Z" if running else None,
    }
    return {**body, **over}


def rp_endpoint(**over: Any) -> dict[str, Any]:
    body = {
        "id": "ep123", "name": "gpubake-wan22", "type": "QUEUE", "image": DIGEST_REF, "args": "", "disk": 40,
        "ports": [], "env": {}, "registry": None,
        "gpu": {"pools": ["HOPPER_141"], "count": 1, "allowedCudaVersions": [], "minCudaVersion": "12.8"},
        "workers": {"min": 0, "max": 2, "idleTimeout": 5}, "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
        "dataCenterIds": [], "networkVolumes": [], "timeout": 600000, "flashboot": "FLASHBOOT",
        "createdAt": "2026-12-01T10:00:00Z",
    }
    return {**body, **over}


RP_CREATE_TEMPLATE = {
    "name": "gpubake-wan22", "image": DIGEST_REF, "category": "NVIDIA", "disk": 40,
    "mounts": {"persistent": {"size": 100, "path": "/workspace"}}, "ports": ["8000/http", "22/tcp"],
    "env": {"GPUBAKE_SELFTEST": "full"}, "args": "", "registry": "cred123", "public": False, "serverless": False,
    "startSsh": True, "startJupyter": False, "allowedCudaVersions": ["12.8", "12.9"],
}
RP_UPDATE_TEMPLATE = {k: v for k, v in RP_CREATE_TEMPLATE.items() if k not in ("serverless",)}
RP_CREATE_POD = {
    "name": "gpubake-wan22-1764576000", "templateId": "tpl123", "cloud": "SECURE",
    "gpu": {"id": "NVIDIA H100 80GB HBM3", "count": 1, "allowedCudaVersions": ["12.8", "12.9"]},
    "disk": 40, "mounts": {"persistent": {"size": 100, "path": "/workspace"}}, "ports": ["8000/http", "22/tcp"],
    "env": {"SSH_PUBLIC_KEY": "ssh-ed25519 AAAA user@host"}, "startSsh": True,
}
RP_CREATE_ENDPOINT = {
    "name": "gpubake-wan22", "templateId": "tpl123", "type": "QUEUE",
    "gpu": {"pools": ["HOPPER_141"], "count": 1, "minCudaVersion": "12.8"},
    "workers": {"min": 0, "max": 2, "idleTimeout": 5}, "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
    "flashboot": "FLASHBOOT", "timeout": 600000,
}
RP_UPDATE_ENDPOINT = {"templateId": "tpl124", "workers": {"min": 0, "max": 3, "idleTimeout": 10}, "flashboot": "OFF"}

# (gpubake call, method, path, query, body, operationId)
RP_REQUESTS = [
    ("list templates", "GET", "/v2/templates", None, None, "listTemplates"),
    ("create template", "POST", "/v2/templates", None, RP_CREATE_TEMPLATE, "createTemplate"),
    ("update template", "PATCH", "/v2/templates/tpl123", None, RP_UPDATE_TEMPLATE, "updateTemplate"),
    ("create pod", "POST", "/v2/pods", None, RP_CREATE_POD, "createPod"),
    ("get pod", "GET", "/v2/pods/pod123", None, None, "getPod"),
    ("list pods (find by name)", "GET", "/v2/pods", {"includeClusterPods": "false"}, None, "listPods"),
    ("stop pod", "POST", "/v2/pods/pod123/action", None, {"action": "stop"}, "podAction"),
    ("terminate pod", "DELETE", "/v2/pods/pod123", None, None, "deletePod"),
    ("create endpoint", "POST", "/v2/serverless", None, RP_CREATE_ENDPOINT, "createEndpoint"),
    ("update endpoint", "PATCH", "/v2/serverless/ep123", None, RP_UPDATE_ENDPOINT, "updateEndpoint"),
    ("list endpoints", "GET", "/v2/serverless", None, None, "listEndpoints"),
]
RP_WRITES = [r for r in RP_REQUESTS if r[4] is not None]


@pytest.mark.parametrize(("call", "method", "path", "query", "body", "op_id"), RP_REQUESTS, ids=[r[0] for r in RP_REQUESTS])
def test_runpod_v2_request_of_each_gpubake_call_validates(call: str, method: str, path: str, query: Any, body: Any,
                                                          op_id: str) -> None:
    assert contract("runpod-v2").check_request(method, path, query=query, body=body, headers=AUTH) == op_id


RP_RESPONSES = [
    ("GET", "/v2/templates", 200, {"templates": [rp_template()]}),
    ("POST", "/v2/templates", 201, rp_template()),
    ("PATCH", "/v2/templates/tpl123", 200, rp_template(name="gpubake-wan22")),
    ("POST", "/v2/pods", 201, rp_pod("PROVISIONING")),
    ("GET", "/v2/pods/pod123", 200, rp_pod("STARTING")),
    ("GET", "/v2/pods/pod123", 200, rp_pod("RUNNING")),
    ("GET", "/v2/pods", 200, {"pods": [rp_pod("RUNNING"), rp_pod("EXITED", cost=0.0)]}),
    ("POST", "/v2/pods/pod123/action", 200, rp_pod("EXITED", cost=0.0, actions=["start", "terminate"])),
    ("DELETE", "/v2/pods/pod123", 204, None),
    ("POST", "/v2/serverless", 201, rp_endpoint()),
    ("PATCH", "/v2/serverless/ep123", 200, rp_endpoint(flashboot="OFF")),
    ("GET", "/v2/serverless", 200, {"endpoints": [rp_endpoint()]}),
]


@pytest.mark.parametrize(("method", "path", "status", "body"), RP_RESPONSES, ids=[f"{m} {p} {s}" for m, p, s, _ in RP_RESPONSES])
def test_runpod_v2_documented_answers_validate(method: str, path: str, status: int, body: Any) -> None:
    contract("runpod-v2").check_response(method, path, status, body)


def test_runpod_v2_errors_are_problem_json() -> None:
    c = contract("runpod-v2")
    problem = {"title": "Unprocessable Entity", "status": 422, "detail": "validation failed",
               "errors": ["$: additional properties 'bogus' not allowed"]}
    c.check_response("POST", "/v2/pods", 422, problem, content_type="application/problem+json")
    # v1's {"message": ...} is not what v2 answers
    assert c.response_errors("GET", "/v2/pods/x", 404, {"message": "Pod not found"}, content_type="application/problem+json")
    assert c.response_errors("GET", "/v2/pods/x", 404, {"title": "Not Found", "status": 404, "detail": "x"})  # wrong media type


@pytest.mark.parametrize(("call", "method", "path", "query", "body", "op_id"), RP_WRITES, ids=[r[0] for r in RP_WRITES])
def test_runpod_v2_refuses_an_unknown_field_in_every_body(call: str, method: str, path: str, query: Any, body: Any,
                                                          op_id: str) -> None:
    errors = contract("runpod-v2").request_errors(method, path, body={**body, "bogus": 1}, headers=AUTH)
    assert any("'bogus'" in e for e in errors), errors


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("POST", "/v2/templates", {**RP_CREATE_TEMPLATE, "disk": "40"}, "disk: '40' is not of type 'integer'"),
    ("POST", "/v2/templates", {**RP_CREATE_TEMPLATE, "category": "GPU"}, "category: 'GPU' is not one of"),
    ("POST", "/v2/pods", {**RP_CREATE_POD, "gpu": {"id": "NVIDIA H100 80GB HBM3", "count": "1"}}, "gpu/count: '1' is not of type"),
    ("POST", "/v2/pods", {**RP_CREATE_POD, "gpu": {"id": "H100", "allowedCudaVersions": ["12"]}}, "does not match"),
    ("POST", "/v2/pods", {**RP_CREATE_POD, "mounts": {"persistent": {"size": 5, "path": "/workspace"}}}, "5 is less than the minimum of 10"),
    ("POST", "/v2/pods/pod123/action", {"action": "reset"}, "'reset' is not one of"),
    ("POST", "/v2/serverless", {**RP_CREATE_ENDPOINT, "workers": {"min": -1, "max": 2}}, "-1 is less than the minimum of 0"),
    ("POST", "/v2/serverless", {**RP_CREATE_ENDPOINT, "flashboot": True}, "True is not one of"),
    ("POST", "/v2/serverless", {k: v for k, v in RP_CREATE_ENDPOINT.items() if k != "scaling"}, "'scaling' is a required property"),
])
def test_runpod_v2_refuses_wrong_types_and_values(method: str, path: str, body: Any, expected: str) -> None:
    errors = contract("runpod-v2").request_errors(method, path, body=body, headers=AUTH)
    assert any(expected in e for e in errors), errors


def test_runpod_v2_refuses_the_v1_shaped_bodies_gpubake_sends_today() -> None:
    c = contract("runpod-v2")
    v1_template = {"name": "gpubake-wan22", "imageName": DIGEST_REF, "category": "NVIDIA", "containerDiskInGb": 40,
                   "volumeInGb": 100, "volumeMountPath": "/workspace", "ports": ["8000/http"], "env": {},
                   "dockerEntrypoint": ["/start.sh"], "dockerStartCmd": [], "isPublic": False, "isServerless": False,
                   "readme": "# x"}
    errors = " ".join(c.request_errors("POST", "/v2/templates", body=v1_template, headers=AUTH))
    for field in ("imageName", "containerDiskInGb", "volumeInGb", "volumeMountPath", "dockerEntrypoint", "isPublic", "readme"):
        assert f"'{field}'" in errors
    v1_pod = {"name": "p", "templateId": "t", "imageName": DIGEST_REF, "computeType": "GPU", "gpuTypeIds": ["NVIDIA H100"],
              "gpuCount": 1, "cloudType": "SECURE", "supportPublicIp": True, "interruptible": False}
    errors = " ".join(c.request_errors("POST", "/v2/pods", body=v1_pod, headers=AUTH))
    for field in ("computeType", "gpuTypeIds", "gpuCount", "cloudType", "supportPublicIp", "interruptible"):
        assert f"'{field}'" in errors
    assert c.request_errors("POST", "/v1/pods", body={}, headers=AUTH) == ["no such path in the document"]
    assert c.request_errors("PATCH", "/v2/templates", body={}, headers=AUTH) == ["no PATCH on /v2/templates in the document"]


def test_runpod_v2_refuses_missing_key_unknown_query_and_missing_body() -> None:
    c = contract("runpod-v2")
    assert any("Security" in e for e in c.request_errors("GET", "/v2/templates"))
    assert c.request_errors("GET", "/v2/pods", query={"name": "gpubake-x"}, headers=AUTH) == [
        "query 'name': not a parameter of this operation"]
    assert c.request_errors("PATCH", "/v2/templates/tpl123", headers=AUTH) == ["Missing required request body"]


@pytest.mark.parametrize(("body", "expected"), [
    (rp_pod("PULLING"), "status: 'PULLING' is not one of"),
    ({k: v for k, v in rp_pod().items() if k != "runtime"}, "'runtime' is a required property"),
    (rp_pod(cost="2.99"), "cost: '2.99' is not of type 'number'"),
    ([rp_pod()], "is not of type 'object'"),
])
def test_runpod_v2_refuses_a_wrong_pod_answer(body: Any, expected: str) -> None:
    errors = contract("runpod-v2").response_errors("GET", "/v2/pods/pod123", 200, body)
    assert any(expected in e for e in errors), errors


def test_runpod_v2_list_answers_are_wrapped() -> None:
    c = contract("runpod-v2")
    assert c.response_errors("GET", "/v2/templates", 200, [rp_template()])  # v1's bare list
    assert c.response_errors("GET", "/v2/templates", 200, {"templates": [{"id": "t", "name": "n"}]})  # partial template


def test_check_raises_one_line_naming_document_method_and_path() -> None:
    with pytest.raises(ContractError) as info:
        contract("runpod-v2").check_request("POST", "/v2/templates", body={"name": "x", "image": "y", "readme": "r"}, headers=AUTH)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("runpod-v2: POST /v2/templates: ") and "'readme' was unexpected" in message
    with pytest.raises(ContractError, match=r"^runpod-v2: GET /v2/pods/p -> 200: "):
        contract("runpod-v2").check_response("GET", "/v2/pods/p", 200, {"id": "p"})


def test_runpod_v1_update_schema_lacks_category_and_is_serverless() -> None:
    v1, v2 = contract("runpod-v1"), contract("runpod-v2")
    assert {"category", "isServerless"} <= v1.body_fields("POST", "/templates")
    assert not {"category", "isServerless"} & v1.body_fields("PATCH", "/templates/t1")
    assert {"category", "serverless", "public", "image", "disk", "registry", "mounts"} <= v2.body_fields("PATCH", "/v2/templates/t1")
    assert not {"readme", "dockerEntrypoint", "volumeMountPath"} & v2.body_fields("POST", "/v2/templates")


def test_runpod_v1_pod_status_is_only_the_desired_one() -> None:
    v1 = contract("runpod-v1").doc["components"]["schemas"]["Pod"]["properties"]
    v2 = contract("runpod-v2").doc["components"]["schemas"]["PodStatus"]
    assert v1["desiredStatus"]["enum"] == ["RUNNING", "EXITED", "TERMINATED"]
    assert v2["enum"] == ["PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED"]


# ------------------------------------------------------------------ Vast.ai samples

VAST_OFFER_QUERY = {
    "gpu_name": {"eq": "H100 SXM"}, "num_gpus": {"eq": 1}, "rentable": {"eq": True}, "rented": {"eq": False},
    "verified": {"eq": True}, "reliability": {"gte": 0.98}, "disk_space": {"gte": 140},
    "direct_port_count": {"gte": 2}, "order": [["dph_total", "asc"]], "type": "on-demand", "limit": 50,
    "cuda_max_good": {"gte": 12.8}, "driver_version": {"gte": 570124006}, "compute_cap": {"in": [900]},
    "dph_total": {"lte": 3.5}, "allocated_storage": 140,
}
VAST_CREATE = {
    "template_hash_id": "4e17788f74f075dd9aab7d0d4427968f", "label": "gpubake-wan22-1764576000", "disk": 140,
    "runtype": "args", "target_state": "running", "cancel_unavail": True,
    "env": "-e SSH_PUBLIC_KEY='ssh-ed25519 AAAAC3Nza user@host' -p 8000:8000",
}
VAST_TEMPLATE = {
    "name": "gpubake-wan22", "image": DIGEST_REF, "env": "-p 8000:8000 -p 22:22 -e GPUBAKE_SELFTEST=full",
    "onstart": "", "runtype": "args", "args_str": "", "use_ssh": False, "ssh_direct": False, "jup_direct": False,
    "recommended_disk_space": 140, "desc": "Wan 2.2 NVFP4", "readme": "# x",
    "extra_filters": {"cuda_max_good": {"gte": 12.8}, "compute_cap": {"in": [900]}}, "private": True,
    "docker_login_repo": "ghcr.io", "docker_login_user": "acme", "docker_login_pass": "secret",
}
VAST_INSTANCE = {
    "id": 4242, "actual_status": "running", "intended_status": "running", "cur_state": "running",
    "next_state": "running", "label": "gpubake-wan22-1764576000", "template_hash_id": "4e17788f",
    "image_uuid": DIGEST_REF, "image_runtype": "args", "status_msg": "success, running", "public_ipaddr": "203.0.113.7",
    "ports": {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}], "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]},
    "dph_total": 2.41, "disk_space": 140.0, "gpu_name": "H100 SXM", "num_gpus": 1,
}

VAST_REQUESTS = [
    ("account id", "GET", "/api/v0/users/current/", None, None, "showUser"),
    ("search offers", "POST", "/api/v0/bundles/", None, VAST_OFFER_QUERY, "searchOffers"),
    ("create instance", "PUT", "/api/v0/asks/12345678/", None, VAST_CREATE, "createInstance"),
    ("show instance", "GET", "/api/v0/instances/4242/", None, None, "showInstance"),
    ("destroy instance", "DELETE", "/api/v0/instances/4242/", None, None, "destroyInstance"),
    ("find instance by label", "GET", "/api/v1/instances/",
     {"select_filters": {"label": {"eq": "gpubake-wan22-1764576000"}}, "limit": "25"}, None, "showInstances"),
    ("search templates", "GET", "/api/v0/template/",
     {"select_filters": {"name": {"eq": "gpubake-wan22"}, "creator_id": {"eq": 1}}, "select_cols": ["*"]}, None,
     "searchTemplates"),
    ("create template", "POST", "/api/v0/template/", None, VAST_TEMPLATE, "createTemplate"),
    ("update template", "PUT", "/api/v0/template/", None, {"hash_id": "4e17788f", **VAST_TEMPLATE}, "editTemplate"),
]
VAST_WRITES = [r for r in VAST_REQUESTS if r[4] is not None]


@pytest.mark.parametrize(("call", "method", "path", "query", "body", "op_id"), VAST_REQUESTS, ids=[r[0] for r in VAST_REQUESTS])
def test_vast_request_of_each_gpubake_call_validates(call: str, method: str, path: str, query: Any, body: Any,
                                                     op_id: str) -> None:
    assert contract("vastai").check_request(method, path, query=query, body=body, headers=AUTH) == op_id


def test_vast_paths_match_with_and_without_the_trailing_slash() -> None:
    c = contract("vastai")
    assert c.check_request("PUT", "/api/v0/asks/1/", body=VAST_CREATE, headers=AUTH) == "createInstance"
    assert c.check_request("PUT", "/api/v0/asks/1", body=VAST_CREATE, headers=AUTH) == "createInstance"
    assert c.request_errors("PUT", "/api/v0/asks/not-a-number/", body=VAST_CREATE, headers=AUTH)


VAST_RESPONSES = [
    ("GET", "/api/v0/users/current/", 200, {"id": 1, "email": "a@b.c", "balance": 10.5}),
    ("POST", "/api/v0/bundles/", 200, {"offers": [{"id": 12345678, "gpu_name": "H100 SXM", "dph_total": 2.41}]}),
    ("PUT", "/api/v0/asks/12345678/", 200, {"success": True, "new_contract": 4242}),
    ("PUT", "/api/v0/asks/12345678/", 410, {"success": False, "error": "no_such_ask",
                                            "msg": "error 410/3907: no_such_ask Instance type 12345678 is no longer available.",
                                            "ask_id": 12345678}),
    ("GET", "/api/v0/instances/4242/", 200, {"instances": VAST_INSTANCE}),
    ("DELETE", "/api/v0/instances/4242/", 200, {"success": True, "msg": "Instance destroyed successfully"}),
    ("GET", "/api/v1/instances/", 200, {"success": True, "instances_found": 1, "total_instances": 1, "next_token": None,
                                        "instances": [{"id": 4242, "label": "gpubake-wan22-1764576000", "actual_status": "loading"}]}),
    ("GET", "/api/v0/template/", 200, {"success": True, "templates_found": 1,
                                       "templates": [{"id": 77, "name": "gpubake-wan22", "image": DIGEST_REF, "hash_id": "4e17788f"}]}),
    ("POST", "/api/v0/template/", 200, {"success": True, "msg": "Template Created Successfully! New Template ID: 77",
                                        "template": {"name": "gpubake-wan22", "id": 77, "hash_id": "4e17788f"}}),
    ("PUT", "/api/v0/template/", 200, {"success": True, "template": {"id": 77, "hash_id": "5915f1dc"}}),
]


@pytest.mark.parametrize(("method", "path", "status", "body"), VAST_RESPONSES, ids=[f"{m} {p} {s}" for m, p, s, _ in VAST_RESPONSES])
def test_vast_documented_answers_validate(method: str, path: str, status: int, body: Any) -> None:
    contract("vastai").check_response(method, path, status, body)


@pytest.mark.parametrize(("call", "method", "path", "query", "body", "op_id"), VAST_WRITES, ids=[r[0] for r in VAST_WRITES])
def test_vast_refuses_an_unknown_field_in_every_body(call: str, method: str, path: str, query: Any, body: Any,
                                                     op_id: str) -> None:
    errors = contract("vastai").request_errors(method, path, body={**body, "volume_mount": "/workspace"}, headers=AUTH)
    assert any("'volume_mount' was unexpected" in e for e in errors), errors


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("PUT", "/api/v0/asks/1/", {**VAST_CREATE, "disk": "140"}, "disk: '140' is not of type 'number'"),
    ("PUT", "/api/v0/asks/1/", {**VAST_CREATE, "runtype": "docker"}, "'docker' is not one of"),
    ("PUT", "/api/v0/asks/1/", {**VAST_CREATE, "env": {"SSH_PUBLIC_KEY": "ssh-ed25519 A"}}, "is not of type 'string'"),
    ("PUT", "/api/v0/asks/1/", {k: v for k, v in VAST_CREATE.items() if k != "template_hash_id"}, "is not valid under any of the given schemas"),
    ("PUT", "/api/v0/asks/1/", {**VAST_CREATE, "env": f"-e SSH_PUBLIC_KEY='{RSA4096_PUB}'"}, f"env SSH_PUBLIC_KEY: value of {len(RSA4096_PUB)} characters > 256"),
    ("PUT", "/api/v0/asks/1/", {**VAST_CREATE, "disk": 4}, "disk: 4 GB < 8.0"),
    ("PUT", "/api/v0/asks/1/", {**VAST_CREATE, "label": "x" * 300}, "label: 300 characters > 256"),
    ("POST", "/api/v0/bundles/", {**VAST_OFFER_QUERY, "type": "interruptible"}, "'interruptible' is not one of"),
    ("POST", "/api/v0/bundles/", {**VAST_OFFER_QUERY, "limit": "50"}, "limit: '50' is not of type 'integer'"),
    ("POST", "/api/v0/bundles/", {**VAST_OFFER_QUERY, "order": [["dph_total"]]}, "order/0: ['dph_total'] is too short"),
    ("POST", "/api/v0/template/", {**VAST_TEMPLATE, "recommended_disk_space": "140"}, "is not of type 'number'"),
    ("POST", "/api/v0/template/", {**VAST_TEMPLATE, "extra_filters": "cuda_max_good>=12.8"}, "is not of type 'object'"),
    ("POST", "/api/v0/template/", {k: v for k, v in VAST_TEMPLATE.items() if k != "image"}, "'image' is a required property"),
    ("PUT", "/api/v0/template/", VAST_TEMPLATE, "'hash_id' is a required property"),
])
def test_vast_refuses_wrong_types_values_and_limits(method: str, path: str, body: Any, expected: str) -> None:
    errors = contract("vastai").request_errors(method, path, body=body, headers=AUTH)
    assert any(expected in e for e in errors), errors


def test_vast_refuses_missing_key_and_unknown_query() -> None:
    c = contract("vastai")
    assert any("Security" in e for e in c.request_errors("GET", "/api/v0/instances/4242/"))
    assert c.request_errors("GET", "/api/v0/template/", query={"select_filters": {}, "q": "x"}, headers=AUTH) == [
        "query 'q': not a parameter of this operation"]


def test_vast_refuses_a_wrong_instance_answer() -> None:
    c = contract("vastai")
    bad = copy.deepcopy(VAST_INSTANCE)
    bad["ports"] = {"8000/tcp": "41234"}
    assert c.response_errors("GET", "/api/v0/instances/4242/", 200, {"instances": bad})
    assert c.response_errors("GET", "/api/v0/instances/4242/", 200, {"instances": {**VAST_INSTANCE, "dph_total": "2.41"}})
    assert c.response_errors("PUT", "/api/v0/asks/1/", 200, {"success": True, "new_contract": "4242"})
    assert c.response_errors("POST", "/api/v0/bundles/", 200, {"offers": {"id": 1}})  # one offer is still a list


# ------------------------------------------------------------------ the corrections are needed


def test_each_vast_correction_fixes_what_the_published_document_says() -> None:
    published = contract("vastai").published
    bundles = published["paths"]["/api/v0/bundles"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "on-demand" not in bundles["properties"]["type"]["enum"]
    assert bundles["properties"]["order"]["minItems"] == 2 and "minItems" not in bundles["properties"]["order"]["items"]
    asks = published["paths"]["/api/v0/asks/{id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert asks["required"] == ["image"]
    edit = published["paths"]["/api/v0/template"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert edit["additionalProperties"] is True and "env" not in edit["properties"]
    assert published["components"]["schemas"]["Instance"]["properties"]["ports"]["type"] == "array"
    assert [c.where for c in DOCS["vastai"].corrections] == [
        "POST /api/v0/bundles", "POST /api/v0/bundles", "PUT /api/v0/asks/{id}", "PUT /api/v0/template", "schema Instance"]
    assert all(re.search(r"\.(py|yaml):\d+", c.why) for c in DOCS["vastai"].corrections)


def test_vast_bodies_gpubake_sends_are_closed_by_the_helper_and_runpod_by_the_document() -> None:
    assert {"POST /api/v0/bundles", "PUT /api/v0/asks/{id}", "POST /api/v0/template", "PUT /api/v0/template"} <= set(
        contract("vastai").closed)
    assert contract("runpod-v2").closed == []
    schemas = contract("runpod-v2").doc["components"]["schemas"]
    for name in ("CreateTemplateRequest", "UpdateTemplateRequest", "CreatePodRequest", "UpdatePodRequest",
                 "CreateEndpointRequest", "UpdateEndpointRequest"):
        assert schemas[name]["unevaluatedProperties"] is False, name
    assert schemas["PodActionRequest"]["additionalProperties"] is False


def test_vast_input_limits_come_from_the_vendored_source_file() -> None:
    limits = vast_input_limits()
    assert limits["env"]["max_length"] == 256 and limits["disk"]["min"] == 8.0 and limits["label"]["max_length"] == 256
    assert len(RSA4096_PUB) > limits["env"]["max_length"]


def test_contract_objects_are_cached_and_isolated_from_the_published_copy() -> None:
    c = contract("vastai")
    assert contract("vastai") is c and isinstance(c, Contract)
    assert c.published is not c.doc and c.published != c.doc

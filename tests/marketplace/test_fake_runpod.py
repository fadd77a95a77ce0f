"""The RunPod fake refuses what RunPod's document refuses and plays the documented lifecycle.

The contract tests are only as good as their fake: here the fake itself is driven with raw
HTTP (no gpubake code), so a fake that accepted any key or answered RUNNING at once would
fail these tests. Document: tests/contracts/openapi/runpod-v2.json.
"""

from __future__ import annotations

import requests


def _h(runpod, key=None):
    return {"Authorization": f"Bearer {key or runpod.api_key}"}


def _template(runpod, **over):
    body = {"name": "t1", "image": "ghcr.io/acme/x@sha256:" + "0" * 64, "ports": ["8000/http", "22/tcp"],
            "env": {"A": "1"}, **over}
    resp = requests.post(runpod.url + "/v2/templates", json=body, headers=_h(runpod), timeout=5)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_unknown_fields_are_a_422_problem_with_the_reasons(runpod):
    resp = requests.post(runpod.url + "/v2/templates", json={"name": "t", "imageName": "x", "readme": "# r"},
                         headers=_h(runpod), timeout=5)
    assert resp.status_code == 422 and resp.headers["Content-Type"] == "application/problem+json"
    problem = resp.json()
    assert problem["title"] == "Unprocessable Entity" and problem["status"] == 422
    assert any("'image' is a required property" in e for e in problem["errors"])
    assert any("'readme'" in e and "'imageName'" in e for e in problem["errors"])
    assert runpod.templates == {}
    runpod.refused.clear()  # on purpose here


def test_a_wrong_or_missing_key_is_a_401_and_a_read_only_key_a_403_on_writes(runpod):
    assert requests.get(runpod.url + "/v2/templates", timeout=5).status_code == 401
    assert requests.get(runpod.url + "/v2/templates", headers=_h(runpod, "nope"), timeout=5).status_code == 401
    runpod.read_only_key = "ro-key-0001"
    assert requests.get(runpod.url + "/v2/templates", headers=_h(runpod, "ro-key-0001"), timeout=5).json() == {"templates": []}
    resp = requests.post(runpod.url + "/v2/templates", json={"name": "t", "image": "i"}, headers=_h(runpod, "ro-key-0001"), timeout=5)
    assert resp.status_code == 403 and resp.json()["status"] == 403


def test_a_pod_provisions_then_pulls_then_runs(runpod):
    tpl = _template(runpod)
    runpod.pull_polls = 2
    resp = requests.post(runpod.url + "/v2/pods", json={"name": "p1", "templateId": tpl["id"], "gpu": {"id": "NVIDIA L40S"},
                                                        "env": {"B": "2"}}, headers=_h(runpod), timeout=5)
    assert resp.status_code == 201 and resp.json()["status"] == "PROVISIONING"
    pid = resp.json()["id"]
    seen = [requests.get(f"{runpod.url}/v2/pods/{pid}", headers=_h(runpod), timeout=5).json() for _ in range(5)]
    assert [p["status"] for p in seen] == ["PROVISIONING", "STARTING", "STARTING", "RUNNING", "RUNNING"]
    assert all(p["runtime"] is None and p["ssh"]["direct"] is None for p in seen[:3])
    assert seen[3]["ssh"]["direct"]["port"] == runpod.ssh_port and seen[3]["runtime"]["ports"]
    assert seen[3]["env"] == {"A": "1", "B": "2"}  # the template's env merged per key
    assert seen[3]["cost"] == 0.79 and seen[3]["template"] is None


def test_pods_are_listed_without_a_name_filter_and_the_filter_is_refused(runpod):
    tpl = _template(runpod)
    for name in ("a", "b"):
        requests.post(runpod.url + "/v2/pods", json={"name": name, "templateId": tpl["id"], "gpu": {"id": "NVIDIA L40S"}},
                      headers=_h(runpod), timeout=5)
    assert [p["name"] for p in requests.get(runpod.url + "/v2/pods", headers=_h(runpod), timeout=5).json()["pods"]] == ["a", "b"]
    resp = requests.get(runpod.url + "/v2/pods", params={"name": "a"}, headers=_h(runpod), timeout=5)
    assert resp.status_code == 422 and "query 'name'" in resp.json()["errors"][0]
    runpod.refused.clear()


def test_capacity_and_cuda_constraints_are_400s(runpod):
    tpl = _template(runpod, allowedCudaVersions=["12.4"])  # an exact set no host reports (hosts are on 12.9)
    create = {"name": "p", "templateId": tpl["id"], "gpu": {"id": "NVIDIA L40S"}}
    assert requests.post(runpod.url + "/v2/pods", json=create, headers=_h(runpod), timeout=5).status_code == 400
    floor = {**create, "gpu": {"id": "NVIDIA L40S", "minCudaVersion": "12.8"}}  # replaces the template's set
    assert requests.post(runpod.url + "/v2/pods", json=floor, headers=_h(runpod), timeout=5).status_code == 201
    runpod.no_capacity.add("NVIDIA L40S")
    assert requests.post(runpod.url + "/v2/pods", json=floor, headers=_h(runpod), timeout=5).status_code == 400


def test_a_5xx_after_success_still_creates(runpod):
    tpl = _template(runpod)
    runpod.inject("POST", "/v2/pods$", 502, after=True)
    resp = requests.post(runpod.url + "/v2/pods", json={"name": "p", "templateId": tpl["id"], "gpu": {"id": "NVIDIA L40S"}},
                         headers=_h(runpod), timeout=5)
    assert resp.status_code == 502 and resp.json()["detail"] == "injected 502"
    assert [p["name"] for p in runpod.pods.values()] == ["p"]


def test_429_carries_retry_after(runpod):
    runpod.inject("GET", "/v2/templates", 429, retry_after="12")
    resp = requests.get(runpod.url + "/v2/templates", headers=_h(runpod), timeout=5)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "12"


def test_an_answer_off_the_document_is_recorded_as_a_fake_bug(runpod):
    runpod.route = lambda *a: (200, [])  # v1's bare list, not {"templates": [...]}
    requests.get(runpod.url + "/v2/templates", headers=_h(runpod), timeout=5)
    assert len(runpod.violations) == 1 and "GET /v2/templates -> 200" in runpod.violations[0]
    runpod.violations.clear()


def test_the_service_behind_the_proxy_wants_the_pods_key_for_the_report(runpod, make_report):
    tpl = _template(runpod)
    runpod.provision_polls = runpod.pull_polls = 0
    pid = requests.post(runpod.url + "/v2/pods", json={"name": "p", "templateId": tpl["id"], "gpu": {"id": "NVIDIA L40S"},
                                                       "env": {"GPUBAKE_API_KEY": "svc-key-0001"}},
                        headers=_h(runpod), timeout=5).json()["id"]
    runpod.set_health(pid, make_report("pass"))
    url = f"{runpod.url}/proxy/{pid}/8000/health"
    assert requests.get(url, timeout=5).status_code == 502  # not running yet: the proxy has nothing to reach
    assert requests.get(f"{runpod.url}/v2/pods/{pid}", headers=_h(runpod), timeout=5).json()["status"] == "RUNNING"
    assert set(requests.get(url, timeout=5).json()) == {"status", "ready", "verdict"}  # liveness and verdict only
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    full = requests.get(url, headers={"Authorization": "Bearer svc-key-0001"}, timeout=5).json()
    assert full["selftest"]["verdict"] == "pass"

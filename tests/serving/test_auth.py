"""The API key over a real socket: /v1/* and the API description need it, /health gives
strangers liveness and the verdict only."""

from __future__ import annotations

import pytest
import requests

from gpubake.provisioning.serving.auth import authorized

NONE = {"headers": {}}
API_KEY = "k3y-for-tests-" + "x" * 24  # tests/serving/conftest.py API_KEY


def _bearer(key: str) -> dict[str, dict[str, str]]:
    return {"headers": {"Authorization": f"Bearer {key}"}}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {API_KEY}"},
     {"Authorization": API_KEY}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": f"Bearer {API_KEY[:-1]}"}],
)
@pytest.mark.parametrize("method,path", [("GET", "/v1/info"), ("POST", "/v1/generate"), ("GET", "/v1/jobs/abc"),
                                         ("GET", "/v1/jobs/abc/video"), ("GET", "/docs"), ("GET", "/openapi.json")])
def test_without_the_key_401(secured, headers, method, path):
    r = requests.request(method, secured.url + path, headers=headers, json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's "
                                 "$GPUBAKE_API_KEY)"}


def test_401_comes_before_the_body_is_looked_at(secured):
    r = requests.post(secured.url + "/v1/generate", data="{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == 401  # not a 422 that would describe the API to a stranger


def test_with_the_key_the_api_answers(secured):
    assert secured.key == API_KEY
    assert secured.get("/v1/info").json()["model_id"] == "tiny-wan2.2"
    job = secured.post("/v1/generate", json={"prompt": "a key", "steps": 1, "frames": 1, "size": "32x32"})
    assert job.status_code == 202, job.text
    assert secured.wait_job(job.json()["id"])["status"] == "done"
    spec = secured.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "$GPUBAKE_API_KEY"}
    assert "/v1/generate" in spec["paths"] and "/docs" not in spec["paths"]
    docs = secured.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    # the scheme is case-insensitive (RFC 7235)
    assert secured.get("/v1/info", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200


def test_health_without_the_key_is_liveness_and_verdict_only(secured):
    r = secured.get("/health", **NONE)
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "ready": True, "verdict": "pass"}
    wrong = secured.get("/health", **_bearer("wrong-key-0123456789")).json()
    assert set(wrong) == {"status", "ready", "verdict"}
    full = secured.get("/health").json()
    assert full["selftest"]["verdict"] == "pass" and full["model_id"] == "tiny-wan2.2"
    assert full["selftest"]["options"]["model_dir"]  # paths and the report: key holders only


def test_open_service_has_no_security_scheme(ready):
    spec = ready.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert ready.get("/health").json()["selftest"]["verdict"] == "pass"


def test_authorized_compares_whole_tokens():
    assert authorized(None, None) and authorized("anything", None)
    assert authorized(f"Bearer {API_KEY}", API_KEY) and authorized(f"  Bearer   {API_KEY} ", API_KEY)
    for header in (None, "", "Bearer", "Bearer ", f"Token {API_KEY}", f"Bearer {API_KEY} extra", API_KEY):
        assert not authorized(header, API_KEY), header

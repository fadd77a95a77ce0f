"""The retrying client (`marketplace.http.ApiClient`) against a local server.

Error shapes follow the RunPod REST v1 docs (https://docs.runpod.io/api-reference: 401
for a bad bearer key, 404 for an unknown id, 429 when rate limited, 5xx) and Vast.ai's
(https://docs.vast.ai/api-reference: `{"success": false, "msg": ...}` bodies).
"""

from __future__ import annotations


import pytest
from testutil import free_port

from gpubake.images.marketplace.http import ApiClient, AuthError, MarketplaceError, NotFoundError


def client_for(server, **kw) -> ApiClient:
    return ApiClient(api="RunPod", base_url=server.url + "/v1", api_key=server.api_key, key_hint="set RUNPOD_API_KEY",
                     backoff=0.01, **kw)


def test_429_is_retried_then_succeeds(runpod):
    runpod.inject("GET", "/v1/templates", 429, times=2)
    assert client_for(runpod).request("GET", "/templates") == []
    assert len(runpod.calls("GET", "/v1/templates")) == 3


def test_a_create_is_retried_on_429_but_not_on_5xx(runpod):
    body = {"name": "t", "imageName": "x@sha256:" + "0" * 64}
    runpod.inject("POST", "/v1/templates", 429)
    assert client_for(runpod).request("POST", "/templates", json_body=body)["name"] == "t"
    assert len(runpod.calls("POST")) == 2
    runpod.inject("POST", "/v1/templates", 502)
    with pytest.raises(MarketplaceError, match=r"server error \(HTTP 502\) on POST /templates"):
        client_for(runpod).request("POST", "/templates", json_body={**body, "name": "u"})
    assert len(runpod.calls("POST")) == 3  # one try: a 5xx after a create may mean it was created


def test_persistent_5xx_gives_up_after_the_retries(runpod):
    runpod.inject("GET", "/v1/templates", 503, times=100)
    with pytest.raises(MarketplaceError, match=r"HTTP 503"):
        client_for(runpod, retries=3).request("GET", "/templates")
    assert len(runpod.calls("GET")) == 4


def test_401_and_404_are_typed_one_line_errors(runpod):
    bad = ApiClient(api="RunPod", base_url=runpod.url + "/v1", api_key="rpa_BADKEY_123456", key_hint="set RUNPOD_API_KEY")
    with pytest.raises(AuthError) as exc:
        bad.request("GET", "/templates")
    assert "HTTP 401" in str(exc.value) and "rpa_BADKEY_123456" not in str(exc.value)
    with pytest.raises(NotFoundError, match=r"GET /pods/nope"):
        client_for(runpod).request("GET", "/pods/nope")
    assert len(runpod.calls("GET", "/v1/pods/nope")) == 1  # 404 is not retried


def test_4xx_message_comes_from_the_body(runpod):
    client = client_for(runpod)
    client.request("POST", "/templates", json_body={"name": "dup", "imageName": "i"})
    with pytest.raises(MarketplaceError, match=r"refused \(HTTP 400\): Template name must be unique"):
        client.request("POST", "/templates", json_body={"name": "dup", "imageName": "i"})


def test_read_timeout(runpod):
    runpod.inject("GET", "/v1/templates", 200, delay=1.0)
    with pytest.raises(MarketplaceError, match=r"timed out"):
        client_for(runpod, timeout=(1.0, 0.2)).request("GET", "/templates")


def test_unreachable_api_is_one_line():
    port = free_port()  # nothing listens there
    client = ApiClient(api="Vast.ai", base_url=f"http://127.0.0.1:{port}/api/v0", api_key="k" * 20, key_hint="", retries=1, backoff=0.01)
    with pytest.raises(MarketplaceError) as exc:
        client.request("GET", "/users/current/")
    assert "cannot reach" in str(exc.value) and "\n" not in str(exc.value)


def test_dry_run_records_writes_with_secrets_masked_and_sends_none(runpod):
    client = client_for(runpod, dry_run=True, extra_secrets=["s3cr3t-registry-pw"])
    assert client.request("POST", "/templates", json_body={"name": "t", "env": {"A": "uses s3cr3t-registry-pw"},
                                                           "api_key": "inline", "nested": [{"password": "pw123"}]}) is None
    assert runpod.requests == []
    (planned,) = client.planned
    assert planned.headers["Authorization"] == "Bearer ***"
    assert planned.body == {"name": "t", "env": {"A": "uses ***"}, "api_key": "***", "nested": [{"password": "***"}]}
    assert runpod.api_key not in planned.render()

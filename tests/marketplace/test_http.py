"""The retrying client (`marketplace.http.ApiClient`) against a local server.

Error shapes follow RunPod REST v2's OpenAPI document (tests/contracts/openapi/runpod-v2.json:
RFC 9457 problem+json; 401 for a bad bearer key, 404 for an unknown id, 422 with `errors`
for a body off the contract, 429 with Retry-After, 5xx) and Vast.ai's
(https://docs.vast.ai/api-reference: `{"success": false, "msg": ...}` bodies).
"""

from __future__ import annotations


import pytest
from testutil import free_port

from gpubake.images.marketplace.http import AmbiguousError, ApiClient, AuthError, MarketplaceError, NotFoundError


def client_for(server, **kw) -> ApiClient:
    return ApiClient(api="RunPod", base_url=server.url + "/v2", api_key=server.api_key, key_hint="set RUNPOD_API_KEY",
                     backoff=0.01, **kw)


def test_429_is_retried_then_succeeds(runpod):
    runpod.inject("GET", "/v2/templates", 429, times=2)
    assert client_for(runpod).request("GET", "/templates") == {"templates": []}
    assert len(runpod.calls("GET", "/v2/templates")) == 3


def test_a_create_is_retried_on_429_but_not_on_5xx(runpod):
    body = {"name": "t", "image": "x@sha256:" + "0" * 64}
    runpod.inject("POST", "/v2/templates", 429)
    assert client_for(runpod).request("POST", "/templates", json_body=body)["name"] == "t"
    assert len(runpod.calls("POST")) == 2
    runpod.inject("POST", "/v2/templates", 502)
    with pytest.raises(AmbiguousError, match=r"server error \(HTTP 502\) on POST /templates: .*it may have been done"):
        client_for(runpod).request("POST", "/templates", json_body={**body, "name": "u"})
    assert len(runpod.calls("POST")) == 3  # one try: a 5xx after a create may mean it was created


def test_a_create_sent_with_another_method_is_not_retried_on_5xx(runpod):
    runpod.inject("PATCH", "/v2/templates/", 502)
    with pytest.raises(AmbiguousError, match=r"HTTP 502"):
        client_for(runpod).request("PATCH", "/templates/tpl1", json_body={"name": "n"}, create=True)
    assert len(runpod.calls("PATCH")) == 1
    runpod.inject("PATCH", "/v2/templates/", 429)
    with pytest.raises(NotFoundError):  # retried after the 429, then the real answer: no such template
        client_for(runpod).request("PATCH", "/templates/tpl1", json_body={"name": "n"}, create=True)
    assert len(runpod.calls("PATCH")) == 3
    runpod.inject("PATCH", "/v2/templates/", 502)  # an ordinary update is idempotent: retried
    with pytest.raises(NotFoundError):
        client_for(runpod).request("PATCH", "/templates/tpl1", json_body={"name": "n"})
    assert len(runpod.calls("PATCH")) == 5


def test_a_read_timeout_on_a_write_is_ambiguous_and_on_a_read_is_not(runpod):
    runpod.inject("POST", "/v2/templates", 201, after=True, delay=1.0)
    with pytest.raises(AmbiguousError, match=r"POST /templates: timed out after 0.2 s; it may have been done"):
        client_for(runpod, timeout=(1.0, 0.2)).request("POST", "/templates", json_body={"name": "t", "image": "i"})
    assert len(runpod.calls("POST")) == 1 and len(runpod.templates) == 1  # it was done
    runpod.inject("GET", "/v2/templates", 200, delay=1.0)
    with pytest.raises(MarketplaceError) as exc:
        client_for(runpod, timeout=(1.0, 0.2)).request("GET", "/templates")
    assert not isinstance(exc.value, AmbiguousError)


def test_a_body_off_the_contract_is_a_422_naming_the_field(runpod):
    with pytest.raises(MarketplaceError, match=r"refused \(HTTP 422\): Request validation failed\. \[.*'readme' was unexpected"):
        client_for(runpod).request("POST", "/templates", json_body={"name": "t", "image": "i", "readme": "# x"})
    assert runpod.templates == {} and len(runpod.refused) == 1
    runpod.refused.clear()  # refused on purpose: the fixture checks gpubake itself sends none


def test_persistent_5xx_gives_up_after_the_retries(runpod):
    runpod.inject("GET", "/v2/templates", 503, times=100)
    with pytest.raises(MarketplaceError, match=r"HTTP 503"):
        client_for(runpod, retries=3).request("GET", "/templates")
    assert len(runpod.calls("GET")) == 4


def test_401_and_404_are_typed_one_line_errors(runpod):
    bad = ApiClient(api="RunPod", base_url=runpod.url + "/v2", api_key="rpa_BADKEY_123456", key_hint="set RUNPOD_API_KEY")
    with pytest.raises(AuthError) as exc:
        bad.request("GET", "/templates")
    assert "HTTP 401" in str(exc.value) and "rpa_BADKEY_123456" not in str(exc.value)
    with pytest.raises(NotFoundError, match=r"GET /pods/nope"):
        client_for(runpod).request("GET", "/pods/nope")
    assert len(runpod.calls("GET", "/v2/pods/nope")) == 1  # 404 is not retried


def test_4xx_message_comes_from_the_body(runpod):
    client = client_for(runpod)
    client.request("POST", "/templates", json_body={"name": "dup", "image": "i"})
    with pytest.raises(MarketplaceError, match=r"refused \(HTTP 400\): Template name 'dup' is already in use"):
        client.request("POST", "/templates", json_body={"name": "dup", "image": "i"})


def test_read_timeout(runpod):
    runpod.inject("GET", "/v2/templates", 200, delay=1.0)
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

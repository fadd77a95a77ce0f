"""The client's rules for requests that create something (`ApiClient.request(create=True)`).

Against the Vast.ai stand-in (fake_vastai.py), whose create call is a PUT: a create is
resent only after a 429 (the server did not process it), never after a 5xx or a timeout,
and such an ending is marked `uncertain` so the caller looks the result up. Vast.ai's errors
carry a code in `error` and the reason in `msg`; the message shows the reason.
"""

from __future__ import annotations

import pytest
from marketplace.fake_vastai import VAST_KEY
from testutil import free_port

from gpubake.images.marketplace.http import ApiClient, MarketplaceError

BODY = {"template_hash_id": "h" * 32, "label": "gpubake-t-1-aa", "disk": 40, "runtype": "args"}


def client_for(server, **kw) -> ApiClient:
    return ApiClient(api="Vast.ai", base_url=server.url + "/api/v0", api_key=VAST_KEY, key_hint="set VAST_API_KEY",
                     backoff=0.01, **kw)


def test_a_create_put_is_not_resent_after_a_5xx_and_is_marked_uncertain(vast):
    vast.inject("PUT", "/asks/1/", 503)
    with pytest.raises(MarketplaceError, match=r"server error \(HTTP 503\) on PUT /asks/1/") as exc:
        client_for(vast).request("PUT", "/asks/1/", json_body=BODY, create=True)
    assert exc.value.uncertain and exc.value.status == 503
    assert len(vast.calls("PUT")) == 1


def test_a_create_put_is_resent_after_a_429(vast):
    vast.templates[1] = {"id": 1, "name": "t", "image": "i", "hash_id": "h" * 32, "creator_id": vast.user_id}
    vast.offers = [{"id": 1, "gpu_name": "L40S", "dph_total": 0.4, "disk_space": 100}]
    vast.inject("PUT", "/asks/1/", 429, times=2)
    data = client_for(vast).request("PUT", "/asks/1/", json_body=BODY, create=True)
    assert data["success"] is True and len(vast.calls("PUT")) == 3 and len(vast.instances) == 1


def test_an_edit_put_is_resent_after_a_5xx(vast):
    """`PUT /template/` edits by hash: sending it twice does the same thing once."""
    vast.inject("PUT", "/template/", 502)
    with pytest.raises(MarketplaceError, match=r"not found \(HTTP 404\): PUT /template/"):
        client_for(vast).request("PUT", "/template/", json_body={"hash_id": "nope"})
    assert len(vast.calls("PUT", "/template/")) == 2  # retried once, then the real answer


def test_the_reason_in_msg_wins_over_the_code_in_error(vast):
    with pytest.raises(MarketplaceError) as exc:
        client_for(vast).request("PUT", "/asks/77/", json_body=BODY, create=True)
    assert "no_such_ask Instance type by id 77 is not available" in str(exc.value)
    assert exc.value.status == 404 and not exc.value.uncertain  # a definite refusal: nothing was rented


def test_a_read_timeout_on_a_create_is_uncertain_but_not_on_a_read(vast):
    vast.inject("PUT", "/asks/1/", 500, delay=1.0)
    with pytest.raises(MarketplaceError, match="timed out") as exc:
        client_for(vast, timeout=(2.0, 0.2)).request("PUT", "/asks/1/", json_body=BODY, create=True)
    assert exc.value.uncertain
    vast.inject("GET", "/users/current/", 200, delay=1.0)
    with pytest.raises(MarketplaceError, match="timed out") as exc:
        client_for(vast, timeout=(2.0, 0.2)).request("GET", "/users/current/")
    assert not exc.value.uncertain


def test_a_refused_connection_is_certain():
    port = free_port()  # nothing listens: the request never left
    c = ApiClient(api="Vast.ai", base_url=f"http://127.0.0.1:{port}/api/v0", api_key="k" * 20, key_hint="", retries=0)
    with pytest.raises(MarketplaceError, match="cannot reach") as exc:
        c.request("PUT", "/asks/1/", json_body=BODY, create=True)
    assert not exc.value.uncertain

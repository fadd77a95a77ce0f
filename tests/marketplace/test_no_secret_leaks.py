"""No API key or registry password in any output, log line, dry-run or error message.

Drives publish / launch / destroy through success, dry-run and failure paths against the
local RunPod and Vast.ai servers (contracts: RunPod REST v2's OpenAPI document and
https://docs.vast.ai/api-reference), with every logger at DEBUG (urllib3 included), then
greps everything that was printed or logged for the secrets.
"""

from __future__ import annotations

import logging

FAST = ["--poll-interval", "0.05", "--timeout", "5"]
PASSWORD = "ghp_REGISTRYSECRET_55aa66bb"
SERVICE_KEY = "svc_SERVICESECRET_77cc88dd99ee"


def test_no_secret_anywhere(runpod, vast, cli, spec_path, image_ref, make_report, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # root: urllib3's retry and connection logs too
    monkeypatch.setenv("GPUBAKE_REGISTRY_USER", "acme-bot")
    monkeypatch.setenv("GPUBAKE_REGISTRY_PASSWORD", PASSWORD)
    monkeypatch.setenv("GPUBAKE_API_KEY", SERVICE_KEY)  # the instance service's key, from the user
    secrets = [runpod.api_key, vast.api_key, PASSWORD, SERVICE_KEY]
    seen: list[str] = []

    def run(*args: str) -> int:
        code, out, err = cli(*args)
        seen.extend([out, err])
        return code

    for target in ("runpod", "vastai"):
        auth = "clzregauth0001" if target == "runpod" else "ghcr.io"
        pub = ["publish", "--target", target, "--image", str(spec_path), "--image-ref", image_ref, "--registry-auth", auth]
        assert run(*pub, "--dry-run", "--json") == 0
        assert run(*pub, "--json") == 0
        assert run(*pub, "--json") == 0  # unchanged (RunPod) / re-sent login (Vast.ai)
    # rate limits and server errors on the way (retried; urllib3 logs each retry)
    runpod.inject("GET", "/v2/templates", 429, times=2)
    runpod.set_health(f"pod{runpod._n + 1:04d}x", make_report("fail"))
    assert run("launch", "--target", "runpod", "--image", str(spec_path), "--gpu", "L40S", "--destroy-on-fail", *FAST, "--json") == 3
    vast.offers = [{"id": 1, "gpu_name": "L40S", "num_gpus": 1, "dph_total": 0.4, "driver_version": "575.57.08",
                    "cuda_max_good": 12.9, "reliability2": 0.99, "compute_cap": 890, "disk_space": 100}]
    vast.inject("POST", "/bundles/", 503)
    vast.set_health(str(vast._n + 1), make_report("pass"))
    assert run("launch", "--target", "vastai", "--image", str(spec_path), "--gpu", "L40S", *FAST, "--json") == 0
    assert run("launch", "--target", "vastai", "--image", str(spec_path), "--gpu", "L40S", "--dry-run", "--json") == 0
    assert run("destroy", "--target", "vastai", "999999") == 2  # 404
    assert run("destroy", "--target", "runpod", "nope", "--dry-run", "--json") == 0
    # wrong keys: the rejected key must not be echoed either
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_WRONG_but_still_secret_42")
    secrets.append("rpa_WRONG_but_still_secret_42")
    assert run("destroy", "--target", "runpod", "pod0001x") == 2

    logged = [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any("Retry" in line or "retry" in line.lower() for line in logged)  # we did log the retries
    haystack = "\n".join(seen + logged)
    for secret in secrets:
        assert secret not in haystack, f"secret leaked: {secret[:6]}..."
    assert "***" in haystack  # the dry-runs showed where the secrets go
    # and the servers did receive them where they belong
    assert any(r.headers.get("Authorization") == f"Bearer {vast.api_key}" for r in vast.requests)
    assert any((r.body or {}).get("docker_login_pass") == PASSWORD for r in vast.requests if isinstance(r.body, dict))
    assert any(r.headers.get("Authorization") == f"Bearer {SERVICE_KEY}" for r in runpod.calls("GET", "/proxy/"))
    assert any((r.body or {}).get("env", {}).get("GPUBAKE_API_KEY") == SERVICE_KEY for r in runpod.calls("POST", "/v2/pods$"))
    assert all(vast.api_key not in r.path + str(r.query) for r in vast.requests)  # never in a URL

"""`launch` gives the rented service its API key: `$GPUBAKE_API_KEY`, or one it generates
and shows once. The key goes to the instance's env and into launch's own /health polls,
never into --json output, a dry-run, a template or a log."""

from __future__ import annotations

import json
import logging

FAST = ["--poll-interval", "0.05", "--timeout", "10"]
USER_KEY = "users-own-service-key-0123456789"


def _publish(cli, target: str, spec_path, image_ref) -> None:
    auth = ["--registry-auth", "clzregauth0001"] if target == "runpod" else []
    code, _, err = cli("publish", "--target", target, "--image", str(spec_path), "--image-ref", image_ref, *auth)
    assert code == 0, err


def test_runpod_launch_generates_a_key_shown_once(runpod, cli, spec_path, image_ref, make_report, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("GPUBAKE_API_KEY", raising=False)
    _publish(cli, "runpod", spec_path, image_ref)
    pod_id = f"pod{runpod._n + 1:04d}x"
    runpod.set_health(pod_id, make_report(None), make_report("pass"))
    code, out, err = cli("launch", "--target", "runpod", "--image", str(spec_path), "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    (create,) = runpod.calls("POST", "/v2/pods$")
    key = create.body["env"]["GPUBAKE_API_KEY"]
    assert len(key) >= 40  # secrets.token_urlsafe(32)
    assert err.count(key) == 1 and "(GPUBAKE_API_KEY; shown once, not stored)" in err
    assert key not in out and key not in caplog.text
    assert "GPUBAKE_API_KEY" not in json.dumps(list(runpod.templates.values()))  # templates never hold it
    polls = runpod.calls("GET", f"/proxy/{pod_id}/8000/health")
    assert polls and all(p.headers.get("Authorization") == f"Bearer {key}" for p in polls)
    assert json.loads(out)["verdict"] == "pass"
    # another launch, another key
    runpod.set_health(f"pod{runpod._n + 1:04d}x", make_report("pass"))
    assert cli("launch", "--target", "runpod", "--image", str(spec_path), "--gpu", "L40S", *FAST, "--json")[0] == 0
    assert runpod.calls("POST", "/v2/pods$")[-1].body["env"]["GPUBAKE_API_KEY"] != key


def test_vast_launch_uses_the_users_key(vast, cli, spec_path, image_ref, make_report, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", USER_KEY)
    _publish(cli, "vastai", spec_path, image_ref)
    vast.offers = [{"id": 7, "gpu_name": "L40S", "num_gpus": 1, "dph_total": 0.4, "driver_version": "575.57.08",
                    "cuda_max_good": 12.9, "reliability2": 0.99, "compute_cap": 890, "disk_space": 100}]
    vast.set_health(str(vast._n + 1), make_report("pass"))
    code, out, err = cli("launch", "--target", "vastai", "--image", str(spec_path), "--gpu", "L40S", *FAST, "--json")
    assert code == 0, err
    (rent,) = vast.calls("PUT", "/asks/")
    assert rent.body["env"] == f"-e GPUBAKE_API_KEY={USER_KEY}"  # Vast.ai's env: docker flags in one string
    assert USER_KEY not in err + out and "shown once" not in err  # the user's own key is never echoed
    polls = vast.calls("GET", "/health")
    assert polls and all(p.headers.get("Authorization") == f"Bearer {USER_KEY}" for p in polls)


def test_dry_run_masks_the_key(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", USER_KEY)
    _publish(cli, "runpod", spec_path, image_ref)
    code, out, err = cli("launch", "--target", "runpod", "--image", str(spec_path), "--gpu", "L40S", "--dry-run",
                         "--json")
    assert code == 0, err
    assert USER_KEY not in out + err
    planned = [r for r in json.loads(out)["requests"] if not r["sent"]]
    assert planned[0]["body"]["env"]["GPUBAKE_API_KEY"] == "***"


def test_a_key_the_service_would_refuse_is_refused_before_renting(runpod, cli, spec_path, image_ref, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", "short")
    _publish(cli, "runpod", spec_path, image_ref)
    code, out, err = cli("launch", "--target", "runpod", "--image", str(spec_path), "--gpu", "L40S", *FAST)
    assert code == 2 and "$GPUBAKE_API_KEY: must be at least 16 characters" in err
    assert "short" not in err and runpod.pods == {} and runpod.calls("POST", "/v2/pods$") == []

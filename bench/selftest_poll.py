"""Poll a booting gpubake service: record when /health first answers, when the verdict
arrives (boot-to-verdict), then time two generation jobs. Used by selftest_device.sh."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import requests

URL = "http://127.0.0.1:8000"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boot", type=float, required=True, help="epoch seconds when start.sh began")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    out: dict = {}
    deadline = time.time() + args.timeout
    body: dict = {}
    while time.time() < deadline:
        try:
            body = requests.get(URL + "/health", timeout=5).json()
        except requests.RequestException:
            time.sleep(0.2)
            continue
        out.setdefault("health_first_answer_s", round(time.time() - args.boot, 2))
        if body.get("status") in ("ready", "failed"):
            out["boot_to_verdict_s"] = round(time.time() - args.boot, 2)
            break
        time.sleep(0.2)
    out["status"], out["verdict"] = body.get("status"), body.get("verdict")
    if body.get("status") == "ready":
        jobs = []
        for req in ({"prompt": "a red fox running", "seed": 1, "steps": 4},
                    {"prompt": "a boat on the sea", "size": "256x256", "frames": 17, "steps": 8, "seed": 2}):
            t0 = time.time()
            job = requests.post(URL + "/v1/generate", json=req, timeout=30).json()
            while True:
                st = requests.get(URL + f"/v1/jobs/{job['id']}", timeout=30).json()
                if st["status"] in ("done", "failed"):
                    break
                time.sleep(0.05)
            video = requests.get(URL + f"/v1/jobs/{job['id']}/video", timeout=30)
            jobs.append({"request": st["request"], "status": st["status"], "http_seconds": round(time.time() - t0, 3),
                         "result": st.get("result"), "video_bytes": len(video.content)})
        out["jobs"] = jobs
    (args.out / "boot.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

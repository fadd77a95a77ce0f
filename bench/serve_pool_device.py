"""Device run (issue 15): the generation service's worker pool on this machine's GPUs, as
`gpubake serve --workers auto` builds it: one worker per GPU torch sees, each self-tested
on its own GPU, then 2 jobs per worker through the one queue. Also the self-test's NCCL
all-reduce across every GPU and the NVML-to-CUDA UUID match the workers rely on.

    python3 bench/serve_pool_device.py --out $OUT          # any number of GPUs, 1 included

The model is the tiny NVFP4 checkpoint (what is measured is the pool, not the model); the
image facts are the Hopper image's, carrying it. Writes $OUT/serve-pool.json and the
service's report $OUT/serve-pool-report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=Path("/tmp/serve-pool"))
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--jobs-per-worker", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.root, ignore_errors=True)

    import torch

    from gpubake.fsutil import write_json_atomic
    from gpubake.images.catalog import find
    from gpubake.images.render import image_facts
    from gpubake.provisioning.quantize import quantize_checkpoint
    from gpubake.provisioning.serving.build import build_service
    from gpubake.provisioning.serving.schemas import GenerateRequest
    from gpubake.provisioning.tiny import make_tiny
    from gpubake.smoke_tests.multigpu import allreduce_check
    from gpubake.smoke_tests.probe import NvmlProbe, cuda_index_of, cuda_uuids

    out: dict[str, Any] = {"torch": torch.__version__, "gpus_torch": torch.cuda.device_count()}
    found = NvmlProbe().probe()
    uuids = cuda_uuids()
    out["nvml"] = [{"index": g.index, "name": g.name, "uuid": g.uuid} for g in found.gpus]
    out["cuda_uuids"] = uuids
    out["nvml_to_cuda"] = {str(k): v for k, v in cuda_index_of(found.gpus, uuids).items()}
    out["allreduce"] = allreduce_check(max(1, torch.cuda.device_count()), backend="nccl", device_type="cuda")
    print("[pool] all-reduce:", out["allreduce"], flush=True)

    t0 = time.perf_counter()
    make_tiny(args.root / "tiny-bf16")
    quantize_checkpoint(args.root / "tiny-bf16", args.root / "tiny-nvfp4", policy="default", progress=False)
    out["checkpoint_seconds"] = round(time.perf_counter() - t0, 2)
    spec = find("wan22-t2v-a14b-nvfp4-hopper")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"id": "tiny-wan2.2"})})
    report = args.out / "serve-pool-report.json"
    workers: Any = args.workers if args.workers == "auto" else int(args.workers)
    service = build_service(facts=image_facts(spec, "runpod"), model_dir=args.root / "tiny-nvfp4",
                            report_path=report, data_dir=args.root / "data", workers=workers, quick=True)
    t0 = time.perf_counter()
    service.start()
    service.wait_settled(540)
    out["boot_seconds"] = round(time.perf_counter() - t0, 2)
    out["phase"], out["reason"] = service.phase, service.reason
    print(f"[pool] {len(service.workers)} worker(s), phase {service.phase} in {out['boot_seconds']} s", flush=True)
    jobs = []
    if service.phase == "ready":
        assert service.generator is not None
        t0 = time.perf_counter()
        for i in range(args.jobs_per_worker * len(service.workers)):
            req = GenerateRequest(prompt=f"pool job {i}", size="128x128", frames=17, steps=8, seed=i)
            jobs.append(service.submit(service.generator.resolve(req)).id)
        while any(service.get(j).status in ("queued", "running") for j in jobs):
            time.sleep(0.05)
        out["jobs_wall_seconds"] = round(time.perf_counter() - t0, 3)
    recs = [service.get(j) for j in jobs]
    out["jobs"] = [{"id": r.id, "status": r.status, "worker": (r.result or {}).get("worker"),
                    "device": (r.result or {}).get("device"), "started_at": r.started_at, "finished_at": r.finished_at,
                    "seconds_per_step": (r.result or {}).get("seconds_per_step"), "error": r.error} for r in recs]
    spans = [(r.started_at, r.finished_at) for r in recs if r.started_at and r.finished_at]
    out["max_jobs_at_once"] = max((sum(1 for a, b in spans if a <= t < b) for t, _ in spans), default=0)
    out["health"] = service.health()
    service.stop(30)
    write_json_atomic(args.out / "serve-pool.json", out)
    print(json.dumps({k: out[k] for k in ("phase", "boot_seconds", "max_jobs_at_once")}
                     | {"jobs": [(j["worker"], j["status"]) for j in out["jobs"]]}), flush=True)


if __name__ == "__main__":
    main()

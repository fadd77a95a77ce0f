"""RunPod serverless worker: the same service code behind `runpod.serverless.start`.

Cold start runs the self-test (quick hashing: serverless workers boot often) and keeps
the pipeline; each job's `input` is a GenerateRequest. The clip comes back inline as
base64 MP4 (RunPod caps job output size: keep serverless clips short) with the timings.
A worker whose self-test failed answers every job with that failure as its error.

Run: `python -m gpubake.provisioning.serving.runpod_handler` (RunPod passes its own
flags; `--test_input '{"input": {...}}'` runs one job locally and exits).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from gpubake import envs
from gpubake.errors import GpubakeError
from gpubake.provisioning.serving.generate import RequestRejected
from gpubake.provisioning.serving.schemas import GenerateRequest
from gpubake.provisioning.serving.service import GenerationService, Job, Refused


def make_handler(service: GenerationService) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A RunPod handler: job dict in, output dict (or {"error": ...}) out."""

    def handler(job: dict[str, Any]) -> dict[str, Any]:
        service.wait_settled()
        try:
            service.check_accepting()
        except Refused as exc:
            return {"error": exc.message}
        try:
            req = GenerateRequest.model_validate(job.get("input") or {})
            assert service.generator is not None
            args = service.generator.resolve(req)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "input"
            return {"error": f"input.{where}: {str(err['msg']).removeprefix('Value error, ')}"}
        except RequestRejected as exc:
            return {"error": f"input.{exc}"}
        run = Job(id=str(job.get("id") or "local"), args=args, out_dir=service.out_dir / "jobs")
        run.out_dir = run.out_dir / run.id
        service.run_job(run)  # serverless runs one job at a time: no queue needed
        if run.status != "done":
            return {"error": run.error or "render failed"}
        return {
            "video_base64": base64.b64encode(run.video.read_bytes()).decode("ascii"),
            "mime_type": "video/mp4",
            "request": args.to_dict(),
            "result": run.to_dict()["result"],
        }

    return handler


def main() -> None:
    import runpod

    from gpubake.provisioning.serving.build import build_service

    mode = envs.value("GPUBAKE_SELFTEST", default="quick")  # serverless workers boot often: quick by default
    if mode not in ("full", "quick", "off"):
        raise SystemExit(f"error: GPUBAKE_SELFTEST must be full, quick or off, got {mode!r}")
    try:
        service = build_service(selftest=mode != "off", quick=mode == "quick")
    except GpubakeError as exc:  # e.g. a bad $GPUBAKE_RUNTIME: one line, as for the modes above
        raise SystemExit(f"error: {exc}") from None
    service.start()
    runpod.serverless.start({"handler": make_handler(service)})


if __name__ == "__main__":
    main()

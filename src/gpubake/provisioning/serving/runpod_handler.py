"""RunPod serverless worker: the same service code behind `runpod.serverless.start`.

Cold start runs the self-test (quick hashing: serverless workers boot often) and keeps
the pipeline; each job's `input` is a GenerateRequest. A clip small enough comes back
inline as base64 MP4 with the timings. RunPod caps what a job may return (its /run and
/runsync payload limits are 10 and 20 MB), so a larger clip goes to S3-compatible storage
(`$GPUBAKE_OUTPUT_S3` = s3://bucket/prefix, endpoint `$AWS_ENDPOINT_URL` for R2/B2/MinIO,
credentials from boto3's usual chain) and the job returns a presigned URL instead.
A worker whose self-test failed answers every job with that failure as its error.

Run: `python -m gpubake.provisioning.serving.runpod_handler` (RunPod passes its own
flags; `--test_input '{"input": {...}}'` runs one job locally and exits).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpubake import envs
from gpubake.errors import GpubakeError
from gpubake.provisioning.serving.generate import RequestRejected
from gpubake.provisioning.serving.jobs import JobRecord
from gpubake.provisioning.serving.schemas import GenerateRequest
from gpubake.provisioning.serving.service import GenerationService, Refused

# base64 characters of video allowed inline: under /run's 10 MB with room for the timings
INLINE_MAX_CHARS = 9_000_000
URL_SECONDS = 24 * 3600
_JOB_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Outputs:
    """Where clips too large to return inline go."""

    s3_uri: str | None = None
    endpoint_url: str | None = None
    inline_max_chars: int = INLINE_MAX_CHARS
    url_seconds: int = URL_SECONDS

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Outputs:
        env = dict(os.environ) if env is None else env
        uri = envs.raw("GPUBAKE_OUTPUT_S3", env)
        if uri is not None:
            from gpubake.provisioning.s3 import parse_s3_uri

            parse_s3_uri(uri)  # a malformed URI fails the cold start, not the first large job
        limit = envs.raw("GPUBAKE_INLINE_MAX_BYTES", env) or str(INLINE_MAX_CHARS)
        if not limit.isdigit():
            raise GpubakeError(f"GPUBAKE_INLINE_MAX_BYTES: must be a whole number of bytes, got {limit!r}")
        return cls(s3_uri=uri, endpoint_url=env.get("AWS_ENDPOINT_URL") or None, inline_max_chars=int(limit))

    def upload(self, video: Path, job_id: str) -> dict[str, Any]:
        """Put `video` under the prefix; a presigned GET URL for it."""
        from gpubake.provisioning.s3 import StorageError, client, error_message, parse_s3_uri

        assert self.s3_uri is not None
        uri = parse_s3_uri(self.s3_uri)
        key = f"{uri.prefix}{job_id}.mp4"
        s3 = client(self.endpoint_url)
        try:
            s3.upload_file(str(video), uri.bucket, key, ExtraArgs={"ContentType": "video/mp4"})
            url = s3.generate_presigned_url("get_object", Params={"Bucket": uri.bucket, "Key": key},
                                            ExpiresIn=self.url_seconds)
        except Exception as exc:  # botocore's errors, named in one line (never the credentials)
            raise StorageError(error_message(exc, f"s3://{uri.bucket}/{key}")) from None
        return {"video_url": url, "video_s3": f"s3://{uri.bucket}/{key}", "video_url_expires_in": self.url_seconds}


def make_handler(service: GenerationService, outputs: Outputs | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A RunPod handler: job dict in, output dict (or {"error": ...}) out."""
    outputs = outputs or Outputs()

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
        # recorded as running, never queued: the worker thread takes queued rows, this job runs here
        run = JobRecord(id=_JOB_ID.sub("_", str(job.get("id") or "local"))[:128], request=args.to_dict(),
                        status="running")
        service.store.add(run)
        service.run_job(run)  # serverless runs one job at a time: no queue needed
        if run.status != "done":
            return {"error": run.error or "render failed"}
        out: dict[str, Any] = {"mime_type": "video/mp4", "request": args.to_dict(), "result": run.to_dict()["result"]}
        video = service.video_path(run)
        size = video.stat().st_size
        if (size + 2) // 3 * 4 <= outputs.inline_max_chars:
            out["video_base64"] = base64.b64encode(video.read_bytes()).decode("ascii")
            return out
        if outputs.s3_uri is None:
            return {"error": f"output: the clip is {size} bytes, over what a RunPod job may return inline "
                             f"({outputs.inline_max_chars * 3 // 4} bytes); set GPUBAKE_OUTPUT_S3=s3://bucket/prefix "
                             "to receive larger clips as a presigned URL, or ask for fewer frames"}
        try:
            out.update(outputs.upload(video, run.id))
        except GpubakeError as exc:
            return {"error": f"output: {exc}"}
        return out

    return handler


def main() -> None:
    import runpod

    from gpubake.provisioning.serving.build import build_service

    mode = envs.value("GPUBAKE_SELFTEST", default="quick")  # serverless workers boot often: quick by default
    if mode not in ("full", "quick", "off"):
        raise SystemExit(f"error: GPUBAKE_SELFTEST must be full, quick or off, got {mode!r}")
    try:
        outputs = Outputs.from_env()
        service = build_service(selftest=mode != "off", quick=mode == "quick")
    except GpubakeError as exc:  # e.g. a bad $GPUBAKE_RUNTIME: one line, as for the modes above
        raise SystemExit(f"error: {exc}") from None
    service.start()
    runpod.serverless.start({"handler": make_handler(service, outputs)})


if __name__ == "__main__":
    main()

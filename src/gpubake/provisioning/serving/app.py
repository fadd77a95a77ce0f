"""HTTP front end (FastAPI) of the generation service.

GET  /health               self-test report and service phase (200 ready, 503 otherwise)
GET  /v1/info              model id and request defaults
POST /v1/generate          validate, queue -> 202 {id, status_url, video_url}
GET  /v1/jobs/{id}         status; timings and seed when done
GET  /v1/jobs/{id}/video   the MP4 (409 until done)
Errors are JSON `{"error": "<one line naming the field>", ...}`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from gpubake.provisioning.serving.generate import RequestRejected
from gpubake.provisioning.serving.schemas import GenerateRequest, error_body
from gpubake.provisioning.serving.service import GenerationService, Refused


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_message(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "invalid request"
    first = errs[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "body: not valid JSON"
    if kind == "extra_forbidden":
        return f"{_field(first['loc'])}: unknown field (fields: {', '.join(GenerateRequest.model_fields)})"
    if kind == "missing":
        return f"{_field(first['loc'])}: missing required field"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{_field(first['loc'])}: {msg}{more}"


def create_app(service: GenerationService) -> FastAPI:
    """The app; its lifespan starts the service's worker (self-test first) and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        service.start()
        yield
        service.stop()

    app = FastAPI(title="gpubake generation service", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse(error_body(_validation_message(exc), detail=detail), status_code=422)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(error_body(exc.message, phase=service.phase), status_code=exc.status_code,
                            headers=headers)

    @app.get("/health")
    def health() -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/generate", status_code=202)
    def generate(req: GenerateRequest) -> JSONResponse:
        service.check_accepting()
        assert service.generator is not None
        try:
            args = service.generator.resolve(req)
        except RequestRejected as exc:
            return JSONResponse(error_body(str(exc), field=exc.field), status_code=422)
        job = service.submit(args)
        body = job.to_dict()
        body["status_url"] = f"/v1/jobs/{job.id}"
        body["video_url"] = f"/v1/jobs/{job.id}/video"
        return JSONResponse(body, status_code=202, headers={"Location": body["status_url"]})

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str) -> JSONResponse:
        job = service.get(job_id)
        if job is None:
            return JSONResponse(error_body(f"job {job_id}: no such job (unknown or expired)"), status_code=404)
        body = job.to_dict()
        if job.status == "done":
            body["video_url"] = f"/v1/jobs/{job.id}/video"
        return JSONResponse(body)

    @app.get("/v1/jobs/{job_id}/video", response_model=None)
    def job_video(job_id: str) -> Any:
        job = service.get(job_id)
        if job is None:
            return JSONResponse(error_body(f"job {job_id}: no such job (unknown or expired)"), status_code=404)
        if job.status != "done":
            why = f": {job.error}" if job.error else ""
            return JSONResponse(error_body(f"job {job_id} is {job.status}{why}; no video"), status_code=409)
        return FileResponse(job.video, media_type="video/mp4", filename=f"{job.id}.mp4")

    return app

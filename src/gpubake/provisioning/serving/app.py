"""HTTP front end (FastAPI) of the generation service.

GET  /health               liveness and verdict (200 ready, 503 otherwise); with the key, the report too
GET  /v1/info              model id, request defaults and this machine's limits
POST /v1/generate          validate, queue -> 202 {id, status_url, video_url}
GET  /v1/jobs/{id}         status; timings and seed when done
GET  /v1/jobs/{id}/video   the MP4 (409 until done)
GET  /docs, /openapi.json  the API description
With an API key (`auth`), everything but /health needs `Authorization: Bearer <key>`.
Every error is JSON `{"error": "<one line naming the field or limit>", ...}`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpubake.provisioning.serving.auth import RequireKey, authorized
from gpubake.provisioning.serving.generate import RequestRejected
from gpubake.provisioning.serving.limits import MAX_BODY_BYTES, BodyLimit
from gpubake.provisioning.serving.schemas import (
    JOB_ID,
    GenerateRequest,
    HealthBody,
    InfoBody,
    JobBody,
    error_body,
    error_responses,
)
from gpubake.provisioning.serving.service import GenerationService, Refused

log = logging.getLogger("gpubake.serve")


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
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "body: must be a JSON object (Content-Type: application/json)"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{_field(first['loc'])}: {msg}{more}"


def create_app(service: GenerationService, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app; its lifespan starts the service's worker (self-test first) and stops it.

    `api_key`: required on /v1/*, /docs and /openapi.json (the RequireKey middleware);
    None serves them open (loopback, or `--insecure-no-auth`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        service.start()
        yield
        service.stop()

    app = FastAPI(title="gpubake generation service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    # the scheme is documented in the OpenAPI; RequireKey enforces it before the body is read
    security = [Security(HTTPBearer(auto_error=False, description="$GPUBAKE_API_KEY"))] if api_key else []
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequireKey, key=api_key)  # added last: outermost

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg"))} for e in exc.errors()]
        return JSONResponse(error_body(_validation_message(exc), errors=errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"not found: {request.method} {request.url.path}",
                   405: f"method not allowed: {request.method} {request.url.path}"}.get(exc.status_code)
        if exc.status_code == 400 and request.method == "POST":
            # FastAPI's "There was an error parsing the body" (e.g. bytes that are not UTF-8):
            # a bad body, answered like every other bad body
            return JSONResponse(error_body("body: not valid JSON (UTF-8 expected)"), status_code=422)
        if message is None:
            message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(error_body(exc.message, phase=service.phase), status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(error_body("internal error (the service log has the details)"), status_code=500)

    @app.get("/health", response_model=HealthBody, responses={503: {"model": HealthBody, "description": "not ready"}})
    def health(request: Request) -> JSONResponse:
        body = service.health(full=authorized(request.headers.get("authorization"), api_key))
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/openapi.json", include_in_schema=False, dependencies=security)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=security)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/v1/info", response_model=InfoBody, dependencies=security, responses=error_responses(401))
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/generate", status_code=202, response_model=JobBody, dependencies=security,
              responses=error_responses(401, 413, 422, 429, 503, 507))
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

    JobId = Path(pattern=JOB_ID, description="the `id` POST /v1/generate returned")

    @app.get("/v1/jobs/{job_id}", response_model=JobBody, dependencies=security,
             responses=error_responses(401, 404, 422))
    def job_status(job_id: str = JobId) -> JSONResponse:
        job = service.get(job_id)
        if job is None:
            return JSONResponse(error_body(f"job {job_id}: no such job (unknown or expired)"), status_code=404)
        body = job.to_dict()
        if job.status == "done":
            body["video_url"] = f"/v1/jobs/{job.id}/video"
        return JSONResponse(body)

    @app.get("/v1/jobs/{job_id}/video", response_model=None, dependencies=security,
             responses={200: {"content": {"video/mp4": {}}, "description": "the clip"},
                        **error_responses(401, 404, 409, 422)})
    def job_video(job_id: str = JobId) -> Any:
        job = service.get(job_id)
        if job is None:
            return JSONResponse(error_body(f"job {job_id}: no such job (unknown or expired)"), status_code=404)
        path = service.video_path(job)
        if job.status != "done" or not path.is_file():
            why = f": {job.error}" if job.error else ""
            state = job.status if job.status != "done" else "done but its video was removed"
            return JSONResponse(error_body(f"job {job_id} is {state}{why}; no video"), status_code=409)
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    return app

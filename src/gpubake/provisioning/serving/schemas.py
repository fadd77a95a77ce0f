"""Request and response shapes of the generation API (pydantic: clear 4xx for bad input).

Strict types: `"frames": true` or `"steps": 2.0` is a 422 naming the field, not a
silent 1 or 2 (pydantic's lax mode would coerce them). The response models document
the API (`/openapi.json`, checked by the schemathesis test); the handlers build the
same shapes as plain dicts.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpubake.provisioning.step_cache import StepCache, StepCacheError

SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
JOB_ID = r"^[A-Za-z0-9._-]{1,128}$"  # ours are uuid4 hex; serverless ones RunPod's, sanitised
REQUEST_STEP_CACHES = ("none", "mag")  # what a request may choose (`step_cache.StepCache` kinds)
GUIDANCE_MAX = 20.0  # Wan's reference scales are 3-5; far above, CFG only burns the picture


class GenerateRequest(BaseModel):
    """POST /v1/generate and the serverless job input. Omitted fields take the model's
    defaults (`GET /v1/info`); `seed` omitted means a random one, echoed in the job."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(
        default=None, max_length=2000,
        description="omitted: the model's own negative prompt (GET /v1/info); \"\" for none")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, each a multiple of 16, e.g. 832x480")
    frames: int | None = Field(default=None, ge=1, le=241, description="4k+1: 1, 5, 9, ... 81")
    steps: int | None = Field(default=None, ge=1, le=100,
                              description="omitted: the model's recipe; a fixed-schedule (distilled) recipe takes only its own")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    guidance_scale: float | None = Field(
        default=None, ge=1.0, le=GUIDANCE_MAX,
        description="classifier-free guidance (of the high-noise expert); 1.0 = none, one forward a step; "
                    "omitted: the model's recipe")
    guidance_scale_2: float | None = Field(
        default=None, ge=1.0, le=GUIDANCE_MAX,
        description="the low-noise expert's guidance (two-expert models only); omitted: the recipe's, "
                    "or guidance_scale when that is given")
    cfg_until: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="the fraction of the steps (the first ones) that keep classifier-free guidance; later steps "
                    "run one forward; omitted: the recipe's (every step, unless it says otherwise)")
    step_cache: str | None = Field(
        default=None, max_length=40,
        description="skip transformer forwards for speed at some quality cost: \"none\" or \"mag:THRESHOLD[:K[:RETENTION]]\" "
                    "(MagCache on its authors' calibration, e.g. mag:0.04, where GET /v1/info names one); "
                    "omitted: the service's (GET /v1/info)")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return value
        m = SIZE.match(value)
        if not m:
            raise ValueError(f"must be WIDTHxHEIGHT like 832x480, got {value!r}")
        w, h = int(m.group(1)), int(m.group(2))
        if w < 16 or h < 16 or w % 16 or h % 16:
            raise ValueError(f"width and height must be multiples of 16 (at least 16), got {value}")
        return value

    @field_validator("step_cache")
    @classmethod
    def _step_cache(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            cache = StepCache.parse(value)
        except StepCacheError:
            cache = None
        if cache is None or cache.kind not in REQUEST_STEP_CACHES:
            # First Block Cache stays the service's setting ($GPUBAKE_RUNTIME): its hooks on the
            # compiled blocks would recompile them when a request turned it on or off
            raise ValueError(f"none or mag:THRESHOLD[:K[:RETENTION]] (THRESHOLD in (0, 1], K an integer in [1, 8], "
                             f"RETENTION in [0, 1)), got {value!r}")
        return str(cache)

    @field_validator("frames")
    @classmethod
    def _frames(cls, value: int | None) -> int | None:
        if value is not None and (value - 1) % 4:
            raise ValueError(f"must be 4k+1 (1, 5, 9, ... 81), got {value}")
        return value

    @property
    def width_height(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        w, h = self.size.split("x")
        return int(w), int(h)


class ErrorBody(BaseModel):
    """Every error: one readable line naming the field, flag or limit."""

    error: str


class ResolvedRequest(BaseModel):
    """A request with every default filled in: exactly what `render` is called with (the
    job's `request`, stored as a dict in the job store and answered in `JobBody`)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    seed: int
    guidance_scale: float
    guidance_scale_2: float | None
    cfg_until: float | None = None  # None: every step guided (a job stored before the field had none)
    step_cache: str | None = None  # None: the service's (a job stored before the field had none)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResolvedRequest:
        return cls(**{k: d[k] for k in cls.model_fields if k in d or cls.model_fields[k].is_required()})


class JobBody(BaseModel):
    id: str
    status: str  # queued | running | done | failed
    request: ResolvedRequest
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None = None
    result: dict[str, Any] | None = None
    status_url: str | None = None
    video_url: str | None = None


class HealthBody(BaseModel):
    """Without the API key only `status`, `ready` and `verdict` are present."""

    status: str  # starting | verifying | selftest | ready | failed
    ready: bool
    verdict: str | None
    reason: str | None = None
    model_id: str | None = None
    queue: dict[str, int] | None = None
    limits: dict[str, Any] | None = None
    model_check: dict[str, Any] | None = None
    selftest: dict[str, Any] | None = None


class InfoBody(BaseModel):
    model_id: str
    phase: str
    defaults: dict[str, Any] | None
    limits: dict[str, Any] | None


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """Every error response: one readable line in `error`, details beside it."""
    return {"error": " ".join(str(message).split()), **extra}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error codes (all `ErrorBody`)."""
    why = {401: "missing or wrong API key", 404: "no such job", 409: "video not ready", 413: "body too large",
           422: "bad request body or over a limit", 429: "queue full (Retry-After)",
           503: "self-test in progress (Retry-After) or failed", 507: "disk full"}
    return {code: {"model": ErrorBody, "description": why.get(code, "error")} for code in codes}

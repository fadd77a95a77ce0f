"""Request and response shapes of the generation API (pydantic: clear 4xx for bad input)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


class GenerateRequest(BaseModel):
    """POST /v1/generate and the serverless job input. Omitted fields take the model's
    defaults (`GET /v1/info`); `seed` omitted means a random one, echoed in the job."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(default=None, max_length=2000)
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, each a multiple of 16, e.g. 832x480")
    frames: int | None = Field(default=None, ge=1, le=241, description="4k+1: 1, 5, 9, ... 81")
    steps: int | None = Field(default=None, ge=1, le=100)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)

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


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """Every error response: one readable line in `error`, details beside it."""
    return {"error": message, **extra}

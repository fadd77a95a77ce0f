"""The expected-throughput table (data/throughput.json) and how a measurement is judged.

The numbers are data, not code: a new GPU or a faster runtime is one edited row.
Unknown GPUs are reported with what they measured, never failed for being unknown.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpubake.errors import GpubakeError

DEFAULT_TABLE = "data/throughput.json"


class SelfTestError(GpubakeError):
    """The self-test could not start: bad flag, missing spec, broken data table."""


class RenderParams(BaseModel):
    """The fixed clip the self-test renders for one model."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    height: int = Field(gt=0, multiple_of=16)
    width: int = Field(gt=0, multiple_of=16)
    num_frames: int = Field(gt=0)
    steps: int = Field(gt=0)
    seed: int = Field(ge=0)


class GpuExpectation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    match: list[str] = Field(min_length=1)
    seconds_per_step: float = Field(gt=0)
    end_to_end_seconds: float = Field(gt=0)
    # every row says which it is: "measured" (its basis names the run) or "estimate" (its
    # basis says how it was derived); an estimate never fails a machine (`judge`)
    source: Literal["measured", "estimate"]
    basis: str
    # the checkpoint format a measured row was measured with; an image of another format
    # (the FP8-weight variant against NVFP4 rows) is judged against it as an estimate
    quantization: Literal["nvfp4", "fp8", "bf16"] | None = None

    def for_quantization(self, quantization: str) -> "GpuExpectation":
        """This row as the image of `quantization` may be judged by it: a row measured with
        another format is only an estimate of this one (it degrades at most, `judge`)."""
        if self.source == "measured" and self.quantization not in (None, quantization):
            return self.model_copy(update={"source": "estimate", "basis": f"measured with {self.quantization}, "
                                           f"not {quantization}: {self.basis}"})
        return self


class ModelExpectations(BaseModel):
    model_config = ConfigDict(extra="forbid")
    render: RenderParams
    spread_tolerance: float | None = Field(default=None, gt=0, description="overrides the table's for this model")
    gpus: list[GpuExpectation]


class ThroughputTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1]
    about: str = ""
    tolerance: float = Field(gt=0)
    fail_factor: float = Field(gt=1)
    spread_tolerance: float = Field(gt=0)
    models: dict[str, ModelExpectations]

    def spread_for(self, model_id: str) -> float:
        """Run-to-run spread allowed for this model (tiny models jitter with the host)."""
        model = self.models.get(model_id)
        return model.spread_tolerance if model and model.spread_tolerance else self.spread_tolerance

    def lookup(self, model_id: str, gpu_name: str | None) -> GpuExpectation | None:
        """First row whose match string is in the NVML name; None = unknown GPU or CPU."""
        model = self.models.get(model_id)
        if model is None or not gpu_name:
            return None
        lowered = gpu_name.lower()
        for row in model.gpus:
            if any(m.lower() in lowered for m in row.match):
                return row
        return None


def load_table(path: str | Path | None = None) -> ThroughputTable:
    """Load and validate the table; errors name the file and the field."""
    if path is None:
        return _packaged_table()
    return _parse(Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None, str(path))


@lru_cache(maxsize=1)
def _packaged_table() -> ThroughputTable:
    text = resources.files("gpubake.smoke_tests").joinpath(DEFAULT_TABLE).read_text(encoding="utf-8")
    return _parse(text, DEFAULT_TABLE)


def _parse(text: str | None, where: str) -> ThroughputTable:
    if text is None:
        raise SelfTestError(f"{where}: throughput table not found")
    try:
        return ThroughputTable.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise SelfTestError(f"{where}: not JSON: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise SelfTestError(f"{where}: field {loc}: {err['msg']}") from None


def judge(
    seconds_per_step: float, end_to_end_seconds: float, row: GpuExpectation, table: ThroughputTable
) -> tuple[Literal["pass", "warn", "fail"], float]:
    """Compare with the row: within tolerance passes, beyond it degrades, past
    `fail_factor` times the expectation fails. Returns (status, worst ratio).

    Only a measured row can fail a machine: an estimated one (`source` "estimate") may be
    wrong by more than any tolerance, so a clip slower than it degrades the verdict at most
    and generation stays enabled."""
    ratio = max(seconds_per_step / row.seconds_per_step, end_to_end_seconds / row.end_to_end_seconds)
    if ratio > table.fail_factor:
        return ("fail" if row.source == "measured" else "warn"), ratio
    if ratio > 1 + table.tolerance:
        return "warn", ratio
    return "pass", ratio

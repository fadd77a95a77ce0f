"""Runs the stages in order, each under a time limit, and keeps the report current.

A stage that overruns its limit is reported as failed and the self-test moves on (its
thread is left to finish in the background: GPU work cannot be cancelled from Python).
Stages whose inputs failed are skipped with the reason, so the report always says
what was checked and what was not.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from gpubake.errors import one_line
from gpubake.smoke_tests import stages as st
from gpubake.smoke_tests.multigpu import gpus_stage
from gpubake.smoke_tests.report import Report, StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[st.Context], StageResult]
    limit_seconds: float
    needs: tuple[str, ...] = ()


# Limits are generous upper bounds for a full-size A14B image on a slow disk; a healthy
# machine finishes far inside them. The render limit is per run (x --sustained).
STAGES: tuple[Stage, ...] = (
    Stage("gpu", st.gpu_stage, 60),
    Stage("gpus", gpus_stage, 240),
    Stage("kernels", st.kernels_stage, 300, ("gpu",)),
    Stage("model", st.model_stage, 1800),
    Stage("render", st.render_stage, 1200, ("gpu", "kernels", "model")),
    Stage("throughput", st.throughput_stage, 120, ("render",)),
)


class SelfTest:
    """One self-test run. `on_update(report)` is called whenever the report changes
    (the CLI writes it to disk, the service serves it on /health)."""

    def __init__(
        self,
        ctx: st.Context,
        report: Report,
        *,
        on_update: Callable[[Report], None] | None = None,
        stages: tuple[Stage, ...] = STAGES,
        limits: dict[str, float] | None = None,
    ) -> None:
        self.ctx = ctx
        self.report = report
        self.on_update = on_update or (lambda r: None)
        self.stages = stages
        self.limits = limits or {}

    def _limit(self, stage: Stage) -> float:
        limit = self.limits.get(stage.name, stage.limit_seconds)
        return limit * max(1, self.ctx.sustained) if stage.name == "render" else limit

    def run(self) -> Report:
        self.on_update(self.report)
        renders = any(s.name == "render" for s in self.stages)
        if self.ctx.prefetch is None and renders:
            from gpubake.provisioning.prefetch import start_for_checkpoint

            # the checkpoint's files into the page cache while the first stages run (when on)
            self.ctx.prefetch = start_for_checkpoint(self.ctx.model_dir)
        status: dict[str, str] = {}
        for stage in self.stages:
            if stage.name == "model" and self.ctx.preimport is None and renders:
                from gpubake.provisioning.preimport import start_if_on

                # the render stage's libraries imported while the model files hash (when on); not
                # earlier: torch and triton are whole by now (the kernel stage imported them), so
                # no import here races one of the stages' own
                self.ctx.preimport = start_if_on()
            limit = self._limit(stage)
            blocked = [n for n in stage.needs if status.get(n) in ("fail", "skip")]
            if blocked:
                result = StageResult(stage.name, "skip", f"skipped: {', '.join(blocked)} did not pass",
                                     limit_seconds=limit)
            else:
                result = _run_limited(stage, self.ctx, limit)
            status[stage.name] = result.status
            self.report.stages.append(result)
            if stage.name == "gpu":
                self.report.mode = self.ctx.mode  # type: ignore[assignment]
            if stage.name == "gpus":
                self.report.gpus = list(result.values.get("gpus", []))
            self.on_update(self.report)
        self.report.finish()
        self.on_update(self.report)
        return self.report


def _run_limited(stage: Stage, ctx: st.Context, limit: float) -> StageResult:
    box: dict[str, StageResult] = {}

    def target() -> None:
        try:
            box["result"] = stage.run(ctx)
        except Exception as exc:  # a bug in a stage still yields a verdict, with the trace
            box["result"] = StageResult(
                stage.name, "fail", f"stage crashed: {one_line(exc)}",
                {"traceback": traceback.format_exc(limit=8).splitlines()[-12:]},
            )

    start = time.perf_counter()
    thread = threading.Thread(target=target, name=f"selftest-{stage.name}", daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.perf_counter() - start
    if thread.is_alive():
        result = StageResult(stage.name, "fail", f"timed out after {limit:g} s")
    else:
        result = box["result"]
    result.seconds = round(elapsed, 3)
    result.limit_seconds = limit
    return result

"""The rank processes of a group (`groups`): one per GPU, spawned by the service.

Rank 0 claims jobs from the SQLite queue and broadcasts each request to its peers; every
rank renders it under the plan's ``parallel`` lever; rank 0 writes the clip and records
the job (`service.execute_job`). At boot rank 0 runs the self-test and its render stage
makes the peers render the same clip with it. Each rank talks to the service over its
pipe and dies with the service (PR_SET_PDEATHSIG). The service side, which spawns and
watches them, is `groups.GroupService`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake.errors import one_line
from gpubake.provisioning.serving.generate import Generator
from gpubake.provisioning.serving.limits import Limits
from gpubake.provisioning.serving.service import WORKER_STAGES_SKIPPED, execute_job, on_device
from gpubake.smoke_tests.probe import DeviceProbe

log = logging.getLogger("gpubake.serve")
IDLE_SECONDS = 0.5  # rank 0 polls the queue (and ticks its peers) this often when idle


@dataclass(frozen=True)
class RankSpec:
    """What one rank process needs (pickled to it by the spawn)."""

    group: int
    rank: int
    devices: tuple[str, ...]  # one per rank of the group
    port: int  # rank 0's TCP rendezvous on loopback
    facts: Any  # provisioning.facts.ImageFacts
    model_dir: Path
    data_dir: Path
    clip_dir: Path  # where the self-test clip goes (rank 0), or scratch (peers)
    selftest: bool
    whole_selftest: bool  # group 0: every stage; the others: their GPUs' stages
    quick: bool = False
    selftest_kwargs: dict[str, Any] = field(default_factory=dict)
    pipeline_loader: Any = None  # (path, device) -> pipeline, a module-level function (tests)
    limit_overrides: dict[str, Any] = field(default_factory=dict)
    min_free_bytes: int = 0
    parent_pid: int = 0

    @property
    def device(self) -> str:
        return self.devices[self.rank]

    @property
    def world(self) -> int:
        return len(self.devices)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the service dies (Linux prctl), so no rank outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:  # it died before the prctl
        os._exit(1)


class _Ctl:
    """The group's control channel: rank 0's messages to every rank, everyone's outcome back."""

    def __init__(self, group: Any, world: int) -> None:
        self.group, self.world = group, world

    def bcast(self, obj: Any = None) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


@dataclass
class _GroupResult:
    """Rank 0's RenderResult with the group that rendered it (a job's `result`)."""

    res: Any
    devices: list[str]
    parallel: Any

    def to_dict(self) -> dict[str, Any]:
        return {**self.res.to_dict(), "devices": self.devices, "parallel": self.parallel}


class GroupBroken(BaseException):
    """A collective of the group failed: a peer died. Not an `Exception`, so `execute_job`
    does not record it as the job's failure: the service names the rank that died."""


class LockstepGenerator(Generator):
    """Rank 0's generator: each render is broadcast to the peers, run by every rank, and
    fails naming the first rank that failed."""

    def __init__(self, pipeline: Any, model: Any, limits: Limits, ctl: _Ctl, devices: list[str],
                 parallel: Any) -> None:
        super().__init__(pipeline, model, limits)
        self.ctl, self.devices, self.parallel = ctl, devices, parallel

    def run(self, args: Any, out_dir: Path) -> Any:
        self.ctl.bcast({"op": "job", "request": args.to_dict()})
        err: str | None = None
        try:
            res = super().run(args, out_dir)
        except Exception as exc:
            err = one_line(exc, limit=400)
            raise
        finally:
            try:
                outcomes = self.ctl.gather(err)
            except Exception as exc:  # a peer is gone: not this job's fault, the group's
                raise GroupBroken(f"the group lost a rank: {one_line(exc, limit=400)}") from exc
        bad = next(((r, e) for r, e in enumerate(outcomes) if r and e), None)
        if bad is not None:
            raise RuntimeError(f"rank {bad[0]} ({self.devices[bad[0]]}): {bad[1]}")
        return _GroupResult(res, self.devices, self.parallel)


def _lockstep_render(stage: Any, ctl: _Ctl, devices: Sequence[str], fired: list[bool]) -> Any:
    """The self-test's render stage on rank 0: the peers render the same clip with it."""
    from gpubake.smoke_tests.report import StageResult

    def run(ctx: Any) -> StageResult:
        fired.append(True)
        ctl.bcast({"op": "selftest"})
        result = stage.run(ctx)
        outcomes = ctl.gather((result.status, result.message))
        values = {**result.values, "group": {"devices": list(devices), "ranks": len(devices)}}
        bad = next(((r, m) for r, (s, m) in enumerate(outcomes) if r and s == "fail"), None)
        if bad is not None and result.status != "fail":
            return StageResult("render", "fail", f"rank {bad[0]} ({devices[bad[0]]}): {bad[1]}", values)
        return dataclasses.replace(result, values=values)

    return dataclasses.replace(stage, run=run)


def _selftest(spec: RankSpec, out_dir: Path) -> Any:
    from gpubake.smoke_tests.api import create_selftest

    kw = dict(spec.selftest_kwargs)
    base = kw.pop("probe", None)
    if base is None:
        from gpubake.smoke_tests.probe import NvmlProbe

        base = NvmlProbe()
    probe = DeviceProbe(base, [int(d.split(":")[1]) for d in spec.devices]) if spec.device.startswith("cuda:") else base
    return create_selftest(spec.facts, spec.model_dir, out_dir, quick=spec.quick, device=spec.device, probe=probe,
                           pipeline_loader=spec.pipeline_loader, **kw)


def _leader(spec: RankSpec, conn: Any, ctl: _Ctl) -> None:
    """Rank 0: the self-test (or the load), then the job loop."""
    from gpubake.provisioning.models import model_for
    from gpubake.provisioning.serving.jobs import DB_NAME, JobStore
    from gpubake.provisioning.serving.limits import limits_for

    model = model_for(spec.facts.model.id, spec.facts.model.recipe)
    if spec.selftest:
        test = _selftest(spec, spec.clip_dir)
        if not spec.whole_selftest:
            test.stages = tuple(s for s in test.stages if s.name not in WORKER_STAGES_SKIPPED)
        fired: list[bool] = []
        test.stages = tuple(_lockstep_render(s, ctl, spec.devices, fired) if s.name == "render" else s
                            for s in test.stages)
        if spec.device.startswith("cuda:"):
            test.stages = tuple(on_device(s, spec.device) for s in test.stages)
        test.on_update = lambda rep: conn.send(("report", rep.to_dict()))
        rep = test.run()
        if rep.verdict == "fail" or not fired:
            bad = next((s for s in rep.stages if s.status == "fail"), None)
            # the reason first: the peers exit on the abort, and the service reads it before their exits
            conn.send(("failed", f"self-test failed: {bad.name}: {bad.message}" if bad else "self-test failed"))
            ctl.bcast({"op": "abort"})
            return
        pipeline, runtime = test.ctx.pipeline, test.ctx.runtime
    else:
        from gpubake.provisioning.pipeline import load_serving_pipeline

        loaded = load_serving_pipeline(spec.model_dir, spec.device, spec.pipeline_loader)
        pipeline, runtime = loaded.pipe, loaded.runtime()
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    limits = limits_for(pipeline, spec.device, model, **spec.limit_overrides)
    split = ((runtime or {}).get("applied") or {}).get("parallel")
    gen = LockstepGenerator(pipeline, model, limits, ctl, list(spec.devices), split)
    conn.send(("ready", {"limits": limits.to_dict(), "two_experts": gen.two_experts, "runtime": runtime}))
    store = JobStore(spec.data_dir / DB_NAME)
    try:
        while True:
            if conn.poll(IDLE_SECONDS):
                try:
                    msg = conn.recv()
                except EOFError:  # the service is gone
                    msg = ("stop",)
                if msg[0] == "stop":
                    break
            job = store.claim_next()
            if job is None:
                ctl.bcast({"op": "idle"})
                continue
            conn.send(("job", job.id))
            execute_job(store, gen, job, spec.data_dir, spec.min_free_bytes, spec.group)
            conn.send(("job_done", job.id))
    finally:
        store.close()
    ctl.bcast({"op": "stop"})


def _follower(spec: RankSpec, conn: Any, ctl: _Ctl) -> None:
    """Ranks 1..N-1: render what rank 0 broadcasts, on their own device."""
    from gpubake.provisioning.models import model_for
    from gpubake.provisioning.serving.limits import limits_for
    from gpubake.provisioning.serving.schemas import ResolvedRequest

    model = model_for(spec.facts.model.id, spec.facts.model.recipe)
    with tempfile.TemporaryDirectory(prefix=f"gpubake-g{spec.group}r{spec.rank}-") as scratch:
        if spec.selftest:
            if ctl.bcast()["op"] != "selftest":
                return
            from gpubake.smoke_tests.stages import render_stage

            test = _selftest(spec, Path(scratch) / "selftest-clip")
            test.ctx.device = spec.device
            test.ctx.mode = "gpu" if spec.device.startswith("cuda") else "cpu"
            result = render_stage(test.ctx)
            ctl.gather((result.status, result.message))
            if result.status == "fail":
                return
            pipeline = test.ctx.pipeline
        else:
            from gpubake.provisioning.pipeline import load_serving_pipeline

            pipeline = load_serving_pipeline(spec.model_dir, spec.device, spec.pipeline_loader).pipe
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        gen = Generator(pipeline, model, limits_for(pipeline, spec.device, model, **spec.limit_overrides))
        conn.send(("ready", {}))
        while True:
            msg = ctl.bcast()
            if msg["op"] in ("stop", "abort"):
                return
            if msg["op"] != "job":
                continue
            err: str | None = None
            try:
                gen.run(ResolvedRequest.from_dict(msg["request"]), Path(scratch) / "job")
            except Exception as exc:
                log.exception("rank %d: job failed", spec.rank)
                err = one_line(exc, limit=400)
            shutil.rmtree(Path(scratch) / "job", ignore_errors=True)  # rank 0 writes the clip
            ctl.gather(err)


def rank_main(spec: RankSpec, conn: Any) -> None:
    """A rank process: join the group's process group, then lead (rank 0) or follow."""
    _die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO,
                        format=f"[group {spec.group} rank {spec.rank}] %(levelname)s %(name)s: %(message)s")
    code = 0
    try:
        import torch
        import torch.distributed as dist

        on_gpu = spec.device.startswith("cuda:")
        if on_gpu:
            torch.cuda.set_device(spec.device)
        else:  # CPU ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{spec.port}",
                                rank=spec.rank, world_size=spec.world)
        ctl = _Ctl(dist.new_group(backend="gloo") if on_gpu else dist.group.WORLD, spec.world)
        (_leader if spec.rank == 0 else _follower)(spec, conn, ctl)
    except BaseException as exc:  # noqa: BLE001 - one line to the service, then exit
        logging.getLogger("gpubake.serve").exception("rank %d failed", spec.rank)
        code = 1
        try:
            conn.send(("failed", f"rank {spec.rank} ({spec.device}): {one_line(exc, limit=400)}"))
        except OSError:
            pass
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
    os._exit(code)  # no atexit: a peer that is gone must not hold this one in a collective's teardown

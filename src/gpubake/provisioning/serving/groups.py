"""One clip across a group of GPUs (issue 15): `gpubake serve --gpus-per-clip N`.

The worker pool (`service`) renders one clip per GPU; a group renders ONE clip on N GPUs
at once, through diffusers' context parallelism as `provisioning.parallel` plans and
applies it (the runtime plan's ``parallel`` lever: Ulysses where the model's heads
divide by N, else ring). torch.distributed needs one process per GPU (NCCL has no
single-process multi-device mode), so each group is N processes, spawned and watched by
the service process, which keeps the HTTP front, the limits, /health and the report:

* rank 0 claims jobs from the one SQLite queue (`JobStore.claim_next`, safe across
  processes), broadcasts the resolved request to its peers over a gloo group
  (``broadcast_object_list``; an ``idle`` tick while the queue is empty keeps the peers'
  wait far inside the collective timeout), every rank runs the same render
  (`Generator.run`, under the plan's ``parallel``), rank 0 writes the video and records
  the job (`service.execute_job`, the pool's own code); the peers' outcome is gathered
  after each job, so a rank that failed is named in the job's error;
* at boot the group's ranks load and render the self-test clip together: rank 0 runs the
  self-test (group 0 the whole one, the others their own GPUs' stages), its render stage
  first tells the peers to run the same `render_stage` on their devices and then gathers
  their outcome; without a self-test every rank loads `load_serving_pipeline`;
* the service process talks to each rank over a pipe (reports, ready, the job it runs)
  and watches their process sentinels: a rank that dies takes its group out of service
  (the others ranks are ended; the running job fails with one line naming the rank and
  how it died; /health shows the group failed); when no group is left the service
  refuses generation. Ranks end with the service (`stop`), and die with it if it is
  killed (PR_SET_PDEATHSIG).

On the CPU (tests) a group is N CPU processes over gloo: ``--device cpu --gpus-per-clip 2``.
This module is the planning and the service side; the rank processes are `group_ranks`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubake import envs
from gpubake.errors import GpubakeError
from gpubake.provisioning.serving.generate import Generator
from gpubake.provisioning.serving.limits import Limits
from gpubake.provisioning.serving.group_ranks import RankSpec, rank_main
from gpubake.provisioning.serving.service import GenerationService, Worker

log = logging.getLogger("gpubake.serve")
STOP_SECONDS = 10.0  # a group gets this long to end cleanly at shutdown, then is killed


class GroupsError(GpubakeError):
    """--gpus-per-clip cannot split this machine's GPUs, or the model or plan cannot be split so."""


# ------------------------------------------------------------------------ planning (no torch needed)


def model_heads(model_dir: Path) -> int | None:
    """The attention heads of the checkpoint's transformer (its diffusers config), None if unknown."""
    try:
        cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = cfg.get("num_attention_heads") if isinstance(cfg, dict) else None
    return heads if isinstance(heads, int) and heads > 0 else None


def group_devices(gpus_per_clip: int, workers: int | str, device: str | None, gpu_image: bool) -> list[list[str]]:
    """The devices of each group (one per rank). On GPUs: the GPUs torch sees, in groups of
    `gpus_per_clip` (which must divide them); `workers` N: the first N groups. With
    ``--device cpu``: `workers` groups (auto: one) of `gpus_per_clip` CPU processes."""
    n = gpus_per_clip
    if not isinstance(n, int) or n < 2:
        raise GroupsError(f"--gpus-per-clip: a group needs 2 or more, got {n!r}")
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise GroupsError(f"--workers: auto or a number >= 1, got {workers!r}")
    if device == "cpu":
        return [["cpu"] * n for _ in range(1 if workers == "auto" else int(workers))]
    if device is not None and device != "cuda":
        raise GroupsError(f"--gpus-per-clip {n} with --device {device}: a group needs {n} GPUs "
                          "(leave --device out, or --device cpu for CPU processes)")
    count = 0
    if gpu_image:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < n:
        seen = f"torch sees {count} GPU(s) here" if gpu_image else "a CPU-only image uses no GPU"
        raise GroupsError(f"--gpus-per-clip {n}: {seen}; pass --device cpu for a group of CPU processes")
    if count % n:
        raise GroupsError(f"--gpus-per-clip {n}: does not divide the {count} GPUs torch sees "
                          "(CUDA_VISIBLE_DEVICES picks them)")
    groups = count // n if workers == "auto" else int(workers)
    if groups * n > count:
        raise GroupsError(f"--workers {groups} --gpus-per-clip {n}: needs {groups * n} GPUs, torch sees {count}")
    return [[f"cuda:{g * n + r}" for r in range(n)] for g in range(groups)]


def check_split(gpus_per_clip: int, heads: int | None) -> str:
    """The split each clip gets (``ulysses:N`` / ``ring:N``) under $GPUBAKE_RUNTIME, or a
    one-line error: a ``parallel`` lever that is off or of another degree, or Ulysses asked
    for by name over heads that do not divide by N (the plan alone would take ring)."""
    from gpubake.kernels.backends import default_backend_name
    from gpubake.provisioning.parallel import Parallel, parallel_for
    from gpubake.provisioning.runtime import plan_from_env

    n = gpus_per_clip
    raw = envs.GPUBAKE_RUNTIME.strip()
    plan = plan_from_env("cpu", gemm_backend=default_backend_name(None), world_size=n)
    par = Parallel.parse(plan.parallel)
    if par.degree != n:
        raise GroupsError(f"GPUBAKE_RUNTIME={raw!r}: parallel={par}, but --gpus-per-clip {n} splits each clip "
                          f"across {n} processes; leave parallel out or set parallel=ulysses:{n} or ring:{n}")
    if par.kind == "ulysses" and heads is not None and heads % n:
        if "parallel" in raw:
            raise GroupsError(f"--gpus-per-clip {n}: parallel=ulysses:{n} needs the model's attention heads to "
                              f"divide by {n}, it has {heads}; set parallel=ring:{n} or another --gpus-per-clip")
        par, _ = parallel_for(n, heads=heads)  # ring: what enable_context_parallel falls back to
    return str(par)


# ------------------------------------------------------------------------ the service side


class GroupGenerator(Generator):
    """The service process's view of a group's pipeline: defaults, limits and request
    resolution (what `Generator` does without the weights); the render is rank 0's."""

    step_cache_refused = ("this service splits each clip across a group of GPUs, and a step cache cannot run "
                          "with that (a skipped forward bypasses the split)")

    def __init__(self, model: Any, limits: Limits, two_experts: bool) -> None:  # noqa: D107 - no pipeline here
        self.pipeline = None
        self.model = model
        self.recipe = model.recipe
        self.limits = limits
        self.two_experts = two_experts

    def run(self, args: Any, out_dir: Path) -> Any:
        raise RuntimeError("a GPU group renders in its own processes (rank 0 claims the job)")


@dataclass
class GroupWorker(Worker):
    """A group of the service: its devices, processes and the split its clips get."""

    devices: list[str] = field(default_factory=list)
    procs: list[Any] = field(default_factory=list)  # multiprocessing.Process, one per rank
    conns: list[Any] = field(default_factory=list)  # the service's end of each rank's pipe
    runtime: dict[str, Any] | None = None  # rank 0's plan and what was applied
    failed_ranks: set[int] = field(default_factory=set)  # ranks that reported a failure before exiting
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return ",".join(self.devices)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        rt = self.runtime or {}
        d.update({"device": self.label, "devices": list(self.devices), "gpus_per_clip": len(self.devices),
                  "pids": [p.pid for p in self.procs],
                  "parallel": (rt.get("applied") or {}).get("parallel"),
                  "plan": {k: (rt.get("plan") or {}).get(k) for k in ("parallel", "attention", "notes")} if rt
                  else None})
        return d


def _loads_in_group_processes(_device: str | None) -> tuple[Any, str]:
    raise RuntimeError("a GPU group loads its pipeline in its own processes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _how(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class GroupService(GenerationService):
    """The generation service whose workers are groups of rank processes (`--gpus-per-clip`)."""

    def __init__(self, *, groups: Sequence[Sequence[str]], facts: Any, model_dir: Path, selftest: bool,
                 quick: bool = False, selftest_kwargs: dict[str, Any] | None = None,
                 group_pipeline_loader: Any = None, split: str = "", **kw: Any) -> None:
        super().__init__(devices=[None] * len(groups), pipeline_loader=_loads_in_group_processes,
                         model_dir=None if selftest else model_dir, **kw)
        self.workers = [GroupWorker(i, None, devices=list(d)) for i, d in enumerate(groups)]
        self.gpus_per_clip = len(groups[0])
        self.facts, self.group_model_dir, self.group_selftest = facts, Path(model_dir), selftest
        self.quick, self.selftest_kwargs = quick, dict(selftest_kwargs or {})
        self.group_pipeline_loader = group_pipeline_loader
        self.split = split  # the split check_split expects (rank 0's applied one is in each worker)

    # ------------------------------------------------------------ boot and supervision

    def _preflight(self) -> None:
        if self.group_selftest:
            self.phase = "selftest"
            return
        super()._preflight()

    def _spec(self, w: GroupWorker, rank: int, port: int) -> RankSpec:
        clip = self.report_path.parent if self.report_path is not None else self.data_dir
        return RankSpec(group=w.index, rank=rank, devices=tuple(w.devices), port=port, facts=self.facts,
                        model_dir=self.group_model_dir, data_dir=self.data_dir,
                        clip_dir=clip / ("selftest-clip" if w.index == 0 else f"selftest-clip-{w.index}"),
                        selftest=self.group_selftest, whole_selftest=w.index == 0, quick=self.quick,
                        selftest_kwargs=self.selftest_kwargs, pipeline_loader=self.group_pipeline_loader,
                        limit_overrides={k: v for k, v in self._limit_overrides.items() if v is not None},
                        min_free_bytes=self.min_free_bytes, parent_pid=os.getpid())

    def _spawn(self, w: GroupWorker) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        for rank in range(len(w.devices)):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(self._spec(w, rank, port), theirs),
                            name=f"gpubake-group{w.index}-rank{rank}")
            p.start()
            theirs.close()
            w.procs.append(p)
            w.conns.append(ours)
        log.info("group %d: %d rank processes on %s (pids %s)", w.index, len(w.procs), w.label,
                 ", ".join(str(p.pid) for p in w.procs))

    def _send(self, w: GroupWorker, msg: tuple[Any, ...]) -> None:
        with w.send_lock:
            try:
                w.conns[0].send(msg)
            except (OSError, IndexError):
                pass  # rank 0 is gone: its sentinel says so

    def _messages(self, w: GroupWorker, timeout: float) -> list[tuple[int, tuple[Any, ...]]]:
        """(rank, message) that arrived within `timeout`; a closed pipe yields nothing."""
        from multiprocessing.connection import wait

        live = [c for c in w.conns if not c.closed]
        wait([*live, *(p.sentinel for p in w.procs)], timeout)
        got = []
        for rank, c in enumerate(w.conns):
            try:
                while not c.closed and c.poll(0):
                    got.append((rank, c.recv()))
            except (EOFError, OSError):
                c.close()
        return got

    def _dead(self, w: GroupWorker) -> tuple[int, Any] | None:
        """A rank that has exited: first one that died without saying why (the cause; the
        others fail after it, reporting the collective it broke)."""
        dead = [(r, p) for r, p in enumerate(w.procs) if not p.is_alive()]
        return next((d for d in dead if d[0] not in w.failed_ranks), dead[0] if dead else None)

    def _boot(self, w: Worker) -> None:
        assert isinstance(w, GroupWorker)
        w.device = w.label
        w.phase = "selftest" if self.group_selftest else "starting"
        self._spawn(w)
        ready: set[int] = set()
        while not self._stopping:
            if self._boot_messages(w, self._messages(w, 1.0), ready):
                return
            if len(ready) == len(w.procs):
                split = (w.runtime or {}).get("applied", {}).get("parallel", {})
                log.info("group %d ready: %s on %s, one clip split %s", w.index, self.model.id, w.label,
                         split.get("parallel") if isinstance(split, dict) else split)
                w.phase = "ready"
                return
            dead = self._dead(w)
            # a peer ends on rank 0's abort, which follows rank 0's reason: read what is left first
            if dead is not None and self._boot_messages(w, self._messages(w, 0.0), ready):
                return
            if dead is not None:
                rank, p = dead
                w.fail(f"rank {rank} ({w.devices[rank]}, pid {p.pid}) exited during the boot ({_how(p.exitcode)})")
                self._end_group(w)
                return
        w.fail("stopped during the boot")

    def _boot_messages(self, w: GroupWorker, messages: list[tuple[int, tuple[Any, ...]]], ready: set[int]) -> bool:
        """Apply the boot's messages; True once a rank said the group failed (then it is ended)."""
        for rank, msg in messages:
            if msg[0] == "report":
                from gpubake.smoke_tests.report import Report

                w.report = Report.from_json(msg[1])
                self._publish()
            elif msg[0] == "failed":
                w.fail(msg[1])
                self._end_group(w)
                return True
            elif msg[0] == "ready":
                ready.add(rank)
                if rank == 0:
                    info = msg[1]
                    w.runtime = info.get("runtime")
                    w.generator = GroupGenerator(self.model, Limits(**info["limits"]), info["two_experts"])
        return False

    def _loop(self, w: Worker) -> None:
        assert isinstance(w, GroupWorker)
        self._prune()
        while not self._stopping:
            self._loop_messages(w, self._messages(w, 1.0))
            if self._dead(w) is None or self._stopping:
                continue
            self._loop_messages(w, self._messages(w, 0.0))  # what the ranks said before they exited
            dead = self._dead(w)  # the cause, now that every rank's last word is read
            assert dead is not None
            self._group_died(w, *dead)
            return

    def _loop_messages(self, w: GroupWorker, messages: list[tuple[int, tuple[Any, ...]]]) -> None:
        for rank, msg in messages:
            if msg[0] == "job":
                w.job_id = msg[1]
            elif msg[0] == "job_done":
                w.job_id = None
                w.jobs_done += 1
                self._prune()
            elif msg[0] == "failed":
                w.failed_ranks.add(rank)  # it exits next: a consequence, unless no other rank died
                log.error("group %d: %s", w.index, msg[1])

    def _group_died(self, w: GroupWorker, rank: int, proc: Any) -> None:
        """A rank died: end its peers, fail the job it was rendering, take the group out."""
        how = f"rank {rank} ({w.devices[rank]}, pid {proc.pid}) died ({_how(proc.exitcode)})"
        job_id = w.job_id
        self._end_group(w)
        if job_id is not None:
            job = self.store.get(job_id)
            if job is not None and job.status != "done":
                job.status, job.finished_at = "failed", time.time()
                job.error = (f"group {w.index} ({w.label}): {how} while rendering this job; "
                             "the group is out of service, submit the job again")
                job.result = None
                shutil.rmtree(self.jobs_dir / job.id, ignore_errors=True)
                job.bytes = 0
                self.store.update(job)
                log.error("job %s: %s", job.id, job.error)
            w.job_id = None
        w.fail(f"{how}; out of service")
        if not any(x.phase == "ready" for x in self.workers):
            self._fail("every group is out of service: " + "; ".join(
                f"group {x.index} ({x.device}): {x.reason}" for x in self.workers))
        if self.workers[0].report is not None:
            self._publish()

    def _end_group(self, w: GroupWorker, deadline: float = 0.0) -> None:
        """End the group's processes: until `deadline` (monotonic) to exit, then SIGKILL; reaped."""
        for p in w.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in w.procs:
            if p.is_alive():
                p.kill()
        for p in w.procs:
            p.join(5)
        for c in w.conns:
            c.close()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        for w in self.workers:
            if isinstance(w, GroupWorker) and w.procs:
                self._send(w, ("stop",))
        deadline = time.monotonic() + STOP_SECONDS  # one grace for all groups: they stop at once
        for w in self.workers:
            if isinstance(w, GroupWorker) and w.procs:
                self._end_group(w, deadline)
        super().stop(timeout)

    # ------------------------------------------------------------ API

    def submit(self, args: Any) -> Any:
        job = super().submit(args)
        for w in self.workers:
            if isinstance(w, GroupWorker) and w.phase == "ready":
                self._send(w, ("wake",))
        return job

    def health(self, full: bool = True) -> dict[str, Any]:
        body = super().health(full)
        if full:
            body["gpus_per_clip"] = self.gpus_per_clip
        return body

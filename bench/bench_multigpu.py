"""Several GPUs in one instance (issue 15): clip time on one GPU against one clip split
across N (diffusers' context parallelism, Ulysses and ring, `gpubake.provisioning.parallel`),
and the worker pool's throughput (every GPU renders its own clip at once, as `gpubake
serve` runs one worker per GPU). Launched by torchrun, one process per GPU:

    torchrun --standalone --nproc-per-node 2 bench/bench_multigpu.py --out $OUT          # 2 GPUs
    torchrun --standalone --nproc-per-node 8 bench/bench_multigpu.py --out $OUT --sizes 480p
    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/bench_multigpu.py --small --out /tmp/o

The model is a full-size Wan 2.2 T2V-A14B expert with random weights (built on each GPU
from one seed in BF16, quantized to NVFP4 in place with `quantize_model_inplace`, as
bench/selftest_a14b_device.py builds its checkpoint; then broadcast from rank 0 so every
rank holds the same bytes); the second expert is a copy of it (same step cost, the
real pipeline shape); the VAE is the Wan 2.1 VAE at its real config (random); the text
is random UMT5-sized embeddings (the text encoder is not what is measured). Each mode
gets a fresh copy of the experts and the runtime plan `gpubake serve` would apply:

* ``single``: rank 0 alone, the one-GPU plan (8-bit attention where the GPU has it);
* ``single-bf16-attention``: the same with BF16 attention, the kernel CP falls back to
  (so the CP speed-up is not mixed with the attention kernel's);
* ``pool``: every rank renders its own clip at the same time: clips per hour;
* ``ulysses:N`` / ``ring:N``: one clip across the N ranks (``parallel`` lever).

Timed: ``--steps`` denoising steps (CFG: two forwards each) and the VAE decode, after a
warm-up clip of the same shape (compile, autotuning); ``projected_clip_seconds`` adds
the model's real step count (40) at the measured per-step time. The VAE decode is not
split (diffusers' CP covers the transformer): every rank decodes the whole clip.
Frames are compared with ``single``'s (``max_abs_diff_vs_single``, frames in [0, 1]).
``--small``: the tiny model on the CPU over gloo (what tests/perf/test_bench_multigpu.py
runs, so the script is known to work before a GPU run).

Rank 0 writes ``$OUT/multigpu-<N>gpu.json`` after every mode (a cut-off run keeps what it
measured; a later launch with the same --out appends to it), and ``single-<size>.pt`` (the
one-GPU clip and its times), which a later launch without ``single`` compares against:
bench/bench_multigpu.sh runs the modes in several launches to fit the 10-minute limit.
A mode that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SIZES = {"480p": (832, 480), "720p": (1280, 720), "small": (32, 32)}
REAL_STEPS = 40
TEXT_TOKENS = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench-multigpu")))
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU over gloo (a smoke test)")
    ap.add_argument("--sizes", default=None, help="comma-separated: 480p, 720p (default both; --small: small)")
    ap.add_argument("--frames", type=int, default=None, help="default 81 (--small: 9)")
    ap.add_argument("--steps", type=int, default=None, help="timed denoising steps (default 4; --small: 2)")
    ap.add_argument("--modes", default="single,single-bf16-attention,pool,ulysses,ring")
    ap.add_argument("--runtime", default="", help="extra levers, as $GPUBAKE_RUNTIME (e.g. compile_blocks=0)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up clip (compile is then timed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-min", type=float, default=30.0, help="process-group timeout")
    return ap.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[int, int, str]:
    import torch
    import torch.distributed as dist

    backend = "gloo" if args.small else "nccl"
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not args.small:
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.timeout_min))
    return rank, world, "cpu" if args.small else f"cuda:{local}"


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[bench_multigpu] {msg}", flush=True)


def broadcast_module(module: Any) -> None:
    """Every parameter and buffer of `module` from rank 0 (bytes: uint8 / float8 included)."""
    import torch
    import torch.distributed as dist

    for t in [*module.parameters(), *module.buffers()]:
        flat = t.data.view(torch.uint8) if t.element_size() == 1 else t.data
        dist.broadcast(flat, src=0)


def build(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The expert (NVFP4), the VAE, the scheduler and random text embeddings, on `device`."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from gpubake.provisioning import tiny
    from gpubake.provisioning.quantize import quantize_model_inplace

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_quantize import expert_config

    cfg = dict(tiny.TRANSFORMER_CONFIG) if args.small else {
        k: v for k, v in expert_config("wan2.2-t2v-a14b").items() if not k.startswith("_")}
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        expert = WanTransformer3DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    quantize_model_inplace(expert, "default")
    broadcast_module(expert)
    torch.manual_seed(args.seed + 2)
    vae = (AutoencoderKLWan(**tiny.VAE_CONFIG) if args.small else AutoencoderKLWan()).to(device).eval()
    broadcast_module(vae)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=tiny.FLOW_SHIFT, num_train_timesteps=1000)
    g = torch.Generator().manual_seed(args.seed + 3)
    text = [torch.randn(1, TEXT_TOKENS, cfg["text_dim"], generator=g).to(device, torch.bfloat16) for _ in range(2)]
    return {"expert": expert, "vae": vae, "scheduler": sched, "text": text, "heads": cfg["num_attention_heads"]}


def pipeline(parts: dict[str, Any]) -> Any:
    """A WanPipeline on fresh copies of the expert (two experts, as A14B) and the shared VAE."""
    from diffusers import WanPipeline

    from gpubake.provisioning.models import get_model

    first = copy.deepcopy(parts["expert"])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=parts["vae"], scheduler=copy.deepcopy(parts["scheduler"]),
                       transformer=first, transformer_2=copy.deepcopy(parts["expert"]),
                       boundary_ratio=get_model("wan2.2-t2v-a14b").boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip(pipe: Any, parts: dict[str, Any], width: int, height: int, frames: int, steps: int, seed: int,
         device: str) -> dict[str, Any]:
    """One clip, timed like `provisioning.render.render` (per-step stamps, then the decode)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    stamps: list[float] = []

    def on_step_end(_pipe: Any, step: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        sync()
        stamps.append(time.perf_counter())
        return kw

    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe(prompt_embeds=parts["text"][0], negative_prompt_embeds=parts["text"][1], height=height,
                   width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=4.0,
                   guidance_scale_2=3.0, generator=torch.Generator().manual_seed(seed), output_type="pt",
                   callback_on_step_end=on_step_end)
    sync()
    end = time.perf_counter()
    steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
    per_step = sorted(steps_s)[len(steps_s) // 2] if steps_s else stamps[0] - start
    return {"frames": out.frames[0].float().cpu(), "total_seconds": end - start,
            "first_step_seconds": stamps[0] - start, "seconds_per_step": per_step,
            "step_seconds": [round(s, 4) for s in steps_s], "decode_seconds": end - stamps[-1]}


def plan(args: argparse.Namespace, device: str, mode: str, world: int) -> Any:
    from gpubake.provisioning.runtime import plan_from_env

    extra = [args.runtime] if args.runtime else []
    if mode == "single-bf16-attention":
        extra.append("attention=default")
    elif mode in ("ulysses", "ring"):
        extra.append(f"parallel={mode}:{world}")
    return plan_from_env(device, ",".join(extra) or "auto", world_size=1)


def run_mode(args: argparse.Namespace, parts: dict[str, Any], mode: str, rank: int, world: int, device: str,
             size: str, ref: dict[str, Any] | None) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from gpubake.provisioning.parallel import clip_tokens
    from gpubake.provisioning.runtime import apply_runtime

    width, height = SIZES[size]
    frames = args.frames or (9 if args.small else 81)
    steps = args.steps or (2 if args.small else 4)
    tokens = clip_tokens(width, height, frames)
    row: dict[str, Any] = {"mode": mode if mode not in ("ulysses", "ring") else f"{mode}:{world}", "size": size,
                           "width": width, "height": height, "frames": frames, "tokens": tokens, "steps": steps}
    alone = mode.startswith("single")
    if alone and rank != 0:
        dist.barrier()
        return row
    p = plan(args, device, mode, world)
    row["plan"] = dataclasses.asdict(p)
    pipe = pipeline(parts)
    done = apply_runtime(pipe, p, clip_tokens=tokens if p.parallel != "none" else None)
    row["parallel"] = done.get("parallel")
    if not args.no_warmup:
        clip(pipe, parts, width, height, frames, steps, args.seed, device)
    if mode == "pool":
        dist.barrier()  # every rank starts its clip at the same moment
    t0 = time.perf_counter()
    got = clip(pipe, parts, width, height, frames, steps, args.seed, device)
    wall = time.perf_counter() - t0
    frames_t = got.pop("frames")
    row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in got.items()})
    row["projected_clip_seconds"] = round(got["first_step_seconds"] + (REAL_STEPS - 1) * got["seconds_per_step"]
                                          + got["decode_seconds"], 2)
    if mode == "pool":
        walls: list[Any] = [None] * world
        dist.all_gather_object(walls, wall)
        row["wall_seconds_per_rank"] = [round(w, 3) for w in walls]
        row["clips_per_hour"] = round(world * 3600 / max(walls), 2)
    if ref is not None and rank == 0:
        row["max_abs_diff_vs_single"] = float((frames_t - ref["frames"].float()).abs().max())
    if rank == 0 and mode == "single":
        row["_frames"] = frames_t
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if alone:
        dist.barrier()
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.small:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import torch.distributed as dist

    from gpubake.fsutil import write_json_atomic

    rank, world, device = setup(args)
    sizes = (args.sizes or ("small" if args.small else "480p,720p")).split(",")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out = args.out / f"multigpu-{world}{'cpu' if args.small else 'gpu'}.json"
    launch = " ".join([os.path.basename(sys.executable), *sys.argv])
    result: dict[str, Any] = {
        "command": launch, "world_size": world,
        "device": "cpu (gloo)" if args.small else torch.cuda.get_device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "runs": []}
    if out.is_file():  # an earlier launch of the same run: keep its rows
        result = {**json.loads(out.read_text()), "command": launch}
    result.setdefault("launches", []).append(launch)
    t0 = time.perf_counter()
    parts = build(args, device)
    result["build_seconds"] = round(time.perf_counter() - t0, 2)
    log(rank, f"built on {world} ranks in {result['build_seconds']} s")
    for size in sizes:
        saved = args.out / f"single-{size}.pt"
        ref = torch.load(saved, weights_only=True) if rank == 0 and "single" not in modes and saved.is_file() else None
        for mode in modes:
            try:
                row = run_mode(args, parts, mode, rank, world, device, size, ref)
            except Exception as exc:  # recorded; the other modes still run
                row = {"mode": mode, "size": size, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
                       "traceback": traceback.format_exc(limit=6).splitlines()[-8:]}
                if mode.startswith("single") and rank == 0:
                    dist.barrier()  # the other ranks wait there for rank 0
            if rank == 0:
                if "_frames" in row:
                    ref = {"frames": row.pop("_frames"), "total": row["total_seconds"],
                           "per_step": row["seconds_per_step"]}
                    args.out.mkdir(parents=True, exist_ok=True)
                    torch.save({**ref, "frames": ref["frames"].half()}, saved)
                if ref is not None and "seconds_per_step" in row and row["mode"] != "single":
                    row["step_speedup_vs_single"] = round(ref["per_step"] / row["seconds_per_step"], 3)
                    row["clip_speedup_vs_single"] = round(ref["total"] / row["total_seconds"], 3)
                    if "clips_per_hour" in row:
                        row["throughput_vs_single"] = round(row["clips_per_hour"] / (3600 / ref["total"]), 3)
                result["runs"].append(row)
                write_json_atomic(out, result)
                log(rank, json.dumps({k: v for k, v in row.items() if k not in ("plan", "traceback")}))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(f"[bench_multigpu] wrote {out}", flush=True)


if __name__ == "__main__":
    main()

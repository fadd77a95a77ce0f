"""Benchmark (issue 18): seconds per WHOLE clip (text encoder + denoise + VAE decode) of
gpubake's serving pipeline against the strongest peer stack, in one process on one GPU.

    python bench/bench_clip.py --out $OUT --root /tmp/bc --steps 4 --mem-cap 23.5     # H200
    python bench/bench_clip.py --out $OUT --root /tmp/bc --steps 4 --sizes 720p       # second call
    python bench/bench_clip.py --small --out /tmp/o --root /tmp/r --720p --mem-cap 23.5  # CPU, tiny

What runs, in this order (docs/benchmarks.md, "Per clip (issue 18)"):
1. One BF16 expert E, built on the device from --seed exactly as bench/selftest_a14b_device.py
   builds it (the real A14B config; `--small`: the tiny config on the CPU). Its eager
   noise prediction on fixed inputs (random latent of the clip's shape, two random 512-token
   contexts, t=900: both CFG passes) is the BF16 baseline every case's error is measured against.
2. The checkpoint under --root/model (reused when present and written from the same E): a
   copy of E quantized to NVFP4 and stored as both experts, UMT5-XXL and the Wan VAE at
   their real configs, random (selftest_a14b_device.build_checkpoint). E itself stays BF16
   in memory: no BF16 copy on disk.
3. `peer`: diffusers' WanPipeline from the same checkpoint's encoder/VAE/scheduler with E
   and a copy of E as its experts, plus the peer levers: torchao float8 rowwise dynamic
   (W8A8) on the blocks' linears, gpubake's FA3 FP8 self-attention, `compile_repeated_blocks`.
4. `gpubake`: `load_serving_pipeline` (the service's loader and runtime plan, $GPUBAKE_RUNTIME
   or --runtime) on the checkpoint.
4c. `fp8`: the same plan on the FP8-weight checkpoint of the same E (--root/model-fp8,
   `quantize --format fp8`'s layout: E4M3 weights, one scale per row; W8A8 `scaled-mm` on
   FP8 tensor cores, the peer's recipe in gpubake's own kernels), its error measured alike.
5. `cap` (with --mem-cap GIB): the process capped with `set_per_process_memory_fraction`, the
   small-card plan (--cap-runtime), one clip; peak reserved + the CUDA context from NVML.
4b. `gpubake+LEVER=VALUE` (each --variant, after its gpubake case, on the same pipeline): one
   issue-18 lever changed (CFG truncation, the step cache; bench/clip_variants.py), with its
   block counts and its error against the gpubake case's clip.
Each case renders through `provisioning.render.render` (what the service and the self-test
call) at the model's (or --recipe's) defaults: a warm-up clip (compile, first weight
preparation) reported apart, then a timed clip of the same parameters. --steps N keeps the
run short; the clip at the recipe's step count is then EXTRAPOLATED as
text encoder + VAE decode + steps x median step, and marked so. Errors are each stack's
noise prediction on the baseline's inputs against the baseline's.

Peaks: `max_memory_allocated` / `max_memory_reserved` of each clip (reset before it), with
the case's weights resident. The JSON is rewritten after every case, so a run killed at its
time limit keeps what it measured; --budget-s skips a case whose expected cost (from the
cases already measured) would overrun it. Videos go under --root/clips, not to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from gpubake.errors import GpubakeError, one_line  # noqa: E402  (light: no torch)

SIZES = {"480p": (480, 832), "720p": (720, 1280)}  # (height, width)
SMALL_SIZES = {"480p": (32, 48), "720p": (32, 64)}  # --small: the same two cases, tiny
FRAMES, SMALL_FRAMES = 81, 5
TEXT_LEN = 512  # Wan pads every prompt to 512 tokens
PROMPT = "a red fox running through fresh snow, golden hour"
CASES = ("peer", "gpubake", "fp8", "cap")
PEER_LEVERS = ("fp8", "fa3", "compile")  # torchao W8A8 rowwise, FA3 FP8 self-attention, regional compile
SMALL_CARD_RUNTIME = "text_encoder=shrink,vae_tiling=1,expert_offload=1"  # runtime.py's levers for cards under 28 GiB (24 GB)
GIB = 2**30
# Budget guesses (H200) for a size nothing has measured yet: (compile s, s of a clip outside
# its steps, s of a guided step); replaced by the first measured case of that size.
FIRST_CASE_GUESS = {"480p": (90.0, 10.0, 3.7), "720p": (90.0, 25.0, 15.0)}


class BenchError(GpubakeError):
    """A bad flag of bench_clip.py (one line, exit 2)."""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="folder for bench_clip.json (default: $OUT)")
    ap.add_argument("--root", type=Path, required=True, help="checkpoint (ROOT/model, reused) and clips (ROOT/clips)")
    ap.add_argument("--small", action="store_true", help="the tiny model on the CPU: same code paths, GPU-only levers skipped")
    ap.add_argument("--sizes", default="480p", help="comma-separated from 480p, 720p")
    ap.add_argument("--720p", dest="add_720p", action="store_true", help="also 720x1280 (same as adding 720p to --sizes)")
    ap.add_argument("--cases", default="peer,gpubake", help=f"comma-separated from {', '.join(CASES)} (cap: with --mem-cap)")
    ap.add_argument("--recipe", help="sampling recipe of the model registry (default: the model's own)")
    ap.add_argument("--steps", type=int, help="denoising steps of each clip (default: the recipe's); >= 2")
    ap.add_argument("--warmup-steps", type=int,
                    help="steps of the warm-up clip (default: --steps; fewer saves time, but every expert must "
                         "run in it: the timed clip's dynamo_frames_compiled says whether one compiled late)")
    ap.add_argument("--guidance", type=float, help="guidance scale of the high-noise expert (default: the recipe's)")
    ap.add_argument("--guidance-2", type=float, help="guidance scale of the low-noise expert (default: the recipe's)")
    ap.add_argument("--frames", type=int, help=f"frames per clip (default {FRAMES}; --small: {SMALL_FRAMES})")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (the clip's seed is 1234)")
    ap.add_argument("--runtime", default=None, help="$GPUBAKE_RUNTIME for the gpubake case (default: as set, else auto)")
    ap.add_argument("--peer-levers", default=",".join(PEER_LEVERS),
                    help=f"comma-separated from {', '.join(PEER_LEVERS)} ('' for plain diffusers BF16)")
    ap.add_argument("--mem-cap", type=float, help="GiB: run the cap case capped to this (set_per_process_memory_fraction)")
    ap.add_argument("--cap-runtime", default=SMALL_CARD_RUNTIME, help="$GPUBAKE_RUNTIME of the cap case")
    ap.add_argument("--time-bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one BF16 eager guided step at 480p (outside the pipeline, bench_step's protocol)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip cases that would overrun this (whole run)")
    ap.add_argument("--variant", action="append", default=[], metavar="LEVER=VALUE",
                    help="after each gpubake case, the same clip with one lever changed (bench/clip_variants.py), "
                         "e.g. cfg_until=0.5 (CFG truncation), step_cache=fbc:T (First Block Cache), "
                         "step_cache=mag:T[:K[:R]] (MagCache), sparse_keep=0.1, fuse_qkv=1; repeatable")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_args(args)
    return args


def _listed(flag: str, value: str, known: tuple[str, ...] | dict) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad:
        raise BenchError(f"{flag}: unknown {bad[0]!r} (one of {', '.join(known)})")
    return list(dict.fromkeys(items))


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before anything heavy is imported or built."""
    if args.out is None:
        raise BenchError("--out: not given and $OUT is not set")
    args.sizes = _listed("--sizes", args.sizes, SIZES)
    if args.add_720p and "720p" not in args.sizes:
        args.sizes.append("720p")
    if not args.sizes:
        raise BenchError("--sizes: names no size")
    args.cases = _listed("--cases", args.cases, CASES)
    if args.mem_cap is not None:
        if not 1.0 <= args.mem_cap <= 1024.0:
            raise BenchError(f"--mem-cap: {args.mem_cap} GiB is not in [1, 1024]")
        if "cap" not in args.cases:
            args.cases.append("cap")
    elif "cap" in args.cases:
        raise BenchError("--cases cap: needs --mem-cap GIB")
    args.peer_levers = _listed("--peer-levers", args.peer_levers, PEER_LEVERS)
    if args.steps is not None and args.steps < 2:
        raise BenchError(f"--steps: {args.steps}: at least 2 (the first step carries the text encoder)")
    if args.warmup_steps is not None and args.warmup_steps < 1:
        raise BenchError(f"--warmup-steps: {args.warmup_steps}: at least 1")
    frames = args.frames if args.frames is not None else (SMALL_FRAMES if args.small else FRAMES)
    if frames < 1 or (frames - 1) % 4:
        raise BenchError(f"--frames: {frames}: must be 4k+1 (5, 9, ... 81)")
    args.frames = frames
    for flag in ("guidance", "guidance_2"):
        g = getattr(args, flag)
        if g is not None and not 1.0 <= g <= 30.0:
            raise BenchError(f"--{flag.replace('_', '-')}: {g} is not in [1, 30]")
    if args.budget_s <= 0:
        raise BenchError(f"--budget-s: {args.budget_s} must be positive")
    from clip_variants import parse_variant

    try:
        args.variants = list({v.name: v for v in map(parse_variant, args.variant)}.values())
    except GpubakeError as exc:
        raise BenchError(f"--variant: {exc}") from None
    if args.variants and "gpubake" not in args.cases:
        raise BenchError("--variant: a variant changes the gpubake case, which --cases leaves out")


# ----------------------------------------------------------------------------- sampling


@dataclass
class Sampling:
    """What every clip of the run is rendered with: the service's defaults for the model
    (provisioning.models; a recipe when the registry has them), or the flags' overrides."""

    model_id: str
    steps: int
    recipe_steps: int  # the step count of the recipe itself: what a clip is extrapolated to
    guidance_scale: float
    guidance_scale_2: float | None
    negative_prompt: str
    fps: int
    recipe: Any = None  # models.Recipe when the registry has recipes, passed to render
    recipe_name: str | None = None
    warmup_steps: int = 0  # 0: the timed clip's

    def forwards_per_step(self) -> list[int]:
        """Transformer forwards a step runs, per expert (2 with classifier-free guidance)."""
        gs = [self.guidance_scale] + ([self.guidance_scale_2] if self.guidance_scale_2 is not None else [])
        return [2 if g > 1.0 else 1 for g in gs]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_id, "recipe": self.recipe_name, "steps": self.steps,
                "recipe_steps": self.recipe_steps, "warmup_steps": self.warmup_steps or self.steps,
                "guidance_scale": self.guidance_scale,
                "guidance_scale_2": self.guidance_scale_2, "forwards_per_step": self.forwards_per_step(),
                "negative_prompt": "the model's" if self.negative_prompt else "", "fps": self.fps}


def resolve_sampling(args: argparse.Namespace, model_id: str) -> Sampling:
    """The model's defaults (or --recipe's), changed by --steps/--guidance. Tolerant of a
    registry without recipes: then --recipe is refused and the model's own fields are used."""
    from gpubake.provisioning import models

    info = models.get_model(model_id)
    if args.recipe:
        if not hasattr(info, "with_recipe"):
            raise BenchError("--recipe: this checkout's model registry has no sampling recipes "
                             "(use --steps / --guidance)")
        info = info.with_recipe(args.recipe)  # ModelError (one line) for an unknown or misfit recipe
    recipe = getattr(info, "recipe", None)
    steps = args.steps if args.steps is not None else info.num_inference_steps
    if recipe is not None and getattr(recipe, "fixed_steps", False) and steps != recipe.steps:
        raise BenchError(f"--steps: {steps}: recipe {recipe.name!r} has a fixed schedule of {recipe.steps} steps")
    g2 = args.guidance_2 if args.guidance_2 is not None else info.guidance_scale_2
    warmup = args.warmup_steps or 0
    if warmup and recipe is not None and getattr(recipe, "fixed_steps", False) and warmup != recipe.steps:
        raise BenchError(f"--warmup-steps: {warmup}: recipe {recipe.name!r} has a fixed schedule of {recipe.steps} steps")
    return Sampling(model_id=model_id, steps=steps, recipe_steps=info.num_inference_steps, warmup_steps=warmup,
                    guidance_scale=args.guidance if args.guidance is not None else info.guidance_scale,
                    guidance_scale_2=g2 if info.experts == 2 else None, negative_prompt=info.negative_prompt,
                    fps=info.fps, recipe=recipe, recipe_name=getattr(recipe, "name", None))


def render_kwargs(smp: Sampling) -> dict[str, Any]:
    """Keyword arguments of `render`, as the service's `Generator.run` passes them."""
    from gpubake.provisioning.render import render

    kw: dict[str, Any] = {"fps": smp.fps, "negative_prompt": smp.negative_prompt,
                          "guidance_scale": smp.guidance_scale, "guidance_scale_2": smp.guidance_scale_2}
    if smp.recipe is not None and "recipe" in inspect.signature(render).parameters:
        kw["recipe"] = smp.recipe
    return kw


# ----------------------------------------------------------------------------- device helpers


class Device:
    """Sync, peaks and NVML for one device (no-ops on the CPU)."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"
        self.nvml_baseline = nvml_used_bytes(0)[0] if self.cuda else None  # before CUDA's context exists

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.sync()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def allocated_gib(self) -> float | None:
        return round(self.torch.cuda.memory_allocated(self.dev) / GIB, 3) if self.cuda else None

    def peaks(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        self.sync()
        return {"peak_allocated_gib": round(self.torch.cuda.max_memory_allocated(self.dev) / GIB, 3),
                "peak_reserved_gib": round(self.torch.cuda.max_memory_reserved(self.dev) / GIB, 3)}

    def name(self) -> str:
        return self.torch.cuda.get_device_name(self.dev) if self.cuda else "cpu"

    def total_bytes(self) -> int:
        return self.torch.cuda.get_device_properties(self.dev).total_memory

    def context_bytes(self) -> dict[str, Any]:
        """What this process holds on the GPU outside torch's allocator (CUDA context, cuBLAS/
        cuDNN handles, kernels' modules): NVML's count for this process minus torch's reserved."""
        self.sync()
        used, how = nvml_used_bytes(self.dev.index or 0, pid=os.getpid(), baseline=self.nvml_baseline)
        reserved = self.torch.cuda.memory_reserved(self.dev)
        if used is None:
            return {"nvml": how}
        return {"nvml": how, "nvml_process_gib": round(used / GIB, 3), "reserved_now_gib": round(reserved / GIB, 3),
                "context_gib": round((used - reserved) / GIB, 3)}


def nvml_used_bytes(index: int, pid: int | None = None, baseline: int | None = None) -> tuple[int | None, str]:
    """(bytes, how): this process's GPU memory by NVML's process list, else the device's
    used memory minus `baseline` (read before this process made its CUDA context)."""
    try:
        import pynvml as nv

        nv.nvmlInit()
    except Exception as exc:  # no driver / no nvidia-ml-py: reported, not fatal
        return None, f"unavailable ({type(exc).__name__})"
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        if pid is not None:
            with contextlib.suppress(Exception):
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == pid and p.usedGpuMemory:
                        return int(p.usedGpuMemory), "process"
        used = int(nv.nvmlDeviceGetMemoryInfo(h).used)
        if pid is None:
            return used, "device"
        return (used - baseline, "device minus baseline") if baseline is not None else (used, "device")
    except Exception as exc:
        return None, f"unavailable ({type(exc).__name__})"
    finally:
        with contextlib.suppress(Exception):
            nv.nvmlShutdown()


# ----------------------------------------------------------------------------- weights


def expert_config(small: bool) -> dict[str, Any]:
    """The config the checkpoint writer builds its expert with."""
    from gpubake.provisioning import tiny as tinymod

    if small:
        return dict(tinymod.TRANSFORMER_CONFIG)
    from bench_quantize import expert_config as a14b

    return {k: v for k, v in a14b("wan2.2-t2v-a14b").items() if not k.startswith("_")}


def build_expert(cfg: dict[str, Any], dev: str, seed: int) -> Any:
    """The BF16 expert, built on `dev` as selftest_a14b_device.build_checkpoint builds it
    (same seed, same constructor: the same weights)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            return WanTransformer3DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def keep_fp32_as_loaded(model: Any) -> int:
    """Upcast the modules diffusers (and gpubake's loader) keep in fp32 (`_keep_in_fp32_modules`:
    time embedder, modulation tables, norms), as `from_pretrained(dtype=bf16)` leaves them:
    the baseline is then diffusers BF16 as a user loads it. Values are exact upcasts."""
    import torch

    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    n = 0
    for key, p in model.named_parameters():
        if names.intersection(key.split(".")) and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


FINGERPRINT_KEY = "patch_embedding.weight"  # stored as BF16, never quantized


def ensure_checkpoint(root: Path, small: bool, dev: str, seed: int, expert: Any, phases: dict,
                      fmt: str = "nvfp4") -> tuple[Path, bool]:
    """ROOT/model (`fmt` fp8: ROOT/model-fp8): reused when its manifest exists and it holds
    `expert`'s weights, else written by the self-test's writer from a copy of `expert`.
    Returns (path, reused)."""
    import torch
    from safetensors import safe_open

    from gpubake.provisioning import layout
    from gpubake.provisioning.manifest import MANIFEST_NAME

    ckpt = root / ("model" if fmt == "nvfp4" else f"model-{fmt}")
    if (ckpt / MANIFEST_NAME).is_file():
        want = expert.state_dict()[FINGERPRINT_KEY].detach().cpu()
        for shard in layout.shard_files(ckpt / "transformer"):
            with safe_open(str(shard), framework="pt") as f:
                if FINGERPRINT_KEY in f.keys():
                    if not torch.equal(f.get_tensor(FINGERPRINT_KEY), want):
                        raise BenchError(f"--root: {ckpt} holds other weights than --seed {seed} builds "
                                         "(remove it, or pass the seed it was written with)")
                    return ckpt, True
        raise BenchError(f"--root: {ckpt}/transformer has no {FINGERPRINT_KEY}: not a checkpoint of this bench")
    if ckpt.exists():
        raise BenchError(f"--root: {ckpt} exists without a gpubake manifest (a half-written checkpoint?): remove it")
    from selftest_a14b_device import build_checkpoint

    model_id = "tiny-wan2.2" if small else "wan2.2-t2v-a14b"
    with contextlib.redirect_stdout(sys.stderr):  # its phase lines: stdout is the cases' summaries
        build_checkpoint(ckpt, small, model_id, dev, seed, phases, expert=expert, fmt=fmt)
    return ckpt, False


def make_inputs(cfg: dict[str, Any], height: int, width: int, frames: int, dev: Any, seed: int = 0) -> tuple:
    """The baseline's inputs at one clip shape: (latents, t=900, cond, uncond), BF16, from a CPU
    generator (the same numbers on every device). t=900 is above the boundary: the high-noise
    expert's, `pipe.transformer`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, cfg["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8, generator=g)
    cond = torch.randn(1, TEXT_LEN, cfg["text_dim"], generator=g)
    uncond = torch.randn(1, TEXT_LEN, cfg["text_dim"], generator=g)
    bf = [x.to(dev, torch.bfloat16) for x in (lat, cond, uncond)]
    return bf[0], torch.tensor([900], device=dev), bf[1], bf[2]


def noise_prediction(model: Any, inputs: tuple, plan: Any = None) -> Any:
    """Both CFG passes of one step on `inputs`, flattened to one float32 CPU vector."""
    import torch

    from gpubake.provisioning.runtime import attention_context, cfg_forward

    ctx = attention_context(plan) if plan is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        c, u = cfg_forward(model, *inputs, batched=False)
    return torch.cat([c.reshape(-1), u.reshape(-1)]).float().cpu()


def rel_err(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- clips


def clip_numbers(res: Any, text_encoder_s: float, recipe_steps: int) -> dict[str, Any]:
    """One RenderResult, split: text encoder, denoise, VAE decode, video write; and the clip at
    the recipe's step count (measured when the steps are the recipe's, else extrapolated as
    text encoder + decode + recipe_steps x the median step)."""
    steps_sum = sum(res.step_seconds)
    first = res.encode_and_first_step_seconds
    denoise = first - text_encoder_s + steps_sum  # end of the encoder -> end of the last step
    clip = text_encoder_s + denoise + res.decode_seconds
    write = res.total_seconds - first - steps_sum - res.decode_seconds
    extrapolated = res.steps != recipe_steps
    at_recipe = (text_encoder_s + res.decode_seconds + recipe_steps * res.seconds_per_step) if extrapolated else clip
    return {
        "steps": res.steps, "seconds_per_step": round(res.seconds_per_step, 4),
        "mean_step_s": round(steps_sum / max(len(res.step_seconds), 1), 4),
        "step_seconds": [round(s, 4) for s in res.step_seconds],
        "text_encoder_s": round(text_encoder_s, 4), "denoise_s": round(denoise, 4),
        "decode_s": round(res.decode_seconds, 4), "video_write_s": round(write, 4),
        "clip_s": round(clip, 4), "total_with_write_s": round(res.total_seconds, 4),
        "recipe_steps": recipe_steps, "clip_at_recipe_steps_s": round(at_recipe, 3),
        "clip_at_recipe_steps_extrapolated": extrapolated,
        **({"extrapolation": f"text_encoder_s + decode_s + {recipe_steps} x seconds_per_step"} if extrapolated else {}),
        "frames": res.frames, "height": res.height, "width": res.width, "video": str(res.video),
        "cfg_steps": getattr(res, "cfg_steps", None),
    }


@contextlib.contextmanager
def timed_forwards(module: Any, device: Device):
    """Seconds inside `module`'s forwards (the text encoder: prompt and negative prompt)."""
    span = {"s": 0.0, "t0": 0.0}
    if module is None or not hasattr(module, "register_forward_pre_hook"):
        yield span
        return

    def pre(*_: Any) -> None:
        device.sync()
        span["t0"] = time.perf_counter()

    def post(*_: Any) -> None:
        device.sync()
        span["s"] += time.perf_counter() - span["t0"]

    hooks = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield span
    finally:
        for h in hooks:
            h.remove()


def render_clip(pipe: Any, smp: Sampling, size: tuple[int, int], frames: int, out_dir: Path, device: Device,
                steps: int | None = None, extra: dict[str, Any] | None = None) -> dict:
    """One clip through `provisioning.render.render`, with its peaks (reset before it) and what
    dynamo compiled during it (a timed clip should compile nothing)."""
    from gpubake.provisioning.render import render

    device.reset()
    resident = device.allocated_gib()
    before = dynamo_counts()
    with timed_forwards(getattr(pipe, "text_encoder", None), device) as te:
        res = render(pipe, PROMPT, size[0], size[1], frames, steps or smp.steps, 1234, out_dir,
                     **{**render_kwargs(smp), **(extra or {})})
    after = dynamo_counts()
    return {**clip_numbers(res, te["s"], smp.recipe_steps), "resident_gib": resident, **device.peaks(),
            **{k: after[k] - before[k] for k in after}}


def dynamo_counts() -> dict[str, int]:
    """Frames dynamo compiled (cache misses) and graph breaks so far in this process."""
    from torch._dynamo.utils import counters

    return {"dynamo_frames_compiled": int(counters["frames"]["total"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


# ----------------------------------------------------------------------------- stacks


def load_gpubake(ckpt: Path, device: Device, runtime: str | None) -> tuple[Any, dict]:
    """The service's pipeline: `load_serving_pipeline` with `runtime` as $GPUBAKE_RUNTIME."""
    from diffusers.utils import logging as dlog

    from gpubake.provisioning.pipeline import load_serving_pipeline

    dlog.disable_progress_bar()
    with _env("GPUBAKE_RUNTIME", runtime):
        sp = load_serving_pipeline(ckpt, str(device.dev))
    if hasattr(sp.pipe, "set_progress_bar_config"):
        sp.pipe.set_progress_bar_config(disable=True)
    return sp, sp.runtime()


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def peer_lever_problems(levers: list[str], device: Device) -> list[str]:
    """On a GPU, a peer lever that cannot run here (a wheel not installed, a failed check):
    found in seconds, before minutes of building, so the one run measures the whole peer."""
    if not device.cuda:
        return []
    problems = []
    if "fp8" in levers:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: F401
        except Exception as exc:
            problems.append(f"fp8: torchao does not import ({type(exc).__name__}: {str(exc)[:120]}); "
                            "carry its wheel (torchao==0.18.0, the project's pin)")
    if "fa3" in levers:
        from gpubake.provisioning.runtime import attention_check

        check = attention_check("fa3-fp8", device.dev)
        if not check["ok"]:
            problems.append(f"fa3: fa3-fp8 attention cannot run here ({check.get('reason', 'failed its check')}); "
                            "carry the fa3-fwd wheel")
    return problems


def apply_peer_levers(experts: list[Any], levers: list[str], device: Device) -> dict[str, Any]:
    """The peer stack's levers on each diffusers expert, in the order a user applies them:
    torchao float8 rowwise dynamic (W8A8) on the blocks' linears, gpubake's FA3 FP8 op for
    the self-attention, then regional compile (lazy: the first clip pays it)."""
    import torch

    done: dict[str, Any] = {}
    if "fp8" in levers:
        if not device.cuda:
            done["fp8"] = "skipped: CPU (torchao's float8 GEMM needs an sm_89+ GPU)"
        else:
            from peer_stack import PEER_FP8, quantize_peer_fp8

            for e in experts:
                quantize_peer_fp8(e)
            done["fp8"] = PEER_FP8
    if "fa3" in levers:
        if not device.cuda:
            done["fa3"] = "skipped: CPU (FA3 is an sm_90 kernel)"
        else:
            from gpubake.kernels.attention import set_self_attention_kernel

            n = sum(set_self_attention_kernel(e, "fa3-fp8") for e in experts)
            done["fa3"] = f"set_self_attention_kernel(expert, 'fa3-fp8'): {n} attn1 modules"
    if "compile" in levers:
        if not device.cuda:
            done["compile"] = "skipped: CPU (compile is timed on the GPU only)"
        else:
            for e in experts:
                e.compile_repeated_blocks(dynamic=False)  # static graphs per shape, as gpubake's plan
            done["compile"] = "compile_repeated_blocks(dynamic=False)"
    return done


def load_peer(ckpt: Path, experts: list[Any], device: Device) -> Any:
    """diffusers' pipeline of the checkpoint (its class, encoder, VAE, tokenizer, scheduler;
    BF16 as gpubake's loader asks for it) with `experts` as its transformers."""
    import diffusers
    import torch

    from gpubake.provisioning import layout

    index = layout.model_index(ckpt)
    names = layout.expert_dirs(index)
    cls = getattr(diffusers, index["_class_name"])
    pipe = cls.from_pretrained(str(ckpt), dtype=torch.bfloat16, **dict(zip(names, experts)))
    pipe = pipe.to(device.dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """The results so far, written after every case."""

    args: argparse.Namespace
    device: Device
    result: dict[str, Any]
    t0: float = field(default_factory=time.monotonic)
    # (stack, size) -> measured s of a case (load + warm-up + timed): per stack, since their compiles
    # differ 10x (the peer's ~210 s against gpubake's ~20-60 s: the 2026-12-03 run skipped fp8 costed as the peer)
    cost: dict[tuple[str, str], float] = field(default_factory=dict)
    clip_cost: dict[str, float] = field(default_factory=dict)  # size -> load + one warm clip (the cap case)
    timed_clip: dict[str, float] = field(default_factory=dict)  # size -> one timed clip (a --variant's cost)
    warmup_clip: dict[str, float] = field(default_factory=dict)  # size -> one warm-up clip, compile included

    @property
    def json_path(self) -> Path:
        return self.args.out / "bench_clip.json"

    def write(self) -> None:
        from gpubake.fsutil import write_json_atomic

        self.result["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json_atomic(self.json_path, self.result)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def guess(self, size: str, clips: int, steps: int) -> float:
        """Seconds of a case of `clips` clips at `size` before any was measured (0 on the CPU)."""
        if not self.device.cuda:
            return 0.0
        compile_s, clip_s, step_s = FIRST_CASE_GUESS[size]
        return compile_s + clips * (clip_s + steps * step_s)

    def fits(self, name: str, size: str, warms_up: bool | None = None) -> bool:
        """Whether case `name` fits what is left of --budget-s. `warms_up` not None: a case that
        renders on a pipeline already loaded (a --variant), costed as its size's timed clip plus,
        if it warms up, the size's warm-up clip (the 2026-12-01 run skipped a 25 s variant
        costed as a whole 125 s case)."""
        steps = self.result["sampling"]["steps"]
        if warms_up is not None and size in self.timed_clip:
            est = self.timed_clip[size] + (self.warmup_clip.get(size, self.timed_clip[size]) if warms_up else 0.0)
        elif name.startswith("cap"):
            est = self.clip_cost.get(size, self.guess(size, 1, steps))
        else:
            est = self.cost.get((stack_of(name), size))
            if est is None:  # a stack not measured yet: the guessed compile, and two of the clips measured so far
                est = (FIRST_CASE_GUESS[size][0] + 2 * self.timed_clip[size] if size in self.timed_clip and self.device.cuda
                       else self.guess(size, 2, steps))
        if est > self.left():
            self.result["skipped"].append(f"{name}: expected ~{est:.0f} s > {self.left():.0f} s left of --budget-s")
            print(f"[{name}] skipped: {self.result['skipped'][-1]}", file=sys.stderr, flush=True)
            self.write()
            return False
        return True


def stack_of(case: str) -> str:
    """'fp8@480p' -> 'fp8', 'gpubake+fuse_qkv=1@480p' -> 'gpubake': whose compile a case pays."""
    return case.split("@")[0].split("+")[0]


def summary_line(row: dict[str, Any]) -> str:
    """The one stdout line of a case."""
    if "error" in row:
        return f"[{row['case']}] FAILED: {row['error']}"
    t = row["timed"]
    mem = (f"peak {t['peak_allocated_gib']:.2f} GiB allocated / {t['peak_reserved_gib']:.2f} reserved"
           if t.get("peak_reserved_gib") is not None else "peak n/a (CPU)")
    at = t["clip_at_recipe_steps_s"]
    how = "extrapolated" if t["clip_at_recipe_steps_extrapolated"] else "measured"
    at_text = f"{at:.1f} s ({how})" if at is not None else "n/a (not extrapolable)"
    err = row.get("rel_err_vs_bf16")
    step = f"{t['seconds_per_step']:.3f} s/step"
    mean = t.get("mean_step_s")
    if mean is not None and abs(mean - t["seconds_per_step"]) > 0.05 * t["seconds_per_step"]:
        step += f" (median; mean {mean:.3f}: a step cache skips some)"  # a skipped step is ~10 ms
    parts = [f"[{row['case']}] {step}",
             f"clip {t['clip_s']:.2f} s at {t['steps']} steps (text {t['text_encoder_s']:.2f} + denoise "
             f"{t['denoise_s']:.2f} + decode {t['decode_s']:.2f})",
             f"{t['recipe_steps']} steps {at_text}"]
    if "warmup" in row:
        parts.append(f"warm-up {row['warmup']['total_with_write_s']:.1f} s")
    parts.append(mem)
    if row.get("context", {}).get("context_gib") is not None:
        parts.append(f"+ context {row['context']['context_gib']:.2f} GiB = {row['reserved_plus_context_gib']:.2f}")
    if err is not None:
        parts.append(f"error vs BF16 {err:.4f}")
    q = row.get("quality_vs_gpubake", {})
    if "latent_rel_err" in q:
        parts.append(f"vs gpubake: latents {q['latent_rel_err']:.4f}, video PSNR {q['video_psnr_db']} dB")
    if row.get("counts", {}).get("blocks_skipped_fraction") is not None:
        parts.append(f"blocks skipped {100 * row['counts']['blocks_skipped_fraction']:.1f} %")
    if row.get("speedup_vs_gpubake"):
        parts.append(f"{row['speedup_vs_gpubake']:.3f}x the gpubake clip")
    if t.get("dynamo_frames_compiled"):
        parts.append(f"COMPILED {t['dynamo_frames_compiled']} frames DURING THE TIMED CLIP (raise --warmup-steps)")
    return ", ".join(parts)


def run_case(run: Run, name: str, size: str, body, warms_up: bool | None = None) -> dict | None:
    """A case row: `body(row)` fills it; a failure is a result (recorded), not a crash.
    `warms_up`: as `Run.fits`."""
    if not run.fits(name, size, warms_up):
        return None
    row: dict[str, Any] = {"case": name, "size": size}
    run.result["cases"].append(row)
    t0 = time.monotonic()
    try:
        body(row)
    except Exception as exc:  # an out-of-memory under --mem-cap, say: its peaks say how far it got
        row["error"] = one_line(exc)
        if run.device.cuda:
            row["peaks_at_error"] = run.device.peaks()
    row["case_s"] = round(time.monotonic() - t0, 1)
    if "error" not in row:
        run.cost[(stack_of(name), size)] = row["case_s"] + row.get("load_s", 0.0)  # with its load
        clip = row["timed"]["total_with_write_s"] + row.get("load_s", 0.0)
        run.clip_cost[size] = max(run.clip_cost.get(size, 0.0), clip)
        run.timed_clip[size] = max(run.timed_clip.get(size, 0.0), row["timed"]["total_with_write_s"])
        if isinstance(row.get("warmup"), dict):
            run.warmup_clip[size] = max(run.warmup_clip.get(size, 0.0), row["warmup"]["total_with_write_s"])
    print(summary_line(row), flush=True)
    run.write()
    return row


def timed_pair(row: dict, pipe: Any, smp: Sampling, hw: tuple[int, int], frames: int, clips: Path,
               device: Device, warm: bool = True) -> None:
    """A warm-up clip (compile, first weight preparation; reported apart) and the timed clip."""
    if warm:
        row["warmup"] = render_clip(pipe, smp, hw, frames, clips / "warmup", device, smp.warmup_steps or None)
    row["timed"] = render_clip(pipe, smp, hw, frames, clips / "timed", device)
    if warm and not smp.warmup_steps:  # same clip twice: the difference is compile and first-use costs
        row["compile_and_warmup_s_approx"] = round(row["warmup"]["total_with_write_s"] - row["timed"]["total_with_write_s"], 2)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return bench(args)
    except GpubakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    from gpubake.provisioning.allocator import use_expandable_segments

    use_expandable_segments()  # as the self-test and the service run (before CUDA allocates)
    device = Device("cpu" if args.small else "cuda")
    import diffusers
    import torch
    import torch._dynamo
    import transformers

    if device.cuda and not torch.cuda.is_available():
        raise BenchError("no CUDA device here: --small runs the tiny model on the CPU")
    model_id = "tiny-wan2.2" if args.small else "wan2.2-t2v-a14b"
    smp = resolve_sampling(args, model_id)
    problems = peer_lever_problems(args.peer_levers, device) if "peer" in args.cases else []
    if problems:
        raise BenchError(f"--peer-levers: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    sizes = SMALL_SIZES if args.small else SIZES
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    result: dict[str, Any] = {
        "bench": "bench/bench_clip.py (issue 18)", "argv": args.argv,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "device": device.name(),
        "small": args.small, "versions": versions(torch, diffusers, transformers),
        "sampling": smp.to_dict(), "prompt": PROMPT, "seed": 1234, "weights_seed": args.seed,
        "frames": args.frames, "sizes": {s: list(sizes[s]) for s in args.sizes},
        "weights": "random: one expert stored as both experts; UMT5-XXL and the Wan 2.1 VAE at their real "
                   "configs (tiny configs with --small); the tokenizer is make-tiny's offline one",
        "env": {k: os.environ.get(k) for k in ("GPUBAKE_RUNTIME", "GPUBAKE_NVFP4_BACKEND", "GPUBAKE_FP8_BACKEND",
                                                "PYTORCH_CUDA_ALLOC_CONF")},
        "phases": {}, "bf16_reference": {}, "cases": [], "skipped": [],
    }
    run = Run(args, device, result)
    args.out.mkdir(parents=True, exist_ok=True)
    run.write()
    dev = str(device.dev)

    # 1-2. the BF16 expert, the checkpoint (a copy of it), the baseline's predictions
    cfg = expert_config(args.small)
    t0 = time.perf_counter()
    expert = build_expert(cfg, dev, args.seed)
    device.sync()
    result["phases"]["bf16_expert_build_s"] = round(time.perf_counter() - t0, 2)
    # the NVFP4 checkpoint only where a case runs it: the peer takes the encoder, VAE and
    # scheduler from either checkpoint (the same components), so `--cases peer,fp8` writes one
    if {"gpubake", "cap"} & set(args.cases) or "fp8" not in args.cases:
        t0 = time.perf_counter()
        ckpt, reused = ensure_checkpoint(args.root, args.small, dev, args.seed, expert, result["phases"])
        result["phases"]["checkpoint_s"] = round(time.perf_counter() - t0, 2)
        result["checkpoint"] = {"path": str(ckpt), "reused": reused}
    if "fp8" in args.cases:  # from the BF16 expert, before the peer takes its weights
        t0 = time.perf_counter()
        fp8_ckpt, reused = ensure_checkpoint(args.root, args.small, dev, args.seed, expert, result["phases"], "fp8")
        result["phases"]["checkpoint_fp8_s"] = round(time.perf_counter() - t0, 2)
        result["checkpoint_fp8"] = {"path": str(fp8_ckpt), "reused": reused}
        if "checkpoint" not in result:
            ckpt = fp8_ckpt
    result["phases"]["bf16_upcast_keep_fp32_params"] = keep_fp32_as_loaded(expert)
    inputs = {s: make_inputs(cfg, *sizes[s], args.frames, device.dev) for s in args.sizes}
    refs = {}
    for s in args.sizes:
        t0 = time.perf_counter()
        refs[s] = noise_prediction(expert, inputs[s])
        device.sync()
        ref = result["bf16_reference"][s] = {"first_call_s": round(time.perf_counter() - t0, 3),
                                            "finite": bool(torch.isfinite(refs[s]).all())}
        if args.time_bf16 and s == "480p":
            t0 = time.perf_counter()
            noise_prediction(expert, inputs[s])
            device.sync()
            ref["step_s"] = round(time.perf_counter() - t0, 3)
            ref["what"] = "diffusers BF16 expert, eager, torch SDPA: one guided step outside the pipeline"
    run.write()
    clips = args.root / "clips"

    # 3. the peer stack, on E (in place) and a copy of E; 4. gpubake's serving pipeline
    held = [expert]
    del expert
    if "peer" in args.cases:
        peer_cases(run, held, ckpt, smp, sizes, inputs, refs, clips)
    held.clear()
    device.reset()
    if "gpubake" in args.cases:
        gpubake_cases(run, ckpt, smp, sizes, inputs, refs, clips)
    if "fp8" in args.cases:
        gpubake_cases(run, fp8_ckpt, smp, sizes, inputs, refs, clips, name="fp8")

    # 5. the small-card plan under a memory cap
    if "cap" in args.cases:
        cap_case(run, ckpt, smp, sizes, clips)
    result["total_s"] = round(time.monotonic() - run.t0, 1)
    run.write()
    print(f"wrote {run.json_path}", file=sys.stderr)
    return 0


def peer_cases(run: Run, held: list, ckpt: Path, smp: Sampling, sizes: dict, inputs: dict, refs: dict,
               clips: Path) -> None:
    """The peer stack on the BF16 expert in `held` (taken: its weights become the peer's) and a
    copy of it, so the pipeline holds two experts as a real one does; one case per size."""
    import torch
    import torch._dynamo

    args, device = run.args, run.device
    saved = inductor_state(torch)
    state: dict[str, Any] = {}
    try:
        experts = [held.pop(), None]
        experts[1] = copy.deepcopy(experts[0])
        t0 = time.perf_counter()
        try:
            pipe = state["pipe"] = load_peer(ckpt, experts, device)
            levers = apply_peer_levers([pipe.transformer, pipe.transformer_2], args.peer_levers, device)
            del pipe
        except Exception as exc:  # a peer that cannot be built is a result too
            run.result["cases"].append({"case": "peer", "stack": "peer", "error": f"build: {one_line(exc)}"})
            print(summary_line(run.result["cases"][-1]), flush=True)
            return
        finally:
            experts.clear()
        load_s = round(time.perf_counter() - t0, 2)
        for s in args.sizes:
            def body(row: dict, s: str = s) -> None:
                pipe = state["pipe"]
                row.update(stack="peer", levers=levers, load_s=load_s)
                timed_pair(row, pipe, smp, sizes[s], args.frames, clips / f"peer-{s}", device)
                pred = noise_prediction(pipe.transformer, inputs[s])
                row["rel_err_vs_bf16"] = round(rel_err(pred, refs[s]), 5)
                row["finite"] = bool(torch.isfinite(pred).all())
            run_case(run, f"peer@{s}", s, body)
    finally:
        state.clear()
        restore_inductor(torch, saved)
        torch._dynamo.reset()  # the next stack compiles on its own, from torch's settings
        device.reset()
        run.result["phases"]["allocated_after_peer_gib"] = device.allocated_gib()
        run.write()


def gpubake_cases(run: Run, ckpt: Path, smp: Sampling, sizes: dict, inputs: dict, refs: dict, clips: Path,
                  name: str = "gpubake") -> None:
    """gpubake's serving pipeline (loader + runtime plan) on `ckpt`; one case per size, each
    followed by its --variant cases on the same pipeline (the NVFP4 case's only). `name`:
    the case, "gpubake" (NVFP4) or "fp8" (the FP8-weight checkpoint, same plan)."""
    import torch
    from clip_variants import captured_decode, run_variant

    args, device = run.args, run.device
    variants = args.variants if name == "gpubake" else []
    state: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        try:
            state["sp"], runtime = load_gpubake(ckpt, device, args.runtime)
        except Exception as exc:  # the loader refused the checkpoint or the plan: a result
            run.result["cases"].append({"case": name, "stack": name, "error": f"load: {one_line(exc)}"})
            print(summary_line(run.result["cases"][-1]), flush=True)
            return
        load_s = round(time.perf_counter() - t0, 2)
        for s in args.sizes:
            def body(row: dict, s: str = s) -> None:
                sp = state["sp"]
                row.update(stack=name, runtime=runtime, load_s=load_s)
                with captured_decode(sp.pipe) if variants else contextlib.nullcontext({}) as got:
                    timed_pair(row, sp.pipe, smp, sizes[s], args.frames, clips / f"{name}-{s}", device)
                state[f"captured@{s}"] = got  # the timed clip's (decoded last): what a variant is compared with
                pred = noise_prediction(sp.pipe.transformer, inputs[s], sp.plan)
                row["rel_err_vs_bf16"] = round(rel_err(pred, refs[s]), 5)
                row["finite"] = bool(torch.isfinite(pred).all())
            base = run_case(run, f"{name}@{s}", s, body)
            for v in variants if base is not None and "error" not in base else ():
                def vbody(row: dict, s: str = s, v: Any = v) -> None:
                    sp = state["sp"]
                    clip_args = (sp.pipe, smp, sizes[s], args.frames, clips / f"gpubake-{v.name}-{s}", device)
                    run_variant(row, sp, v, {**base, "captured": state[f"captured@{s}"]}, render_clip, clip_args,
                                smp.warmup_steps or None)
                run_case(run, f"gpubake+{v.name}@{s}", s, vbody, warms_up=v.warms_up)
            state.pop(f"captured@{s}", None)
    finally:
        state.clear()
        device.reset()
        run.result["phases"][f"allocated_after_{name}_gib"] = device.allocated_gib()
        run.write()


def cap_case(run: Run, ckpt: Path, smp: Sampling, sizes: dict, clips: Path) -> None:
    """--mem-cap: the process capped to GIB, the small-card plan, one timed clip per size, after
    a warm-up clip unless the gpubake case of that size ran before in this process (its
    compiled code is reused where its guards hold)."""
    args, device = run.args, run.device
    if not run.fits(f"cap@{args.sizes[0]}", args.sizes[0]):  # before minutes of loading
        return
    cap = {"cap_gib": args.mem_cap, "runtime": args.cap_runtime}
    if device.cuda:
        total = device.total_bytes()
        cap["fraction"] = round(args.mem_cap * GIB / total, 5)
        cap["total_gib"] = round(total / GIB, 2)
        device.reset()
        device.torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap * GIB / total), _index(device))
    else:
        cap["fraction"] = "skipped: CPU (set_per_process_memory_fraction caps a CUDA allocator)"
    sp = None
    try:
        t0 = time.perf_counter()
        try:
            sp, runtime = load_gpubake(ckpt, device, args.cap_runtime)
        except Exception as exc:
            run.result["cases"].append({"case": "cap", "cap": cap, "error": f"load: {one_line(exc)}"})
            print(summary_line(run.result["cases"][-1]), flush=True)
            return
        load_s = round(time.perf_counter() - t0, 2)
        load_peaks = device.peaks()
        for s in args.sizes:
            def body(row: dict, s: str = s) -> None:
                compiled = any(c.get("case") == f"gpubake@{s}" and "error" not in c for c in run.result["cases"])
                row.update(stack="gpubake", cap=cap, runtime=runtime, load_s=load_s, load_peaks=load_peaks,
                           compiled_by_an_earlier_case=compiled)
                # a warm-up clip of its own unless the gpubake case compiled this size's blocks
                # (the 2026-12-01 cap runs had none: their timed clips compiled, no speed measure)
                timed_pair(row, sp.pipe, smp, sizes[s], args.frames, clips / f"cap-{s}", device, warm=not compiled)
                if device.cuda:
                    row["context"] = device.context_bytes()
                    ctx = row["context"].get("context_gib")
                    peak = max(row["timed"]["peak_reserved_gib"], load_peaks["peak_reserved_gib"] or 0.0)
                    row["peak_reserved_gib"] = peak
                    if ctx is not None:
                        row["reserved_plus_context_gib"] = round(peak + ctx, 3)
            run_case(run, f"cap@{s}", s, body)
    finally:
        del sp
        if device.cuda:
            device.torch.cuda.set_per_process_memory_fraction(1.0, _index(device))
        device.reset()


def _index(device: Any) -> int:
    """The CUDA device index `set_per_process_memory_fraction` wants (a bare "cuda" is refused)."""
    index = device.torch.device(device.dev).index
    return device.torch.cuda.current_device() if index is None else index


def inductor_state(torch: Any) -> tuple[Any, str]:
    """torchao's `quantize_` sets inductor flags process-wide (set_inductor_config): saved here
    and restored after the peer, so gpubake's compile runs on torch's own settings."""
    import torch._inductor.config as ic

    return ic.save_config(), torch.get_float32_matmul_precision()


def restore_inductor(torch: Any, saved: tuple[Any, str]) -> None:
    import torch._inductor.config as ic

    ic.load_config(saved[0])
    torch.set_float32_matmul_precision(saved[1])


def versions(torch: Any, diffusers: Any, transformers: Any) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                                  "transformers": transformers.__version__}
    for dist in ("triton", "torchao", "fa3-fwd"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    sys.exit(main())

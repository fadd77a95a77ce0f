"""Device bench (issue 14, "Measure"): LightX2V's 4-step Wan 2.2 T2V-A14B NVFP4, imported and
served by gpubake, whole clips timed end to end; the 40-step recipe in the same run.

    python bench/bench_lightx2v_clip.py --out $OUT                      # one H200 (bench/bench_lightx2v_clip.sh)
    python bench/bench_lightx2v_clip.py --small --out /tmp/o --work /tmp/w   # the same code on the CPU, tiny model

1. Source: full-size random weights in LightX2V's layout for both A14B experts (40 blocks,
   dim 5120, FFN 13824), `tests/producer_fixtures.write_lightx2v_random` (the import tests'
   fixture writer, at full size: random E2M1 codes and E4M3 block scales, swizzled as
   LightX2V stores them, `alpha` / `input_global_scale`; no quantization), under the Hub
   repo's file names. Base: UMT5-XXL at its real config (random, BF16), the Wan 2.1 VAE
   (random, fp32), `make-tiny`'s offline tokenizer, the Wan-AI scheduler (UniPC, flow shift
   3.0) and the A14B expert configs, as in `bench/selftest_a14b_device.py`. Source and base
   are scratch: /dev/shm (RAM) where it holds them, else --work, or --scratch; the 64 GiB
   disk of the H200 machine then holds only the ~29 GB import.
2. `gpubake import SRC DEST --format lightx2v --base BASE` as a child process: wall time,
   its peak RSS (getrusage of the children; it is the first child) and its own timings.
   The importer runs on the CPU and creates no CUDA tensor, so it has no GPU peak.
3. `provisioning.pipeline.load_serving_pipeline(DEST, "cuda")`: the service's loader and
   runtime plan ($GPUBAKE_RUNTIME, default auto).
4. Clips through `provisioning.render.render` with the registry's recipes, as the service
   renders them: `4step-480` and `4step-720` (lightx2v-4step-t2v at 480x832x81 and
   720x1280x81: the first clip of each resolution is the warm-up, compile included, the
   second is timed) and `40step-480` (wan22-t2v-a14b-40step at 480x832x81, CFG; timed
   once: the 4-step 480p warm-up already compiled that shape). Each clip reports the text
   encoder, denoise and VAE decode seconds apart, the MP4 write, the forwards each expert
   ran (hooks) and the GPU peak. A case that would not fit in --budget-s is skipped and
   says so; the 40-step clip then runs as many steps as fit (at least 4) and its 40-step
   denoise time is extrapolated from them, marked `extrapolated`.

Output: $OUT/bench_lightx2v_clip.json and one summary line per phase and case on stdout
(progress on stderr). `--reuse`
keeps DEST from an earlier run on the same machine (skips steps 1-2), so the 40-step clip
can get a run of its own: `--reuse --cases 40step-480`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

PROMPT = "a red fox running through fresh snow, golden hour, cinematic"
HF_FILES = ("Wan2.2-T2V-A14B_NVFP4_Sparse_high.safetensors", "Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors")
FOUR, FORTY = "lightx2v-4step-t2v", "wan22-t2v-a14b-40step"
CASES = ("4step-480", "4step-720", "40step-480")
FULL = {"model_id": "wan2.2-t2v-a14b-lightx2v-4step", "480": (480, 832, 81), "720": (720, 1280, 81)}
SMALL = {"model_id": "tiny-wan2.2", "480": (64, 64, 5), "720": (96, 96, 5)}
MIN_STEPS_40 = 4
GIB = 2**30


class Clock:
    """Seconds since the start, and what is left of the budget."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.budget = budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)


def log(msg: str) -> None:
    """Progress on stderr; stdout holds only the summary lines."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss * 1024 / GIB, 2)  # ru_maxrss is KiB on Linux


def free_gib(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / GIB


# --------------------------------------------------------------------------- 1. checkpoints


def expert_config(small: bool) -> dict[str, Any]:
    if small:
        from gpubake.provisioning import tiny

        return dict(tiny.TRANSFORMER_CONFIG)
    from bench_quantize import expert_config as a14b

    return {k: v for k, v in a14b("wan2.2-t2v-a14b").items() if not k.startswith("_")}


def write_source(dest: Path, small: bool, seed: int) -> dict[str, Any]:
    from producer_fixtures import write_lightx2v_random

    return write_lightx2v_random(dest, expert_config(small), seed=seed, files=HF_FILES)


def write_base(dest: Path, small: bool, seed: int, dev: str) -> dict[str, Any]:
    """The diffusers base an import takes its other components from (no expert weights)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from gpubake.provisioning import tiny as tinymod

    t0 = time.perf_counter()
    dest.mkdir(parents=True)
    tok = tinymod._tokenizer()
    tok.save_pretrained(dest / "tokenizer")
    torch.manual_seed(seed)
    if small:
        te_cfg = dict(tinymod.TEXT_ENCODER_CONFIG, vocab_size=len(tok))
    else:
        from selftest_a14b_device import UMT5_XXL

        te_cfg = UMT5_XXL
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            te = UMT5EncoderModel(UMT5Config(**te_cfg)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    te.save_pretrained(dest / "text_encoder", max_shard_size="5GB")
    del te
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**tinymod.VAE_CONFIG) if small else AutoencoderKLWan()  # defaults: the Wan 2.1 VAE
    vae.save_pretrained(dest / "vae")
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers ships UniPC with flow_shift 3.0; the recipes set their own
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(dest / "scheduler")
    for expert in ("transformer", "transformer_2"):  # configs only: the experts come from the source
        _save_config(expert_config(small), dest / expert)
    tinymod._write_model_index(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return {"bytes": size, "seconds": round(time.perf_counter() - t0, 2)}


def _save_config(cfg: dict[str, Any], folder: Path) -> None:
    """An expert's config.json without building the 14B model."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"_class_name": "WanTransformer3DModel", "_diffusers_version": diffusers.__version__, **cfg}
    (folder / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=list))


def run_import(src: Path, base: Path, dest: Path, model_id: str) -> dict[str, Any]:
    """`gpubake import` in a child process (its peak RSS is the children's, it being the first)."""
    cmd = [sys.executable, "-m", "gpubake", "import", str(src), str(dest), "--format", "lightx2v",
           "--base", str(base), "--model-id", model_id, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gpubake import failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads(proc.stdout)  # `--json`: stdout is the one JSON object
    return {"command": "python -m gpubake " + " ".join(cmd[3:]), "wall_seconds": round(wall, 2),
            "peak_rss_gib": rss_gib(resource.RUSAGE_CHILDREN), "peak_gpu_gib": None,
            "gpu": "none: the importer runs on the CPU", "summary": summary,
            "dest_bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}


# --------------------------------------------------------------------------- 3-4. serve and time


class ForwardCount:
    """Forwards of each expert during one render (pre-hooks on the two transformers)."""

    def __init__(self, pipe: Any) -> None:
        self.counts = {"transformer": 0, "transformer_2": 0}
        self.handles = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, n=n: self._hit(n))
                        for n in self.counts if getattr(pipe, n, None) is not None]

    def _hit(self, name: str) -> None:
        self.counts[name] += 1

    def close(self) -> dict[str, int]:
        for h in self.handles:
            h.remove()
        return dict(self.counts)


def clip(pipe: Any, model: Any, recipe: Any, size: tuple[int, int, int], steps: int, out: Path, dev: str) -> dict[str, Any]:
    import torch

    from gpubake.provisioning.render import render

    h, w, frames = size
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    count = ForwardCount(pipe)
    try:
        res = render(pipe, PROMPT, h, w, frames, steps, 1234, out, fps=model.fps,
                     negative_prompt=model.negative_prompt, recipe=recipe)
    finally:
        forwards = count.close()
    d = res.to_dict()
    in_pipe = res.encode_and_first_step_seconds + sum(res.step_seconds) + res.decode_seconds
    d.update(forwards=forwards, write_seconds=round(res.total_seconds - in_pipe, 4),
             size=f"{w}x{h}x{frames}", video_bytes=res.video.stat().st_size)
    if dev.startswith("cuda"):
        d["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        d["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    return d


def summary_line(name: str, r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"{name}: skipped ({r['skipped']})"
    t = r["timed"]
    bits = [f"{name}: {t['size']} {t['steps']} steps ({t['recipe']}), {sum(t['forwards'].values())} forwards",
            f"total {t['total_seconds']:.2f} s = text encoder {t['text_encoder_seconds']:.2f}"
            f" + denoise {t['denoise_seconds']:.2f} + VAE decode {t['decode_seconds']:.2f} + MP4 {t['write_seconds']:.2f}",
            f"{t['seconds_per_step']:.3f} s/step"]
    if r.get("warmup"):
        bits.append(f"warm-up {r['warmup']['total_seconds']:.1f} s")
    if "peak_gpu_gib" in t:
        bits.append(f"peak GPU {t['peak_gpu_gib']} GiB")
    if r.get("extrapolated"):
        e = r["extrapolated"]
        bits.append(f"EXTRAPOLATED to {e['steps']} steps: denoise {e['denoise_seconds']:.1f} s, total {e['total_seconds']:.1f} s")
    return "; ".join(bits)


def run_cases(pipe: Any, args: argparse.Namespace, shapes: dict[str, Any], clock: Clock, dev: str,
              results: dict[str, Any], save: Any) -> dict[str, Any]:
    """Run `args.cases` in order into `results`, calling `save()` after each."""
    from gpubake.provisioning.models import get_model, get_recipe

    model = get_model(shapes["model_id"])
    four, forty = get_recipe(FOUR), get_recipe(FORTY)
    forward_480: float | None = None
    for case in args.cases:
        kind, res_key = case.split("-")
        size, out = shapes[res_key], args.out / "clips" / case
        if kind == "4step":
            # a new resolution compiles: allow 60 s for that, and 4 forwards at ~4x the 480p one at 720p
            est = 2 * (60 + 4 * (forward_480 or 2.0) * (1 if res_key == "480" else 4))
            if clock.left() < est:
                results[case] = {"skipped": f"budget: {clock.left():.0f} s left, ~{est:.0f} s needed"}
                log(summary_line(case, results[case]))
                continue
            warm = clip(pipe, model, four, size, four.steps, out / "warmup", dev)
            timed = clip(pipe, model, four, size, four.steps, out / "timed", dev)
            results[case] = {"recipe": four.to_dict(), "warmup": warm, "timed": timed}
            if res_key == "480":
                forward_480 = timed["seconds_per_step"]
        else:
            steps = args.steps40
            warm = None
            if forward_480 is None:  # no 4-step clip at this size ran here: warm up (compile) on 2 CFG steps
                warm = clip(pipe, model, forty, size, 2, out / "warmup", dev)
                forward_480 = warm["seconds_per_step"] / 2
            per_step = 2 * forward_480  # CFG: two forwards a step
            fit = int((clock.left() - 30) / per_step)
            extrapolate = fit < steps
            if fit < MIN_STEPS_40:
                results[case] = {"skipped": f"budget: {clock.left():.0f} s left, {MIN_STEPS_40} CFG steps need "
                                            f"~{30 + MIN_STEPS_40 * per_step:.0f} s"}
                log(summary_line(case, results[case]))
                continue
            run_steps = min(steps, fit)
            timed = clip(pipe, model, forty, size, run_steps, out / "timed", dev)
            results[case] = {"recipe": forty.to_dict(), "warmup": warm,
                             "warmup_note": "2 steps of this recipe" if warm else
                                            "the 4step-480 warm-up compiled this shape (same transformer inputs)",
                             "timed": timed}
            if extrapolate:
                denoise = timed["denoise_seconds"] / run_steps * steps
                total = timed["total_seconds"] - timed["denoise_seconds"] + denoise
                results[case]["extrapolated"] = {"steps": steps, "from_steps": run_steps,
                                                 "denoise_seconds": round(denoise, 2), "total_seconds": round(total, 2),
                                                 "why": "the budget did not hold all 40 steps"}
        log(summary_line(case, results[case]))
        save()
    return results


# --------------------------------------------------------------------------- main


def environment(dev: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "device": dev, "cpus": os.cpu_count(),
           "runtime_env": os.environ.get("GPUBAKE_RUNTIME", "auto"),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if dev.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                   capability=f"{props.major}.{props.minor}")
    return env


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")), help="JSON and clips")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lx-bench"), help="the imported checkpoint (local disk)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="source and base, removed after the import (default /dev/shm/lx-bench, else WORK/scratch)")
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU: the same code path, for tests")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, in run order ({', '.join(CASES)})")
    ap.add_argument("--steps40", type=int, default=40, help="steps of the 40-step clip")
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop starting cases after this many seconds")
    ap.add_argument("--reuse", action="store_true", help="keep WORK/model from an earlier run (skip write + import)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {', '.join(bad)} (known: {', '.join(CASES)})")
    return args


# GiB a full-size run writes (two 8.4 GB experts; UMT5-XXL + VAE; the import of both)
NEED_GIB = {"src": 16.0, "base": 11.5, "dest": 27.5}


def placement(args: argparse.Namespace) -> dict[str, Path]:
    """Where the source, the base and the import go. Source and base are scratch (removed
    after the import): /dev/shm when it holds them, else beside the import on --work."""
    dest = args.work / "model"
    if args.scratch is not None or args.small:
        root = args.scratch or args.work / "scratch"
        return {"src": root / "src", "base": root / "base", "dest": dest}
    shm, out = Path("/dev/shm"), {"dest": dest}
    room = free_gib(shm) - 2 if shm.is_dir() and os.access(shm, os.W_OK) else 0.0
    for part in ("src", "base"):  # each where it fits, RAM first
        if room >= NEED_GIB[part]:
            out[part], room = shm / "lx-bench" / part, room - NEED_GIB[part]
        else:
            out[part] = args.work / "scratch" / part
    on_work = NEED_GIB["dest"] + sum(NEED_GIB[p] for p in ("src", "base") if out[p].is_relative_to(args.work))
    if free_gib(args.work) < on_work:
        raise SystemExit(f"--work {args.work}: {free_gib(args.work):.0f} GiB free, the run needs ~{on_work:.0f} GiB there "
                         "(pass --scratch on another file system)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    clock = Clock(args.budget_s)
    dev = "cpu" if args.small else "cuda"
    shapes = SMALL if args.small else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_lightx2v_clip.json"
    report: dict[str, Any] = {"bench": "bench_lightx2v_clip", "small": args.small, "model_id": shapes["model_id"],
                              "environment": environment(dev), "phases": {}, "cases": {}}
    phases = report["phases"]

    def save() -> None:  # after every phase and case: a run cut short still leaves what it measured
        report["wall_seconds"] = round(time.monotonic() - clock.t0, 1)
        path.write_text(json.dumps(report, indent=2, default=str))

    dest = args.work / "model"
    if args.reuse and (dest / "gpubake-manifest.json").is_file():
        phases["import"] = {"reused": str(dest)}
    else:
        shutil.rmtree(dest, ignore_errors=True)
        where = placement(args)
        for part in ("src", "base"):
            shutil.rmtree(where[part], ignore_errors=True)
        report["placement"] = {k: str(v) for k, v in where.items()}
        log(f"writing the LightX2V source into {where['src']} and the base into {where['base']}")
        phases["write_source"] = write_source(where["src"], args.small, args.seed)
        save()
        phases["write_base"] = write_base(where["base"], args.small, args.seed + 2, dev)
        save()
        log(f"source {phases['write_source']}, base {phases['write_base']}; importing into {dest}")
        phases["import"] = run_import(where["src"], where["base"], dest, shapes["model_id"])
        for part in ("src", "base"):  # RAM (/dev/shm) and disk back before the load
            shutil.rmtree(where[part], ignore_errors=True)
            if where[part].parent.name in ("scratch", "lx-bench") and not any(where[part].parent.iterdir()):
                where[part].parent.rmdir()
        save()
        log(f"import: {phases['import']['wall_seconds']} s wall, peak RSS {phases['import']['peak_rss_gib']} GiB")

    import torch

    from gpubake.provisioning.pipeline import load_serving_pipeline

    t0 = time.perf_counter()
    served = load_serving_pipeline(dest, dev)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    served.pipe.set_progress_bar_config(disable=True)
    phases["load"] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": rss_gib(),
                      "runtime": served.runtime()}
    if dev.startswith("cuda"):
        phases["load"]["resident_gpu_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    save()
    log(f"load: {phases['load']['seconds']} s, plan {served.plan}")

    run_cases(served.pipe, args, shapes, clock, dev, report["cases"], save)
    save()
    imp = phases["import"]
    if "wall_seconds" in imp:
        print(f"import: {imp['wall_seconds']} s wall (hash/validate {imp['summary'].get('validate_hash_seconds')} s), "
              f"peak RSS {imp['peak_rss_gib']} GiB, no GPU; {imp['summary']['quantized_layers']} layers, "
              f"{imp['summary']['exact_layers']} exact")
    print(f"load: {phases['load']['seconds']} s" + (f", {phases['load']['resident_gpu_gib']} GiB resident"
                                                     if "resident_gpu_gib" in phases["load"] else ""))
    for name, r in report["cases"].items():
        print(summary_line(name, r))
    print(f"wall {report['wall_seconds']} s -> {path}")
    return report


if __name__ == "__main__":
    main()

"""Profile: where one forward of a Wan 2.2 A14B expert spends its GPU time, by kernel class (issue 18).

    python bench/profile_forward.py --json-out prof.json --size 720p --layers 4 \
        --runtime attention=sparse-flex,sparse_block_q=128 --runtime attention=sparse-flex,sparse_block_q=128,fuse_act_quant=1
    python bench/profile_forward.py --device cpu --layers 1 --heads 2 --frames 5 --size 32x32 \
        --text-len 16 --json-out /tmp/p.json                  # CPU smoke, same path

The per-clip goals are sums of forwards; the bench rows say how long a forward takes, not
which kernels take it. This script builds the bench's random-weight expert (the real A14B
block, `--layers` of them: the blocks are identical, so a few give the per-block split),
converts its linears as the checkpoint format would (`--weights nvfp4|fp8`), and for each
`--runtime` (a ``GPUBAKE_RUNTIME`` string on top of this GPU's measured plan) applies the plan,
warms up (compile), times `--repeats` forwards with CUDA events, then records the same
forwards under `torch.profiler` and sums every GPU kernel's time by class (`CLASSES`: the
first pattern that matches its name). Output: per variant the forward's wall time, the
kernels' total, each class's ms a forward and a block, and the 30 heaviest kernels.
Predictions go in PREDICTIONS before a device run and are copied into the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# kernel class -> name pattern (searched, case-insensitive, in this order)
CLASSES: tuple[tuple[str, str], ...] = (
    ("attention (FlexAttention)", r"flex_attention|triton_tem_fused"),
    ("attention (FA3 / cuDNN / SDPA)", r"flash|fmha|attention|sdpa|cudnn"),
    ("GEMM (cuBLAS / CUTLASS)", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|wgmma"),
    ("activation quantization (gpubake Triton)", r"quant|fp8|e4m3|amax|scale"),
    ("fused elementwise / norms (inductor)", r"^triton_(poi|red|per)_"),
    ("other Triton", r"^triton|_kernel$"),
    ("copies / fills", r"copy|memcpy|memset|fill|cat"),
    ("elementwise (eager ATen)", r"elementwise|vectorized|reduce"),
)
PREDICTIONS = {
    # written 2026-12-03 14:20 UTC, before the first device run: the 720p 4-step clip's forward
    # (128-token sparse blocks + TMA) is 3.20 s; from the call rows ~1.1 s FlexAttention
    # (40 x 28.5 ms), ~1.3 s FP8 GEMMs at the measured rate, ~0.8 s the rest
    "720p:attention=sparse-flex,sparse_block_q=128": "per block: ~28.5 ms FlexAttention, ~32 ms GEMMs "
        "(self q/k/v/o 4 x 2.95 ms, FFN 2 x 9.1 ms at 75,600 rows), ~20 ms the rest (quantization, norms, "
        "RoPE, modulation): the rest is the part no kernel row has measured",
    "720p:attention=sparse-flex,sparse_block_q=128,fuse_act_quant=1": "inductor folds the activation "
        "quantization into the norm / modulation before q/k/v and the FFN: the quantization class shrinks "
        "by about half, the forward 1-3 % faster",
    # written 2026-12-04 20:15 UTC, before the first device run of either lever. GELU moved into the
    # down-projection's FP8 quantization: the inductor GELU kernel (1.40 ms a 720p block) goes, the
    # quantizer reads the same bytes and does a few more flops a value, so ~+0.1 ms there
    "720p:attention=sparse-flex,sparse_block_q=128,fuse_ffn_gelu=1": "GELU class gone from the fused "
        "elementwise kernels (-1.4 ms a block), quantization +0.1 ms: the forward ~1.5 % faster",
    "480p:attention=sparse-flex,fuse_ffn_gelu=1": "as at 720p, scaled by tokens (32,760 vs 75,600): "
        "-0.6 ms a block, the forward ~1.7 % faster (more of a 480p block is GEMMs' fixed cost)",
    # written 2026-12-04 21:05 UTC, before any device run of fuse_norm_quant (bench_norm_quant's bytes):
    # the three norm kernels (with their residual) and five of the block's ten quantizations become
    # three residual kernels and three fused passes
    "720p:attention=sparse-flex,sparse_block_q=128,fuse_norm_quant=1": "fused elementwise -3.1 + 2.4 ms a "
        "block (the LN kernels become residual kernels), quantization -2.05 + 1.2 (five calls become three "
        "fused passes, in the same class): the forward 2-3 % faster",
    "480p:attention=sparse-flex,fuse_norm_quant=1": "0.7-1.0 ms a block less, the forward 2.5-3.5 % faster",
}


def refuse(message: str) -> None:
    """Bad input: one line, exit 2, nothing written."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def parse_size(raw: str) -> tuple[int, int]:
    named = {"480p": (480, 832), "720p": (720, 1280)}
    if raw in named:
        return named[raw]
    m = re.fullmatch(r"(\d+)x(\d+)", raw)
    if not m:
        refuse(f"--size: {raw!r} is not 480p, 720p or HxW")
    return int(m[1]), int(m[2])


def kernel_table(prof, forwards: int, on: str = "CUDA") -> list[dict]:
    """Every GPU kernel of the profile (`on` "CUDA"; "CPU": every op's self time, for the CPU
    smoke run): name, class, calls and ms, per forward."""
    rows: dict[str, dict] = {}
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).split(".")[-1] != on:
            continue
        if on == "CUDA":
            us = getattr(ev, "device_time", None)
            us = getattr(ev, "cuda_time", 0.0) if us is None else us
        else:
            us = ev.self_cpu_time_total
        row = rows.setdefault(ev.name, {"kernel": ev.name, "class": kernel_class(ev.name), "calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += us
    out = [{"kernel": r["kernel"][:160], "class": r["class"], "calls_per_forward": round(r["calls"] / forwards, 2),
            "ms_per_forward": round(r["us"] / 1e3 / forwards, 3)} for r in rows.values()]
    return sorted(out, key=lambda r: -r["ms_per_forward"])


def by_class(kernels: list[dict], layers: int) -> dict[str, dict]:
    sums: dict[str, float] = {}
    for k in kernels:
        sums[k["class"]] = sums.get(k["class"], 0.0) + k["ms_per_forward"]
    return {c: {"ms_per_forward": round(ms, 2), "ms_per_block": round(ms / layers, 3)}
            for c, ms in sorted(sums.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("--model", default="wan2.2-t2v-a14b")
    ap.add_argument("--size", default="720p", help="480p, 720p or HxW")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4, help="blocks (identical; a few give the per-block split)")
    ap.add_argument("--heads", type=int, help="fewer heads of 128 (CPU smoke run)")
    ap.add_argument("--weights", choices=("nvfp4", "fp8"), default="nvfp4")
    ap.add_argument("--runtime", action="append", default=[],
                    help="a GPUBAKE_RUNTIME string on top of the measured plan (repeatable; default: auto)")
    ap.add_argument("--repeats", type=int, default=3, help="timed and profiled forwards per variant")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    height, width = parse_size(args.size)

    import torch

    import diffusers
    from bench_fidelity import random_expert
    from bench_quantize import expert_config
    from bench_step import make_inputs, sync, to_fp8, to_nvfp4
    from gpubake.provisioning.runtime import RuntimePlanError, apply_plan, bind_fp8, plan_from_env

    dev = torch.device(args.device)
    cfg = {k: v for k, v in expert_config(args.model, args.layers).items() if not k.startswith("_")}
    if args.heads:
        cfg["num_attention_heads"] = args.heads
    tokens = ((args.frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "argv": sys.argv[1:],
        "layers": cfg["num_layers"], "tokens": tokens, "weights": args.weights, "classes": dict(CLASSES),
        "variants": [],
    }
    try:  # every plan checked before the minutes of building and compiling
        plans = [(raw, plan_from_env(dev, raw)) for raw in (args.runtime or ["auto"])]
    except RuntimePlanError as exc:
        refuse(f"--runtime: {exc}")
    model = random_expert(cfg, args.device, seed=0)
    if args.weights == "fp8":
        result["convert"], _ = to_fp8(model, cfg["num_layers"])
    else:
        result["convert"] = to_nvfp4(model, cfg["num_layers"])
    lat, t, cond, _ = make_inputs(dev, args.frames, height, width, args.text_len)

    def forward():
        with torch.inference_mode():
            return model(hidden_states=lat, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]

    for raw, plan in plans:
        name = f"{args.size}:{raw}"
        row: dict = {"variant": name, "prediction": PREDICTIONS.get(name, ""), "plan": plan.__dict__.copy()}
        result["variants"].append(row)
        row["applied"] = apply_plan(model, plan)
        if args.weights == "fp8":
            bind_fp8({"expert": model}, dev, plan.fuse_act_quant)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(2):  # compile and its recompiles
            forward()
        sync(dev)
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        times = []
        for _ in range(args.repeats):
            sync(dev)
            t0 = time.perf_counter()
            forward()
            sync(dev)
            times.append(time.perf_counter() - t0)
        row["forward_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 2)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.repeats):
                forward()
            sync(dev)
        kernels = kernel_table(prof, args.repeats, "CUDA" if dev.type == "cuda" else "CPU")
        row["kernels_ms_per_forward"] = round(sum(k["ms_per_forward"] for k in kernels), 2)
        row["classes"] = by_class(kernels, cfg["num_layers"])
        row["top_kernels"] = kernels[:30]
        print(f"[{name}] forward {row['forward_ms']} ms, kernels {row['kernels_ms_per_forward']} ms "
              f"({cfg['num_layers']} blocks): "
              + "; ".join(f"{c} {v['ms_per_block']}" for c, v in row["classes"].items()), flush=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

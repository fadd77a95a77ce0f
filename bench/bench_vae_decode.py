"""Benchmark (issue 18): the Wan VAE's decode of one 81-frame clip, and where its time goes.

    python bench/bench_vae_decode.py --json-out $OUT/vae_decode_h200.json        # one H200 run
    python bench/bench_vae_decode.py --small --json-out /tmp/vae.json             # CPU smoke (tests)

The decode is a third of a sparse 4-step 480p clip (2.4 of 7.0 s, docs/benchmarks.md), so
this bench takes it apart without the 14B checkpoint the clip bench builds: diffusers'
`AutoencoderKLWan` at the Wan 2.1 VAE's real config (random weights, BF16, as the serving
loader leaves it), a random latent of the clip's shape (16 x 21 x 60 x 104 at 480p, 16 x 21 x
90 x 160 at 720p), `vae.decode` exactly as the pipeline calls it. Variants (each on the same
module, reset between them):

* ``eager``: diffusers as loaded (the plan's default);
* ``eager+cl``: the plan's ``vae_channels_last`` lever (Conv3d weights NDHWC);
* ``compiled``: the plan's ``vae_compile`` lever (`runtime.set_vae_compile`: the decoder's
  call compiled, its causal cache made dense before each call);
* ``compiled+cl``: both;
* ``eager+pad`` / ``compiled+pad``: the 96-filter causal convolutions with zero filters up to
  128, NDHWC (`vae_decode.set_vae_conv_padding`; bench_vae_conv.py measured the call alone);
* ``eager+fused`` / ``eager+pad+fused``: the residual blocks' RMS norm + SiLU as one Triton
  pass (`vae_decode.set_vae_fused_norm`, `kernels.vae_norm`).

Time: one warm-up decode (compile included; reported as ``first_s`` with the frames dynamo
compiled), then ``--repeats`` timed decodes, each ending at a CUDA sync; their median, and
the frames compiled during them (a stable graph set compiles none). Error: each variant's
video against ``eager``'s (relative Frobenius error and PSNR on [-1, 1]). Peak: the timed
decodes' ``max_memory_allocated``. ``--profile``: one more decode of ``eager`` and of
``compiled`` under torch.profiler: CUDA time per kernel, the top kernels and a sum per
kind (convolution, layout transform, Triton (inductor), other), against the decode's wall.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PREDICTIONS = {
    "eager": "as the 4-step clips' decode (bench_clip): 2.4 s at 480p, 5.3 s at 720p",
    "eager+cl": "7-9 % below eager (the clips' decode: 2.43 -> 2.27 s, 5.28 -> 4.80 s)",
    "compiled": "15-30 % below eager once its graphs are compiled (inductor fuses the RMS norms, "
                "SiLUs, causal-cache copies and pads around cuDNN's convolutions); no frame compiled "
                "during the timed decodes (the dense-cache fix; the H200 clip run before it: 0.26x)",
    "compiled+cl": "within 5 % of compiled (inductor picks convolution layouts itself)",
    "eager+pad": "eager less ~0.19 s at 480p (120 calls of the 96-filter conv, 3.90 -> 2.36 ms)",
    "compiled+pad": "compiled less 0.1-0.2 s at 480p",
    "eager+fused": "eager less 0.4-0.6 s at 480p (the norms' and SiLUs' share of eager's ~1.0 s outside the "
                   "convolutions), within 20 % of compiled",
    "eager+pad+fused": "eager+fused less ~0.19 s: the fastest decode without a compile",
    # written 2026-12-04 before its first run: under compile the fused norm's forward is diffusers'
    # arithmetic (rms_norm_silu_reference), so inductor gets the same graph with the SiLU moved
    # (on the CPU: the same graphs, the same video bit for bit)
    "compiled+pad+fused": "within 3 % of compiled+pad (the 4-step clips' compiled decode went 1.31 -> 1.74 s "
                          "between 12-01 and 12-04 with this lever on since 12-03: if this row is the slow one, "
                          "the lever is why)",
    "profile": "convolutions 50-70 % of eager's CUDA time; RMS norms (fp32 passes), SiLUs, cats and "
               "pads most of the rest",
}
SIZES = {"480p": (60, 104), "720p": (90, 160)}  # latent rows x columns (8x spatial compression)
LATENT_FRAMES = 21  # 81 frames (4x temporal compression, the first frame alone)
SMALL_SIZES = {"480p": (4, 6), "720p": (4, 8)}
SMALL_LATENT_FRAMES = 3
VARIANTS = ("eager", "eager+cl", "compiled", "compiled+cl", "eager+pad", "compiled+pad", "eager+fused",
            "eager+pad+fused", "compiled+pad+fused")

# kernel-name fragments per kind; the raw top kernels are reported beside the sums
KINDS = (
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("convolution", ("conv", "implicit", "xmma", "cutlass", "cudnn", "fprop", "sm90_", "sm80_", "gemm")),
    ("triton", ("triton",)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", required=True, help="where the JSON goes")
    p.add_argument("--sizes", default="480p,720p", help="comma-separated: 480p, 720p (default both)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=2, help="timed decodes per variant (default 2)")
    p.add_argument("--profile", action="store_true",
                   help="profile one decode of eager and of compiled, those of --variants (first size)")
    p.add_argument("--conv-shapes", action="store_true",
                   help="with --profile: the eager decode's convolutions by input shape and CUDA time")
    p.add_argument("--small", action="store_true", help="the CPU with the tiny VAE config (tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    for flag, got, known in (("--sizes", args.sizes, SIZES), ("--variants", args.variants, VARIANTS)):
        bad = [g for g in got if g not in known]
        if bad or not got:
            p.error(f"{flag}: {', '.join(bad) or 'empty'}: choose from {', '.join(known)}")
    if args.repeats < 1:
        p.error("--repeats: at least 1")
    return args


def set_variant(vae: Any, name: str) -> None:
    from gpubake.provisioning import runtime

    from gpubake.provisioning import vae_decode

    flags = set(name.split("+")[1:])
    runtime.set_vae_layout(vae, "cl" in flags)
    vae_decode.set_vae_conv_padding(vae, "pad" in flags)
    vae_decode.set_vae_fused_norm(vae, "fused" in flags)
    runtime.set_vae_compile(vae, name.startswith("compiled"))


def frames_compiled() -> int:
    from bench_clip import dynamo_counts

    return dynamo_counts()["dynamo_frames_compiled"]


def graph_breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {reason[:200]: int(n) for reason, n in counters["graph_break"].items()}


def decode(vae: Any, z: Any, cuda: bool) -> tuple[Any, float]:
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = vae.decode(z, return_dict=False)[0]
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compare(out: Any, ref: Any) -> dict[str, float]:
    import math

    d = (out.float() - ref.float())
    mse = float(d.pow(2).mean())
    return {"rel_err": float(d.norm() / ref.float().norm().clamp_min(1e-30)),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)}  # peak-to-peak 2 on [-1, 1]


def kind_of(kernel: str) -> str:
    low = kernel.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def profile(vae: Any, z: Any, cuda: bool) -> dict[str, Any]:
    """CUDA (or CPU) time per kernel of one decode, summed per kind, the top 12 kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch_profile(activities=acts) as prof:
        _, wall = decode(vae, z, cuda)
    rows = []
    for ev in prof.key_averages():
        us = ev.device_time_total if cuda else ev.self_cpu_time_total
        if us > 0 and (not cuda or ev.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((ev.key, us / 1e6, ev.count))
    rows.sort(key=lambda r: -r[1])
    kinds: dict[str, float] = {}
    for key, s, _ in rows:
        kinds[kind_of(key)] = kinds.get(kind_of(key), 0.0) + s
    return {"wall_s": round(wall, 4), "kernel_s": round(sum(r[1] for r in rows), 4),
            "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:160], "s": round(s, 4), "calls": n, "kind": kind_of(k)} for k, s, n in rows[:12]]}


def conv_shapes(vae: Any, z: Any, cuda: bool) -> list[dict[str, Any]]:
    """The convolutions of one eager decode grouped by their input shapes, by CUDA time: which
    of the decoder's convolutions the slow kernels belong to."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts, record_shapes=True) as prof:
        decode(vae, z, cuda)
    rows = [(ev.input_shapes, (ev.device_time_total if cuda else ev.cpu_time_total) / 1e6, ev.count)
            for ev in prof.key_averages(group_by_input_shape=True) if ev.key == "aten::convolution"]
    rows.sort(key=lambda r: -r[1])
    return [{"input_shapes": str(shapes)[:200], "s": round(s, 4), "calls": n} for shapes, s, n in rows[:16]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import diffusers
    from diffusers import AutoencoderKLWan

    from gpubake.provisioning import tiny

    cuda = not args.small and torch.cuda.is_available()
    if not args.small and not cuda:
        print("bench_vae_decode: no CUDA device (use --small for the CPU smoke)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**tiny.VAE_CONFIG) if args.small else AutoencoderKLWan()  # defaults: Wan 2.1 VAE
    vae = vae.to(dev, dtype).eval()
    out_path = Path(args.json_out)
    result: dict[str, Any] = {
        "bench": "vae_decode", "predictions": PREDICTIONS, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda},
        "dtype": str(dtype), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sizes": {}}

    def write() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out_path)

    sizes = SMALL_SIZES if args.small else SIZES
    frames = SMALL_LATENT_FRAMES if args.small else LATENT_FRAMES
    for size in args.sizes:
        h, w = sizes[size]
        g = torch.Generator(device=dev).manual_seed(args.seed)
        z = torch.randn(1, vae.config.z_dim, frames, h, w, device=dev, generator=g, dtype=dtype)
        rows: dict[str, Any] = {}
        result["sizes"][size] = {"latent": list(z.shape), "variants": rows}
        ref = None
        for name in args.variants:
            torch._dynamo.reset()  # a compiled graph asserts its weights' strides: a layout change needs new graphs
            set_variant(vae, name)
            f0 = frames_compiled()
            out, first = decode(vae, z, cuda)
            f1 = frames_compiled()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.repeats):
                out, s = decode(vae, z, cuda)
                times.append(s)
            row = {"first_s": round(first, 3), "first_frames_compiled": f1 - f0,
                   "median_s": round(statistics.median(times), 4), "times_s": [round(t, 4) for t in times],
                   "timed_frames_compiled": frames_compiled() - f1, "video": list(out.shape),
                   "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   "graph_breaks": graph_breaks()}
            if ref is None:
                ref = out
            row.update(compare(out, ref))
            rows[name] = row
            print(f"{size} {name}: {row['median_s']:.3f} s (first {first:.1f} s, {row['first_frames_compiled']} "
                  f"frames compiled, {row['timed_frames_compiled']} in the timed decodes), "
                  f"err {row['rel_err']:.2e}, peak {row['peak_alloc_gib']} GiB", flush=True)
            write()
        if args.profile and size == args.sizes[0]:
            prof = {}
            for name in [v for v in ("eager", "compiled") if v in args.variants]:
                torch._dynamo.reset()
                set_variant(vae, name)
                decode(vae, z, cuda)  # compiled: its graphs exist (or compile now, outside the profile)
                prof[name] = profile(vae, z, cuda)
                print(f"{size} profile {name}: wall {prof[name]['wall_s']} s, kernels {prof[name]['kernel_s']} s, "
                      f"{prof[name]['by_kind_s']}", flush=True)
            if args.conv_shapes:
                set_variant(vae, "eager")
                prof["eager_conv_shapes"] = conv_shapes(vae, z, cuda)
                for row in prof["eager_conv_shapes"]:
                    print(f"{size} conv {row['s']:.4f} s {row['calls']} calls {row['input_shapes']}", flush=True)
            result["sizes"][size]["profile"] = prof
            write()
        set_variant(vae, "eager")
        del z, ref, out
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())

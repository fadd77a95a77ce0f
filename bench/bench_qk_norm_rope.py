"""Benchmark: the self-attention's Q/K RMS norm + RoPE, diffusers' ops (eager and compiled) vs
gpubake's one Triton pass (`kernels.qk_norm_rope`), at the 480p and 720p token counts (issue 18).

    python bench/bench_qk_norm_rope.py --json-out qk.json [--tokens 32760,75600] [--block-r 4,8,16]
    TRITON_INTERPRET=1 python bench/bench_qk_norm_rope.py --device cpu --tokens 96 --heads 2 --json-out /tmp/q.json

Inputs as the A14B's: Q and K [1, S, 40 x 128] bf16 (random, K with a per-channel offset), the
norms' bf16 weights around 1, diffusers' `WanRotaryPosEmbed` tables for an 81-frame clip of
that size (any S: the frames x rows x columns grid nearest to it). Each variant: median ms of
3 rounds of 10 calls (CUDA events), and its output against the eager reference: the fraction
of bit-equal values and the largest difference in bf16 ulps of the reference value.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PREDICTION = ("written 2026-12-03 14:40 UTC before the run: the compiled reference ~3.3 ms at 720p "
              "(the 720p profile's 3.28 ms), ~1.4 ms at 480p; the fused pass reads Q and K twice (the "
              "second from L2) and writes them once: ~0.8-1.1 ms at 720p, ~0.35-0.5 ms at 480p, "
              "best at 8-16 tokens a program")


def grid_for(tokens: int) -> tuple[int, int, int]:
    """(latent frames, rows, columns) of patches with that many tokens: 21 frames of the 480p
    or 720p grid when they fit, else one frame row of `tokens` patches (a CPU smoke size)."""
    for rows, cols in ((30, 52), (45, 80)):
        if tokens == 21 * rows * cols:
            return 21, rows, cols
    return 1, 1, tokens


def ulps(a, b):
    """|a - b| in bf16 ulps of b (b's exponent), elementwise, float32."""
    import torch

    b32 = b.float()
    exp = torch.floor(torch.log2(b32.abs().clamp_min(2.0 ** -126)))
    return (a.float() - b32).abs() / torch.exp2(exp - 7)


def time_ms(fn, dev, calls: int = 10) -> float:
    """ms a call: `bench_attention.time_ms` (median of 3 rounds of CUDA events) on a GPU, one
    timed call on the CPU (the smoke run)."""
    if dev.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return round((time.perf_counter() - t0) * 1e3, 3)
    from bench_attention import time_ms as cuda_time_ms

    return round(cuda_time_ms(fn, calls=calls), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("--tokens", default="32760,75600")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--block-r", default="4,8,16,32", help="tokens a program, one variant each")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled reference (CPU smoke)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from gpubake.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

    dev = torch.device(args.device)
    hd, heads = 128, args.heads
    result: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "versions": {"torch": torch.__version__}, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                    "argv": sys.argv[1:], "prediction": PREDICTION, "sizes": []}
    for tokens in (int(t) for t in args.tokens.split(",")):
        frames, rows, cols = grid_for(tokens)
        rope = WanRotaryPosEmbed(hd, (1, 2, 2), 1024).to(dev)
        cos, sin = rope(torch.zeros(1, 16, frames, rows * 2, cols * 2, device=dev))
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, tokens, heads * hd, device=dev, generator=gen).to(torch.bfloat16)
        k = (torch.randn(1, tokens, heads * hd, device=dev, generator=gen)
             + torch.randn(1, 1, heads * hd, device=dev, generator=gen)).to(torch.bfloat16)
        norms = []
        for _ in range(2):
            n = torch.nn.RMSNorm(heads * hd, eps=1e-6).to(device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                n.weight.copy_(1 + 0.1 * torch.randn(heads * hd, device=dev, generator=gen))
            norms.append(n)
        size = {"tokens": tokens, "grid": [frames, rows, cols], "variants": []}
        result["sizes"].append(size)
        with torch.inference_mode():
            ref_q, ref_k = qk_norm_rope_reference(q, k, *norms, cos, sin, heads)
            cases = {"diffusers eager": lambda: qk_norm_rope_reference(q, k, *norms, cos, sin, heads)}
            if not args.no_compile:
                cases["diffusers compiled (the plan's now)"] = torch.compile(
                    lambda: qk_norm_rope_reference(q, k, *norms, cos, sin, heads), dynamic=False)
            for br in (int(b) for b in args.block_r.split(",")):
                cases[f"fused, {br} tokens a program"] = (lambda br=br: qk_norm_rope(q, k, *norms, cos, sin, heads, block_r=br))
            for name, fn in cases.items():
                row: dict = {"variant": name}
                try:
                    row["ms"] = time_ms(fn, dev)
                    oq, ok = fn()
                    out, ref = torch.cat([oq.flatten(), ok.flatten()]), torch.cat([ref_q.flatten(), ref_k.flatten()])
                    row["bit_equal_fraction"] = round(float((out == ref).float().mean()), 6)
                    row["max_ulps"] = round(float(ulps(out, ref).max()), 3)  # of the value: large where it cancels
                    row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())  # the values' RMS is ~1
                except Exception as exc:  # a variant that does not run here is a result
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                size["variants"].append(row)
                print(f"[{tokens}] {json.dumps(row)}", flush=True)
                args.json_out.write_text(json.dumps(result, indent=2))
        moved = 2 * 2 * q.numel() * q.element_size()  # Q and K read once, written once
        size["bytes_read_and_written_once"] = moved
    args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

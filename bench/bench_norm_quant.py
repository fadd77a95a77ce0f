"""Benchmark: a Wan block's residual + LayerNorm + modulation and the FP8 quantization of the
linears it feeds, as the plan runs it (inductor's fused kernel writing bf16, then gpubake's
`fp8_rowwise` once per consuming linear) against `kernels.norm_quant.layer_norm_fp8` (one pass
writing E4M3), at the 480p and 720p token counts (issue 18).

    python bench/bench_norm_quant.py --json-out nq.json [--tokens 32760,75600]
    TRITON_INTERPRET=1 python bench/bench_norm_quant.py --device cpu --tokens 40 --dim 256 --json-out /tmp/n.json

Inputs as the A14B's: bf16 hidden states and an attention output [1, S, 5,120], the block's
fp32 modulation chunks (views of scale_shift_table + temb). Per norm of the block
(`norm1`: modulated, three consumers, Q/K/V; `norm2`: affine, one, the cross-attention's Q;
`norm3`: modulated, one, the FFN's up-projection):

* ``plan``: one compiled function, the residual (h + a * gate) and the norm as diffusers writes
  them (inductor fuses both into one kernel, as in the block), then `fp8_rowwise` once per
  consumer (what each NVFP4Linear does on hopper-fp8);
* ``fused``: the compiled residual alone, then `layer_norm_fp8` once.

Median ms of 3 rounds of 10 calls (CUDA events); the fused codes against the plan's: the
fraction of equal bytes, the largest distance in E4M3 codes, the scales' largest relative gap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_qk_norm_rope import time_ms  # noqa: E402

PREDICTION = ("written 2026-12-04 21:00 UTC before any run, from the 2026-12-03 480p profile (the block's three "
              "norm kernels 0.42-0.53 ms, each fused with the residual before it, at ~3 TB/s; fp8_rowwise "
              "0.177 ms a call at 32,760 x 5,120): at 480p plan 1.0 / 0.6 / 0.7 ms (norm1 / norm2 / norm3), "
              "fused ~0.5 each (the residual kernel, 6 bytes a value, ~0.35 ms; the fused pass, 3 bytes, "
              "~0.17): 0.7-1.0 ms a block less (2.5-3.5 %), 1.6-2.3 ms at 720p (2-3 %); codes equal on "
              ">= 99.9 % of the values")
NORMS = {  # name -> (modulated, affine, consumers)
    "norm1": (True, False, 3),
    "norm2": (False, True, 1),
    "norm3": (True, False, 1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("--tokens", default="32760,75600")
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    try:
        token_counts = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        print(f"--tokens: {args.tokens!r} is not a comma-separated list of integers", file=sys.stderr)
        raise SystemExit(2) from None
    if args.dim <= 0 or any(t <= 0 for t in token_counts):
        print("--tokens, --dim: must be positive", file=sys.stderr)
        raise SystemExit(2)

    import torch

    from gpubake.kernels.convert_triton import fp8_rowwise
    from gpubake.kernels.norm_quant import layer_norm_fp8

    dev = torch.device(args.device)
    compile_ = torch.compile if dev.type == "cuda" else (lambda fn, **kw: fn)  # CPU smoke: eager
    result: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "versions": {"torch": torch.__version__}, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                    "argv": sys.argv[1:], "prediction": PREDICTION, "sizes": []}
    eps, k = 1e-6, args.dim
    for tokens in token_counts:
        gen = torch.Generator(device=dev).manual_seed(tokens)
        h = torch.randn(1, tokens, k, device=dev, generator=gen).to(torch.bfloat16)
        a = torch.randn(1, tokens, k, device=dev, generator=gen).to(torch.bfloat16)
        table = torch.randn(1, 6, k, device=dev, generator=gen) * 0.3
        shift, scale, gate = table.chunk(6, dim=1)[:3]
        w = 1 + 0.1 * torch.randn(k, device=dev, generator=gen)
        b = 0.1 * torch.randn(k, device=dev, generator=gen)
        size: dict = {"tokens": tokens, "dim": k, "norms": []}
        result["sizes"].append(size)
        for name, (modulated, affine, consumers) in NORMS.items():
            mod = {"scale": scale, "shift": shift} if modulated else {}
            aff = {"weight": w, "bias": b} if affine else {}

            def residual_and_norm(h, a, mod=mod, aff=aff):  # the block's lines, one inductor graph
                h2 = (h.float() + a * gate).type_as(h)
                n = torch.nn.functional.layer_norm(h2.float(), (k,), aff.get("weight"), aff.get("bias"), eps)
                if mod:
                    n = n * (1 + mod["scale"]) + mod["shift"]
                return h2, n.type_as(h2)

            residual_only = compile_(lambda h, a: (h.float() + a * gate).type_as(h), dynamic=False)
            plan_norm = compile_(residual_and_norm, dynamic=False)

            def plan(consumers=consumers, plan_norm=plan_norm):
                h2, n = plan_norm(h, a)
                rows = n.reshape(-1, k)
                return h2, [fp8_rowwise(rows) for _ in range(consumers)]

            def fused(residual_only=residual_only, mod=mod, aff=aff):
                h2 = residual_only(h, a)
                return h2, [layer_norm_fp8(h2, eps, **aff, **mod)]

            row: dict = {"norm": name, "modulated": modulated, "affine": affine, "consumers": consumers}
            try:
                with torch.inference_mode():
                    row["plan_ms"] = time_ms(plan, dev)
                    row["fused_ms"] = time_ms(fused, dev)
                    h_plan, (pq, ps) = (lambda out: (out[0], out[1][0]))(plan())
                    h_fused, (fq, fs) = (lambda out: (out[0], out[1][0]))(fused())
                row["saved_ms"] = round(row["plan_ms"] - row["fused_ms"], 4)
                same = fq.view(torch.uint8) == pq.view(torch.uint8)
                row["codes_equal_fraction"] = round(float(same.float().mean()), 6)
                row["max_code_distance"] = int((fq.view(torch.uint8).int() - pq.view(torch.uint8).int()).abs().max())
                row["scale_max_rel_gap"] = float(((fs - ps).abs() / ps).max())
                row["residual_equal"] = bool(torch.equal(h_plan, h_fused))
            except Exception as exc:  # a variant that does not run here is a result
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            size["norms"].append(row)
            print(f"[{tokens}] {json.dumps(row)}", flush=True)
            args.json_out.write_text(json.dumps(result, indent=2))
        done = [r for r in size["norms"] if "saved_ms" in r]
        size["saved_ms_a_block"] = round(sum(r["saved_ms"] for r in done), 4) if len(done) == len(NORMS) else None
    args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

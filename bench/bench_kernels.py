"""NVFP4 kernel benchmark: correctness checks, then timings, in one run (issue 3).

    python3 bench/bench_kernels.py [--smoke] [--json out.json]

Checks (fresh random data with outliers and special values; outputs poisoned with NaN
before each kernel writes them):
  * Triton quantizer bytes == CPU reference (`quantize_ref`), plain and swizzled scales;
  * FP8 / bf16 re-expression kernels == their CPU references (`fp8_ref`);
  * every GEMM variant's relative error against x @ dequant(W).T in float32 (TF32 off).
Timings: triton.testing.do_bench medians (two interleaved rounds, the lower kept, the
spread recorded) at the Wan 2.2 A14B shapes (M=32760 tokens for
480p x 81 frames; M=512 for cross-attention K/V): cuBLAS bf16, cuBLAS FP8 row-wise
(`torch._scaled_mm`, operands pre-quantized), the hopper-fp8 backend (scratch + cuBLAS),
its parts, the fused Triton W4A8 GEMM, dequant-bf16; and the quantizer's bandwidth
against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from gpubake.kernels import quantize_triton as qt  # noqa: E402
from gpubake.kernels.backends import get_backend  # noqa: E402
from gpubake.kernels.convert_triton import fp8_row_factors, fp8_rowwise, nvfp4_to_bf16, nvfp4_to_fp8  # noqa: E402
from gpubake.kernels.format import dequantize_ref, quantize_ref, swizzle_scales  # noqa: E402
from gpubake.kernels.fp8_ref import fp8_rowwise_ref, nvfp4_to_fp8_ref  # noqa: E402
from fused_gemm_triton import w4a8_gemm  # noqa: E402  (bench-only, beside this script)
from gpubake.kernels.selfcheck import selfcheck  # noqa: E402

SHAPES = [(32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120), (512, 5120, 5120)]
SMOKE_SHAPES = [(4096, 5120, 5120), (512, 5120, 5120)]
DEV = torch.device("cuda")
RESULTS: dict = {"checks": {}, "gemm": [], "quant": []}


def bench(fn, rep=200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def data(shape, seed, specials=False, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV)
    x = torch.where(torch.rand(shape, generator=g, device=DEV) < 0.01, x * 30, x)
    if specials:
        x = x * torch.exp(torch.randn(*shape[:-1], 1, generator=g, device=DEV) * 3)
        f = x.view(-1)
        f[16:32] = 0
        f[33] = -0.0
        f[50], f[70], f[90] = float("nan"), float("inf"), -float("inf")
        f[200:216] = 1e-35  # fp32 subnormals after scaling, E4M3 scale clamp
    return x.to(dtype)


def check(name, ok, detail=""):
    RESULTS["checks"][name] = bool(ok)
    print(f"check {name:48s} {'OK' if ok else 'FAIL'} {detail}", flush=True)


def same_q(a, b):
    ok = (torch.equal(a.data.cpu(), b.data) and torch.equal(a.global_scale.cpu(), b.global_scale)
          and torch.equal(a.block_scale.cpu().view(torch.uint8), b.block_scale.view(torch.uint8)))
    if not ok:
        print("   g", a.global_scale.item(), b.global_scale.item())
        show(a.data.cpu(), b.data, "data")
        show(a.block_scale.cpu().view(torch.uint8), b.block_scale.view(torch.uint8), "scale")
    return ok


def show(got, want, what):
    """Print the first mismatches (diagnosis from one run's output)."""
    d = (got != want).nonzero()
    if len(d):
        idx = [tuple(i.tolist()) for i in d[:6]]
        print(f"   {what}: {len(d)} mismatches, first {idx}: got {[got[i].item() for i in idx]} "
              f"want {[want[i].item() for i in idx]}")


def correctness():
    for i, (shape, dt) in enumerate([((2048, 5120), torch.bfloat16), ((777, 13824), torch.float32),
                                     ((300, 48), torch.float16)]):
        x = data(shape, 100 + i, specials=True, dtype=dt)
        ref = quantize_ref(x.cpu())
        check(f"quantize bit-exact {shape} {dt}", same_q(qt.quantize(x), ref))
        sw = qt.quantize(x, swizzled=True)
        check(f"quantize swizzled {shape}", torch.equal(
            sw.block_scale.cpu().view(torch.uint8), swizzle_scales(ref.block_scale).view(torch.uint8)))
        g = torch.tensor(0.01, device=DEV)
        check(f"quantize given scale {shape}", same_q(qt.quantize(x, g), quantize_ref(x.cpu(), 0.01)))
    # every bfloat16 value in [-6, 6], in blocks with 6.0 and global scale 1: coded as is,
    # so each rounding tie of the E2M1 grid is exercised on the GPU
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    v = v[torch.isfinite(v.float()) & (v.float().abs() <= 6)]
    v = torch.cat([v, torch.zeros(15 - len(v) % 15, dtype=torch.bfloat16)]).reshape(-1, 15)
    x = torch.cat([v, torch.full((len(v), 1), 6.0, dtype=torch.bfloat16)], dim=1)
    check("quantize bit-exact, every bf16 in [-6, 6]", same_q(qt.quantize(x.to(DEV), 1.0), quantize_ref(x, 1.0)))
    w = quantize_ref(data((1024, 5120), 7, specials=True).cpu())
    wd = w.to(DEV)
    out = torch.full((1024, 5120), float("nan"), device=DEV).to(torch.float8_e4m3fn)
    a, ra = nvfp4_to_fp8(wd, out)
    b, rb = nvfp4_to_fp8_ref(w)
    show(a.cpu().view(torch.uint8), b.view(torch.uint8), "fp8 weight")
    check("nvfp4_to_fp8 bit-exact", torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
          and torch.equal(ra.cpu(), rb))
    bf = nvfp4_to_bf16(wd, torch.full((1024, 5120), float("nan"), device=DEV, dtype=torch.bfloat16))
    r = dequantize_ref(w)
    nan_canon = lambda t: torch.where(torch.isnan(t), 0x7FC0, t.view(torch.int16))  # noqa: E731
    show(nan_canon(bf.cpu()), nan_canon(r), "bf16 weight")
    check("nvfp4_to_bf16 bit-exact (any NaN equal)", torch.equal(nan_canon(r), nan_canon(bf.cpu())))
    x = data((1000, 5120), 8, specials=True)
    a, sa = fp8_rowwise(x, torch.full((1000, 5120), float("nan"), device=DEV).to(torch.float8_e4m3fn),
                        torch.full((1000, 1), float("nan"), device=DEV))
    b, sb = fp8_rowwise_ref(x.cpu())
    show(a.cpu().view(torch.uint8), b.view(torch.uint8), "fp8 act")
    show(sa.cpu(), sb, "fp8 act scale")
    check("fp8_rowwise bit-exact", torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
          and torch.equal(sa.cpu(), sb))
    from gpubake.kernels.linear import NVFP4Linear
    lin = torch.nn.Linear(512, 384).to(DEV, torch.bfloat16)
    xin = data((3, 70, 512), 9)
    for name in ("hopper-fp8", "dequant-bf16", "cpu-reference"):
        m = NVFP4Linear.from_linear(lin, backend=name)
        with torch.no_grad():
            ref = xin.float() @ dequantize_ref(m.nvfp4_weight(), torch.float32).t() + lin.bias.float()
            y = m(xin)
        e = rel(y, ref)
        check(f"NVFP4Linear with bias, {name}", y.shape == (3, 70, 384) and e < 0.08, f"rel err {e:.4f}")
    sc = selfcheck(DEV)
    check("selfcheck(cuda)", sc["ok"], json.dumps(sc))
    RESULTS["selfcheck"] = sc


def rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


def gemm(M, K, N, seed):
    row = {"M": M, "K": K, "N": N}
    x = data((M, K), seed)
    w_hp = data((N, K), seed + 1)
    qw = qt.quantize(w_hp)
    w_deq = nvfp4_to_bf16(qw)                        # exact dequant(W) in bf16 ...
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = x.float() @ dequantize_ref(qw, torch.float32).t()  # ... and float32 reference
    hop, deq = get_backend("hopper-fp8"), get_backend("dequant-bf16")
    from gpubake.kernels.backends import HopperFp8
    hop_slow = HopperFp8(fast_accum=False)
    pw = hop.prepare(qw)
    xq, xs = fp8_rowwise(x)
    wq, ws = nvfp4_to_fp8(qw)
    factors = fp8_row_factors(qw)
    scratch = hop.scratch.get((N, K), torch.float8_e4m3fn, DEV)

    variants = {
        "bf16 cuBLAS (dequant W, reference)": lambda: torch.nn.functional.linear(x, w_deq),
        "fp8 rowwise _scaled_mm (pre-quantized)": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws.view(1, N), out_dtype=torch.bfloat16),
        "fp8 rowwise _scaled_mm, fast accum (pre-quantized)": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws.view(1, N), out_dtype=torch.bfloat16, use_fast_accum=True),
        "hopper-fp8 backend (act quant + W->fp8 scratch + cuBLAS fast accum)": lambda: hop.apply(x, pw),
        "hopper-fp8 backend, precise accum": lambda: hop_slow.apply(x, pw),
        "hopper-fp8, activations pre-quantized (fast accum)": lambda: torch._scaled_mm(
            xq, nvfp4_to_fp8(qw, scratch, factors)[0].t(), scale_a=xs,
            scale_b=factors[1].view(1, N), out_dtype=torch.bfloat16, use_fast_accum=True),
        "fused Triton W4A8 (act quant + GEMM)": lambda: w4a8_gemm(*fp8_rowwise(x), qw, factors),
        "fused Triton W4A8, activations pre-quantized": lambda: w4a8_gemm(xq, xs, qw, factors),
        "dequant-bf16 backend": lambda: deq.apply(x, deq.prepare(qw)),
        "part: fp8_rowwise(x)": lambda: fp8_rowwise(x),
        "part: nvfp4_to_fp8(W)": lambda: nvfp4_to_fp8(qw, scratch, factors),
    }
    times, errs, spread = {}, {}, {}
    for name, fn in variants.items():  # correctness of every variant first
        try:
            y = fn()
            if not name.startswith("part:"):
                y = y[0] if isinstance(y, tuple) else y
                errs[name] = rel(y, ref)
        except Exception as exc:  # noqa: BLE001 - report and go on
            errs[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    rounds: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(2):  # two interleaved rounds: their spread says what is noise
        for name, fn in variants.items():
            if not isinstance(errs.get(name), str):
                rounds[name].append(bench(fn))
    for name in variants:
        ts = rounds[name]
        times[name] = min(ts) if ts else None
        spread[name] = (max(ts) - min(ts)) / min(ts) if ts else None
        print(f"  {M}x{K}x{N} {name:60s} {ts} ms  err {errs.get(name)}", flush=True)
    row["spread"] = spread
    row["ms"], row["rel_err_vs_w4a16_fp32"] = times, errs
    base = times["bf16 cuBLAS (dequant W, reference)"]
    row["speedup_vs_bf16"] = {k: (base / v if v else None) for k, v in times.items() if not k.startswith("part:")}
    RESULTS["gemm"].append(row)
    del x, w_hp, ref, w_deq, xq, wq
    torch.cuda.empty_cache()


def quant_bandwidth(M, K):
    x = data((M, K), 99)
    n = x.numel()
    dst = torch.empty_like(x)
    t_copy = bench(lambda: dst.copy_(x))
    copy_bw = 2 * n * 2 / t_copy / 1e9  # TB/s: read + write
    g = qt.device_global_scale(x)
    out_bytes = n // 2 + n // 16
    rows = {"M": M, "K": K, "copy_TBps": copy_bw}
    for name, fn, bytes_ in [
        ("quantize, global scale given (1 pass)", lambda: qt.quantize(x, g), 2 * n + out_bytes),
        ("quantize, global scale from amax (2 passes)", lambda: qt.quantize(x), 4 * n + out_bytes),
        ("quantize, swizzled scales, scale given", lambda: qt.quantize(x, g, swizzled=True), 2 * n + out_bytes),
        ("fp8_rowwise (per-token FP8)", lambda: fp8_rowwise(x), 2 * n + n + 4 * M),
    ]:
        t = bench(fn)
        bw = bytes_ / t / 1e9
        rows[name] = {"ms": t, "TBps": bw, "fraction_of_copy": bw / copy_bw}
        print(f"  quant {M}x{K} {name:45s} {t:.4f} ms {bw:.2f} TB/s = {bw / copy_bw:.1%} of copy "
              f"({copy_bw:.2f} TB/s)", flush=True)
    RESULTS["quant"].append(rows)


def sweep(M, K):
    """Launch configurations of the memory-bound kernels (the defaults in the modules come
    from this table)."""
    from gpubake.kernels import convert_triton as ct

    x = data((M, K), 5)
    n = x.numel()
    g = qt.device_global_scale(x)
    w = qt.quantize(data((13824, 5120), 6))
    factors = fp8_row_factors(w)
    wout = torch.empty((13824, 5120), dtype=torch.float8_e4m3fn, device=DEV)
    rows = []
    for bb, nw in [(64, 2), (64, 4), (128, 2), (128, 4), (256, 4), (256, 8)]:
        t = bench(lambda: qt.quantize(x, g, block_b=bb, num_warps=nw))
        rows.append(("quantize", bb, nw, t, (2 * n + n // 2 + n // 16) / t / 1e9))
        if (bb, nw) in ((128, 4), (256, 4)):
            ct.CONVERT_BLOCK_B, ct.CONVERT_WARPS = bb, nw
            t = bench(lambda: nvfp4_to_fp8(w, wout, factors))
            rows.append(("nvfp4_to_fp8", bb, nw, t, (w.data.numel() * 1.125 + wout.numel()) / t / 1e9))
    for bk, nw in [(1024, 4), (2048, 4)]:
        ct.ROWWISE_BLOCK_K, ct.ROWWISE_WARPS = bk, nw
        t = bench(lambda: fp8_rowwise(x))
        rows.append(("fp8_rowwise", bk, nw, t, 3 * n / t / 1e9))
    ct.CONVERT_BLOCK_B, ct.CONVERT_WARPS = 256, 4
    ct.ROWWISE_BLOCK_K, ct.ROWWISE_WARPS = 1024, 4
    for r in rows:
        print(f"  sweep {r[0]:14s} block={r[1]:5d} warps={r[2]} {r[3]:.4f} ms {r[4]:.2f} TB/s", flush=True)
    RESULTS["sweep"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="small shapes, quick")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--sweep", action="store_true", help="also time kernel launch configurations")
    ap.add_argument("--checks-only", action="store_true", help="correctness checks, no timings")
    ap.add_argument("--sweep-only", action="store_true", help="correctness checks and the sweep, no GEMM table")
    args = ap.parse_args()
    t0 = time.time()
    RESULTS["env"] = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                      "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                      "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(RESULTS["env"]), flush=True)
    correctness()
    if args.checks_only:
        sys.exit(0 if all(RESULTS["checks"].values()) else 1)
    if args.sweep or args.sweep_only:
        sweep(32760, 5120)
    if args.sweep_only:
        if args.json:
            args.json.write_text(json.dumps(RESULTS, indent=1))
        sys.exit(0 if all(RESULTS["checks"].values()) else 1)
    for i, (M, K, N) in enumerate(SMOKE_SHAPES if args.smoke else SHAPES):
        gemm(M, K, N, 1000 + i)
    quant_bandwidth(*((4096, 5120) if args.smoke else (32760, 5120)))
    if not args.smoke:
        quant_bandwidth(13824, 5120)  # a weight
    RESULTS["seconds"] = time.time() - t0
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1))
    print("\n== summary (median ms; speedup vs bf16; rel. error vs x @ dequant(W).T fp32) ==")
    for row in RESULTS["gemm"]:
        print(f"M={row['M']} K={row['K']} N={row['N']}")
        for k, v in row["ms"].items():
            sp = row["speedup_vs_bf16"].get(k)
            e = row["rel_err_vs_w4a16_fp32"].get(k)
            print(f"  {k:60s} {v if v is None else round(v, 4)!s:>8} "
                  f"{'' if sp is None else f'{sp:.2f}x':>7} {'' if e is None else e if isinstance(e, str) else f'{e:.4f}'}")
    print("checks:", "ALL OK" if all(RESULTS["checks"].values()) else
          [k for k, v in RESULTS["checks"].items() if not v])
    print(f"total {RESULTS['seconds']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()

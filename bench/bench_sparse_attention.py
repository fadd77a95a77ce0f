"""Benchmark: block-sparse self-attention (FlexAttention, LightX2V's router) against dense.

    python bench/bench_sparse_attention.py --json-out $OUT/sparse_attention_h200.json   # one H200 run
    python bench/bench_sparse_attention.py --small --json-out /tmp/sparse.json          # CPU smoke (tests)

One Wan 2.2 A14B self-attention call, 1 x 40 heads x N tokens x 128, at 480x832x81 (32,760
tokens) and 720x1280x81 (75,600), per variant:

* ``sdpa-bf16``: torch SDPA in BF16 (cuDNN on Hopper): the dense baseline of the errors;
* ``fa3-fp8``: our FlashAttention-3 FP8 op (`kernels.attention_fa3`, the Hopper plan's
  choice), quantization compiled as in the model; skipped with the reason where the
  fa3-fwd wheel does not import;
* ``flex-dense``: FlexAttention with every block kept (keep 1.0): the kernel's own cost;
* ``sparse-flex-0.1`` / ``sparse-flex-0.2``: `kernels.attention_sparse` at keep 0.1 (LightX2V's
  90 % sparsity) and 0.2, blocks 64 x 128 (LightX2V's sm_90 blocks), router + mask + kernel
  under one torch.compile;
* ``sparse-flex-0.1-b128``: keep 0.1 with 128 x 128 blocks (the Triton kernel's own tile);
* ``router-0.1`` / ``router-0.1-b128``: the router and the BlockMask alone (the sparse path's
  overhead), 64- and 128-token query blocks; ``...-legacy``: the router as it was until
  2026-12-04 (`legacy_route`: K read twice for its smoothing), the peer of the current one
  (its chosen blocks checked equal, ``route_equal_*``). Until 2026-12-04 the router row
  returned the mask's partial-block indices, which do not depend on the route, so inductor
  dropped the route and the row timed nothing (0.08 ms);
* ``sparse-flex-0.1[-b128]-k<name>``: the same call with FlexAttention's Triton options
  `KERNEL_OPTIONS[name]` over the plan's own (`attention_sparse.TUNED_KERNEL_OPTIONS`, which
  the untuned twin runs), its output compared with the twin's (``rel_err_vs_untuned_*``).

Time: CUDA events around 5 calls after 2 warm-ups, median of 3 rounds (the first call, with
its compile, is reported apart as ``first_call_s``). Error: relative Frobenius error of the
output against ``sdpa-bf16`` on two kinds of input: ``gaussian`` (bench_attention's Wan-like
RMS-normed q, k with a channel offset: diffuse attention, the worst case for sparsity) and
``local`` (the same plus a smooth function of each token's (frame, row, column) position,
so nearby tokens attend to each other as in a video DiT). Neither is the distilled model's
attention: its fidelity is a clip's (bench_fidelity), this bench measures speed and how much
the route drops. A kernel check compares each compiled sparse variant against the torch
reference (`sparse_attention_reference`) at 4,096 tokens x 4 heads.

``--small``: the CPU, 2 heads x 64, two ragged token counts, eager FlexAttention (inductor's
CPU FlexAttention does not lower this mask), the FA3 torch reference in place of the wheel.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

# Predictions, written before the first device run (not yet measured). H100 measurements
# these extrapolate from: cuDNN BF16 37.7 / 209.9 ms, FA3 FP8 compiled 23.3 / 129.4 ms a call
# (docs/benchmarks.md, session 10); the H200 has the H100's SMs and clocks.
PREDICTIONS = {
    "sdpa-bf16": "as the H100's cuDNN BF16: 36-39 ms at 480p, 200-215 ms at 720p",
    "fa3-fp8": "as the H100: 22-24 ms / 125-132 ms; error vs BF16 ~0.11 (P's E4M3 rounding)",
    "flex-dense": "FlexAttention forward ~350-420 TFLOP/s at hd 128 (below cuDNN's ~580): 52-63 ms / 280-335 ms",
    "sparse-flex-0.1": "10 % of flex-dense's work at ~60-80 % of its efficiency plus ~0.5-1 ms of router: "
                       "7-11 ms / 36-55 ms, i.e. 2-3x over fa3-fp8; error vs BF16 0.5-0.9 on gaussian, "
                       "0.1-0.4 on local inputs",
    "sparse-flex-0.2": "13-20 ms / 70-105 ms; error below keep 0.1's on both inputs",
    "sparse-flex-0.1-b128": "within 20 % of sparse-flex-0.1 (128-row query tiles: the kernel's default)",
    "router-0.1": "0.3-1.0 ms / 0.7-2 ms (two mean-pools of 0.3-0.8 GB, a sort of 40 x 512 x 256 scores)",
    # written 2026-12-04 20:50 UTC before the run, from the 12-03 profile of a 480p / 720p block
    # (router kernels ~0.93 ms at 64-token blocks / ~1.5 ms at 128, with the sort 0.35 / 0.78):
    "router-0.1-legacy": "0.8-1.0 ms at 480p (64-token blocks), 1.3-1.6 ms at 720p (128)",
    "router-0.1 vs legacy": "the K mean pass (0.13 / 0.28 ms) gone, topk over int64 keys 2-4x faster "
                            "than the full sort: the router 0.3-0.5 ms less at 480p, 0.5-0.8 ms at 720p "
                            "(measured: 0.782 against 0.972 ms at 480p with topk; in the 720p block the topk "
                            "took 1.27 ms against the sort's 0.78, so the sort was put back)",
    "sparse-flex-0.1-kw4tma": "TMA loads on top of 4 warps at 64-row tiles: 0-7 % faster (TMA gave 5-7 % at "
                              "128-row tiles, 1-2 % at 64 with 8 warps)",
}
# FlexAttention's Triton tiles, swept on the sparse variants (`-k<name>` suffixes): torch 2.11's
# sm_90 default for BF16 at head dim 128 is BLOCK_M 128, BLOCK_N 64, 3 stages, 8 warps
# (template_heuristics, h100_default_flex_config). Predictions, written before the first run:
# 128-key tiles halve the inner loop's trips (each 128-key block is one tile, not two): 5-15 %;
# TMA loads on sm_90: 0-10 %; 4 warps instead of 8 at BLOCK_M 128: slower (-10 %); every variant
# within 1e-3 of the untuned one (the same blocks, another summation order).
KERNEL_OPTIONS = {
    "n128s2": {"BLOCK_N": 128, "num_stages": 2},
    "tma": {"USE_TMA": True},
    "n128s2tma": {"BLOCK_N": 128, "num_stages": 2, "USE_TMA": True},
    "w4": {"num_warps": 4},
    "s4": {"num_stages": 4},
    "safe": {"ROWS_GUARANTEED_SAFE": True},
    "w4tma": {"num_warps": 4, "USE_TMA": True},
    "w4s2": {"num_warps": 4, "num_stages": 2},
    "w4s4": {"num_warps": 4, "num_stages": 4},
}
PREDICTIONS_KERNEL_OPTIONS = "n128s2: 5-15 % faster; tma: 0-10 %; n128s2tma: 10-20 %; w4: ~10 % slower; s4, safe: within 3 %"
SIZES = {"32760": (21, 30, 52), "75600": (21, 45, 80)}  # latent frames x rows x columns after 1x2x2 patches
SMALL_SIZES = {"300": (3, 10, 10), "520": (2, 13, 20)}  # ragged for every block size used


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def inputs(grid: tuple[int, int, int], heads: int, d: int, dev, seed: int, local: bool):
    """q, k, v [1, H, N, D] BF16 as diffusers hands them to attention (views of [1, N, H, D]).

    `local`: a smooth function of the token's position, shared by q and k, is added before
    the RMS norm (low-frequency random Fourier features of (frame, row, column)), so tokens
    near each other in the clip score high against each other."""
    import torch

    n = math.prod(grid)
    g = torch.Generator(device=dev).manual_seed(seed)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    q = torch.randn(1, n, heads * d, device=dev, generator=g)
    k = torch.randn(1, n, heads * d, device=dev, generator=g) + 1.5 * torch.randn(1, 1, heads * d, device=dev, generator=g)
    if local:
        pos = torch.stack(torch.meshgrid(*(torch.arange(s, device=dev, dtype=torch.float32) / s for s in grid),
                                         indexing="ij"), -1).reshape(n, 3)
        freq = torch.randn(3, heads * d // 2, device=dev, generator=g) * 6.0
        feat = torch.cat([torch.sin(pos @ freq), torch.cos(pos @ freq)], -1)[None] * 2.0
        q, k = q + feat, k + feat
    q = rms(q).view(1, n, heads, d).transpose(1, 2)
    k = rms(k).view(1, n, heads, d).transpose(1, 2)
    v = torch.randn(1, n, heads, d, device=dev, generator=g).transpose(1, 2)
    return (q * 3.0).bfloat16(), (k * 3.0).bfloat16(), v.bfloat16()


def time_ms(fn, q, k, v, cuda: bool, calls: int = 5, rounds: int = 3) -> tuple[float, float]:
    """(median ms a call, seconds of the first call: the compile)."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    fn(q, k, v)
    sync()
    first = time.perf_counter() - t0
    fn(q, k, v)
    sync()
    ms = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(q, k, v)
        sync()
        ms.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(ms), first


def variants(cuda: bool) -> tuple[dict, dict]:
    """name -> fn(q, k, v) on [B, H, N, D], and name -> why it does not run here."""
    import torch
    import torch.nn.functional as F

    from gpubake.kernels import attention_fa3 as FA3
    from gpubake.kernels import attention_sparse as S

    compile_ = torch.compile if cuda else (lambda fn, **kw: fn)  # CPU: eager FlexAttention

    def sparse(keep: float, bq: int = S.BLOCK_Q, bk: int = S.BLOCK_K, opts: dict | None = None):
        return compile_(lambda q, k, v: S.flex_sparse_attention(q, k, v, keep, None, bq, bk, opts), dynamic=False)

    def router(route_fn, bq: int):
        def fn(q, k, v):  # what the kernel reads of the route: the full blocks' indices, and the map
            r = route_fn(q, k, 0.1, bq, S.BLOCK_K)
            bm = S.block_mask(r, q.shape[-2], k.shape[-2])
            return bm.full_kv_indices, r.keep
        return compile_(fn, dynamic=False)

    fns = {"sdpa-bf16": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    skipped = {}
    if not cuda:
        fns["fa3-fp8"] = lambda q, k, v: FA3.fa3_attention_reference(q, k, v)  # the wheel's arithmetic, in torch
    elif FA3.fa3_available():
        fns["fa3-fp8"] = torch.compile(lambda q, k, v: FA3.fa3_fp8_attention(q, k, v, q.shape[-1] ** -0.5))
    else:
        skipped["fa3-fp8"] = "the fa3-fwd wheel does not import"
    fns.update({"flex-dense": sparse(1.0), "sparse-flex-0.1": sparse(0.1), "sparse-flex-0.2": sparse(0.2),
                "sparse-flex-0.1-b128": sparse(0.1, 128, 128)})
    for bq, tag in ((S.BLOCK_Q, ""), (128, "-b128")):
        fns[f"router-0.1{tag}"] = router(S.route, bq)
        fns[f"router-0.1{tag}-legacy"] = router(legacy_route, bq)
    for tag, opts in KERNEL_OPTIONS.items():  # (on the CPU eager FlexAttention ignores them)
        fns[f"sparse-flex-0.1-k{tag}"] = sparse(0.1, opts=opts)
        fns[f"sparse-flex-0.1-b128-k{tag}"] = sparse(0.1, 128, 128, opts)
    return fns, skipped


def legacy_route(q, k, keep: float, block_q: int, block_k: int):
    """The router until 2026-12-04 (the peer of `attention_sparse.route`): K's mean subtracted
    before its pooling (K read twice); the same selection from the scores."""
    from gpubake.kernels import attention_sparse as S

    k_smooth = k.float() - k.float().mean(dim=-2, keepdim=True)
    scores = S.block_mean(q, block_q) @ S.block_mean(k_smooth, block_k).transpose(-1, -2)
    return S.route_from_scores(scores, keep, block_q, block_k)


def route_agreement(q, k, bq: int) -> float:
    """Share of (head, query block) rows whose chosen key blocks are the same under both routers
    (the smoothing's order of fp32 operations differs, so a near-tie can flip)."""
    from gpubake.kernels import attention_sparse as S

    a, b = S.route(q, k, 0.1, bq, S.BLOCK_K), legacy_route(q, k, 0.1, bq, S.BLOCK_K)
    return (a.keep == b.keep).all(dim=-1).float().mean().item()


def kernel_check(fns: dict, dev, small: bool) -> dict:
    """Each sparse variant against the torch reference of the same route (masked dense fp32)."""
    import torch

    from gpubake.kernels import attention_sparse as S

    grid, heads, d = ((2, 8, 16), 2, 64) if small else ((4, 32, 32), 4, 128)
    q, k, v = inputs(grid, heads, d, dev, seed=11, local=True)
    out = {"tokens": math.prod(grid), "heads": heads}
    with torch.inference_mode():
        for name, keep, bq, bk in (("flex-dense", 1.0, 64, 128), ("sparse-flex-0.1", 0.1, 64, 128),
                                   ("sparse-flex-0.2", 0.2, 64, 128), ("sparse-flex-0.1-b128", 0.1, 128, 128)):
            if name in fns:
                ref = S.sparse_attention_reference(q, k, v, S.route(q, k, keep, bq, bk))
                got = fns[name](q, k, v)
                out[name] = {"rel_err_vs_reference": round(rel_err(got, ref), 6), "finite": bool(torch.isfinite(got).all())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="CPU smoke: tiny ragged sizes, eager FlexAttention")
    ap.add_argument("--tokens", default="", help="comma-separated sizes (default 32760,75600; --small: 300,520)")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args(argv)

    import torch

    from gpubake.fsutil import write_json_atomic
    from gpubake.kernels import attention_sparse as S

    cuda = not args.small
    if cuda and not torch.cuda.is_available():
        print("error: --small runs on the CPU; the full run needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    # the sparse variants are one lambda (one code object) compiled per keep, block and size:
    # past dynamo's default limit of 8 it ran them eager, and eager FlexAttention materializes
    # the whole score matrix (the 2026-12-01 run's 720p rows asked for 852 GiB)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    sizes = SMALL_SIZES if args.small else SIZES
    if args.tokens:
        unknown = [t for t in args.tokens.split(",") if t not in sizes]
        if unknown:
            print(f"error: --tokens {','.join(unknown)}: not one of {', '.join(sizes)}", file=sys.stderr)
            return 2
        sizes = {t: sizes[t] for t in args.tokens.split(",")}
    heads, d = (2, 64) if args.small else (40, 128)
    fns, skipped = variants(cuda)
    if args.variants:
        wanted = args.variants.split(",")
        unknown = [w for w in wanted if w not in fns and w not in skipped]
        if unknown:
            print(f"error: --variants {','.join(unknown)}: not one of {', '.join([*fns, *skipped])}", file=sys.stderr)
            return 2
        wanted += [w.split("-k")[0] for w in wanted if "-k" in w]  # a tuned variant's untuned twin
        fns = {n: f for n, f in fns.items() if n in wanted or n == "sdpa-bf16"}  # the errors' baseline
        skipped = {n: why for n, why in skipped.items() if n in wanted}
    result: dict = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "small": args.small,
                    "versions": {"torch": torch.__version__}, "compiled": cuda, "heads": heads, "head_dim": d,
                    "predictions": {**PREDICTIONS, "kernel_options": PREDICTIONS_KERNEL_OPTIONS},
                    "kernel_options": KERNEL_OPTIONS, "skipped": skipped, "sizes": {}}
    result["kernel_check"] = kernel_check(fns, dev, args.small)
    print("kernel_check", json.dumps(result["kernel_check"]), flush=True)
    for n, grid in sizes.items():
        rows: dict = {}
        with torch.inference_mode():
            data = {kind: inputs(grid, heads, d, dev, seed=int(n), local=kind == "local") for kind in ("gaussian", "local")}
            base = {kind: fns["sdpa-bf16"](*qkv) for kind, qkv in data.items()}
            outs: dict = {}  # the untuned sparse variants' outputs, for their tuned twins
            for name, fn in fns.items():
                try:
                    ms, first = time_ms(fn, *data["gaussian"], cuda=cuda, calls=1 if args.small else 5,
                                        rounds=1 if args.small else 3)
                    row = {"ms": round(ms, 3), "first_call_s": round(first, 3)}
                    untuned = name.split("-k")[0] if "-k" in name else None
                    if name.startswith("router") and name.endswith("-legacy"):
                        for kind, qkv in data.items():
                            row[f"route_equal_{kind}"] = round(route_agreement(*qkv[:2], 128 if "b128" in name
                                                                               else S.BLOCK_Q), 6)
                    if not name.startswith("router"):
                        row["tflops_dense_equivalent"] = round(4 * int(n) ** 2 * d * heads / (ms * 1e-3) / 1e12, 2)
                        for kind, qkv in data.items():
                            o = fn(*qkv)
                            row[f"rel_err_vs_bf16_{kind}"] = round(rel_err(o, base[kind]), 5)
                            if untuned in outs.get(kind, {}):
                                row[f"rel_err_vs_untuned_{kind}"] = round(rel_err(o, outs[kind][untuned]), 6)
                            elif name in {n.split("-k")[0] for n in fns if "-k" in n}:
                                outs.setdefault(kind, {})[name] = o
                            row.setdefault("finite", True)
                            row["finite"] = row["finite"] and bool(torch.isfinite(o).all())
                except Exception as exc:  # one variant failing (a kernel, an OOM) must not lose the others
                    row = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
                rows[name] = row
                print(n, name, json.dumps(row), flush=True)
        ref_ms = rows.get("fa3-fp8", {}).get("ms")
        for r in rows.values():
            if ref_ms and "ms" in r:
                r["speedup_vs_fa3_fp8"] = round(ref_ms / r["ms"], 3)
        result["sizes"][n] = rows
        write_json_atomic(args.json_out, result)  # after each size: a killed run keeps what it measured
        del data, base, outs
        if cuda:
            torch.cuda.empty_cache()
    write_json_atomic(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: NVFP4 vs BF16 fidelity of FULL-SIZE Wan 2.2 A14B experts with random weights.

Both experts (high-noise `transformer`, low-noise `transformer_2`) have the exact A14B
shape (40 blocks, dim 5120, FFN 13824) and variance-preserving random weights (each
module's own PyTorch/diffusers initialiser). They run in the real diffusers WanPipeline
with the registry's boundary ratio, flow shift and guidance scales. Reduced, and said so:
- the UMT5 text encoder has the real output width (4096) but ONE layer and the tiny
  tokenizer (the encoder is shared by both pipelines, so it cancels out of the comparison);
- the VAE is the real Wan 2.1 VAE architecture with random weights (frames are not
  images of anything: PSNR/SSIM measure how the latent error survives the decoder);
- 17 frames and --steps denoising steps instead of 81 frames and 40 steps.
The BF16 run goes first; the experts are then converted IN PLACE to NVFP4Linear
(`quantize_model_inplace`, same math as `gpubake quantize`) and the same seeds re-run.

    python bench/bench_fidelity.py --out $OUT --steps 8
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path


def random_expert(cfg: dict, device: str, seed: int):
    """A WanTransformer3DModel with random BF16 weights made directly on `device`."""
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "reset_parameters") and mod is not model:
                mod.reset_parameters()  # Linear/Conv: kaiming-uniform; norms: ones/zeros
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, device=device) / dim**0.5)  # diffusers' own init
    model.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], tuple(cfg["patch_size"]), cfg["rope_max_seq_len"]).to(device)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="wan2.2-t2v-a14b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--res", default="480x832,720x1280", help="comma-separated HxW")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="fewer blocks (local smoke run)")
    ap.add_argument("--heads", type=int, help="fewer heads of 128 (local smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runtime", action="store_true",
                    help="also: BF16 + the plan's attention lever, and NVFP4 + the whole runtime plan (issue 7)")
    args = ap.parse_args()

    import diffusers
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from gpubake.kernels.backends import select_backend
    from gpubake.kernels.linear import bind_backends
    from gpubake.provisioning.fidelity import Settings, compare, contact_sheet, generate, summarize
    from gpubake.provisioning.models import get_model
    from gpubake.provisioning.quantize import quantize_model_inplace
    from gpubake.provisioning.tiny import _tokenizer

    dev = args.device
    m = get_model(args.model)
    heads = args.heads or m.hidden_dim // 128
    cfg = {"patch_size": [1, 2, 2], "num_attention_heads": heads, "attention_head_dim": 128, "in_channels": 16,
           "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": m.ffn_dim if not args.heads else 4 * heads * 128,
           "num_layers": args.layers or m.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
           "eps": 1e-6, "rope_max_seq_len": 1024}
    t0 = time.monotonic()
    tok = _tokenizer()
    torch.manual_seed(args.seed)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                                     feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)).to(dev, torch.bfloat16)
    vae = AutoencoderKLWan().to(dev, torch.float32)  # the real Wan 2.1 VAE architecture, random weights
    experts = [random_expert(cfg, dev, args.seed + 1), random_expert(cfg, dev, args.seed + 2)]
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=m.flow_shift,
                                    num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=experts[0],
                       transformer_2=experts[1], boundary_ratio=m.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.monotonic() - t0
    params = sum(p.numel() for p in experts[0].parameters())
    print(f"built in {build_s:.1f}s; expert params {params / 1e9:.3f}B", flush=True)

    resolutions = [tuple(int(v) for v in r.split("x")) for r in args.res.split(",")]
    prompt = "a red cat running on the beach at sunset"
    settings = {r: Settings(height=r[0], width=r[1], num_frames=args.frames, steps=args.steps,
                            guidance_scale=m.guidance_scale, guidance_scale_2=m.guidance_scale_2, max_sequence_length=64)
                for r in resolutions}
    runs = {}
    for r, s in settings.items():
        runs[("bf16", r)] = generate(pipe, prompt, args.seed, s, dev)
        print(f"bf16 {r}: {runs[('bf16', r)].seconds}s", flush=True)
    peak_bf16 = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    from gpubake.provisioning.runtime import RuntimePlan, apply_plan, plan_for

    plan = plan_for(torch.device(dev))
    plain = RuntimePlan(arch=plan.arch, gemm_backend=plan.gemm_backend)
    if args.runtime and plan.attention != "default":
        for e in experts:
            apply_plan(e, plain.with_(attention=plan.attention))
        for r, s in settings.items():
            runs[("bf16+attn", r)] = generate(pipe, prompt, args.seed, s, dev)
            print(f"bf16+{plan.attention} {r}: {runs[('bf16+attn', r)].seconds}s", flush=True)
        for e in experts:
            apply_plan(e, plain)

    t0 = time.monotonic()
    sqnr = {}
    for name, e in zip(("transformer", "transformer_2"), experts):
        for k, v in quantize_model_inplace(e, "default").items():
            sqnr[f"{name}/{k}"] = v
    gc.collect()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    convert_s = time.monotonic() - t0
    print(f"converted {len(sqnr)} linears in {convert_s:.1f}s", flush=True)
    backend = select_backend(torch.device(dev)).name  # $GPUBAKE_NVFP4_BACKEND or this GPU's default
    for e in experts:
        bind_backends(e, backend)
    backend_error = None
    for r, s in settings.items():
        try:
            runs[("nvfp4", r)] = generate(pipe, prompt, args.seed, s, dev)
        except Exception as exc:  # a backend still in development: record it, fall back, go on
            if backend == "dequant-bf16":
                raise
            backend_error = f"{backend}: {exc.__class__.__name__}: {str(exc)[:300]}"
            print("backend failed, falling back to dequant-bf16:", backend_error, flush=True)
            backend = "dequant-bf16"
            for e in experts:
                bind_backends(e, backend)
            plan = plan.with_(gemm_backend=backend)  # the --runtime plan binds it again
            runs[("nvfp4", r)] = generate(pipe, prompt, args.seed, s, dev)
        print(f"nvfp4 {r} ({backend}): {runs[('nvfp4', r)].seconds}s", flush=True)
    peak_nvfp4 = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    if args.runtime:
        for e in experts:
            apply_plan(e, plan)
        for r, s in settings.items():
            generate(pipe, prompt, args.seed, s, dev)  # compile for this shape
            runs[("nvfp4+plan", r)] = generate(pipe, prompt, args.seed, s, dev)
            print(f"nvfp4+plan {r}: {runs[('nvfp4+plan', r)].seconds}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    per_res = {}
    for r in resolutions:
        res = compare(runs[("bf16", r)], runs[("nvfp4", r)])
        res["settings"] = settings[r].__dict__
        per_res[f"{r[0]}x{r[1]}"] = res
        contact_sheet([(runs[("bf16", r)], runs[("nvfp4", r)])], args.out / f"contact_{r[0]}x{r[1]}.png")
        for variant in ("bf16+attn", "nvfp4+plan"):
            if (variant, r) in runs:
                extra = compare(runs[("bf16", r)], runs[(variant, r)])
                res[variant] = {k: extra[k] for k in ("psnr_db_mean", "ssim_mean", "latent_rel_err_per_step")
                                if k in extra}
    vals = [v for v in sqnr.values() if v is not None]
    report = {
        "model": args.model, "expert_config": cfg, "expert_params": params,
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "backend": backend, "backend_error": backend_error,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "build_seconds": round(build_s, 1), "convert_seconds": round(convert_s, 1),
        "peak_gpu_bytes_bf16": peak_bf16, "peak_gpu_bytes_nvfp4": peak_nvfp4,
        "layer_sqnr_db": {"count": len(vals), "min": min(vals), "mean": sum(vals) / len(vals), "max": max(vals)},
        "runtime_plan": plan.__dict__.copy() if args.runtime else None,
        "by_resolution": per_res,
        "summary": {k: summarize([v], sqnr) for k, v in per_res.items()},
    }
    (args.out / "fidelity_full.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "by_resolution"}, indent=2))
    for k, v in per_res.items():
        print(k, "latent rel err per step", v["latent_rel_err_per_step"], "psnr", v["psnr_db_mean"], "ssim", v["ssim_mean"])
        for variant in ("bf16+attn", "nvfp4+plan"):
            if variant in v:
                print(k, variant, "psnr", v[variant].get("psnr_db_mean"), "ssim", v[variant].get("ssim_mean"),
                      "latent rel err per step", v[variant].get("latent_rel_err_per_step"))


if __name__ == "__main__":
    main()

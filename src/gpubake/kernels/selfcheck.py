"""`selfcheck(device)`: does the NVFP4 path compute the right thing on THIS machine?
`fp8_selfcheck(backend, device)`: the same for an FP8-weight checkpoint's GEMM path.
`attention_selfcheck(kernel, device)`: the same question for an 8-bit attention kernel.
`qk_norm_rope_selfcheck`, `vae_norm_selfcheck`, `ffn_gelu_quant_selfcheck` (device): and for the
Triton passes the runtime plan's fusion levers turn on (`runtime.FUSED_KERNELS` names them).

Used by the boot self-test and, for attention, by the runtime plan before it picks a
kernel. The NVFP4 check is two checks on seeded random data (Gaussian with outliers):

1. the quantizer that runs here (Triton on CUDA, the reference on CPU) produces the same
   bytes and scales as `quantize_ref` on the CPU;
2. the selected backend's GEMM with bias matches ``x @ dequant(W).T + b`` (float32, CPU) within the
   tolerance of its arithmetic: relative Frobenius error of the output. A backend that
   quantizes activations with a layer's static scale (`blackwell-native`, for published
   W4A4 checkpoints) runs each GEMM a second time with one, calibrated on another draw of
   the same data (as a checkpoint's calibration set is not the input it meets), and reports
   that error too (``static_scale_max_rel_error``).

Tolerances are about 2x what each backend's arithmetic gives on this data (measured with
the CPU emulation in tests/kernels and on an H100, docs/kernels.md): float32 reference
exact up to summation order; bf16 weight rounding; FP8 (E4M3) re-rounding of weights and
per-token activations; NVFP4 activations (W4A4).
"""

from __future__ import annotations

import time

import torch

from gpubake.kernels.backends import select_backend
from gpubake.kernels.format import amax_finite, dequantize_ref, global_scale_from_amax, quantize_ref
from gpubake.kernels.quantizer import quantizer_for

TOLERANCE = {
    "cpu-reference": 1e-5,
    "dequant-bf16": 1e-2,
    "hopper-fp8": 8e-2,
    "blackwell-native": 0.25,
}
SHAPES = ((96, 256, 512), (7, 128, 48))  # (M, N, K): one tiled, one ragged

# FP8-weight paths (`kernels.fp8_linear`), against the float32 linear of the dequantized
# weight on this module's data. Measured (worst of SHAPES) on the CPU, torch 2.13, seed 1234:
# scaled-mm 0.0226 (E4M3 activations per token, bf16 output), dequant-bf16 0.0029 (bf16
# activations, weight, bias and output), reference 3.9e-8 (float32 throughout: summation
# order). The weight's own E4M3 rounding is the same for all three and is not in these
# numbers: against the source's float32 linear the paths measure 0.028 / 0.019 / 0.019
# (``source_rel_error``, reported, not checked: it is the format's, not the kernel's).
FP8_TOLERANCE = {"scaled-mm": 4e-2, "dequant-bf16": 6e-3, "reference": 1e-5}


def _data(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.01
    return torch.where(mask, x * 30.0, x)


def selfcheck(device: torch.device | str = "cpu") -> dict:
    """Run both checks on `device`; returns a JSON-ready dict (never raises on a mismatch)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    backend = select_backend(dev)
    gen = torch.Generator().manual_seed(1234)
    calibration = torch.Generator().manual_seed(5678)  # its own stream: the checked data stay the same
    worst = 0.0
    worst_static = 0.0
    bit_exact = True
    for M, N, K in SHAPES:
        w = _data((N, K), gen)
        x = _data((M, K), gen)
        if backend.needs_cuda:  # the GPU backends run bf16 activations
            x = x.bfloat16()
        ref_q = quantize_ref(w)
        q = quantizer_for(dev)(w.to(dev))  # on the CPU that is the reference itself
        bit_exact &= (torch.equal(q.data.cpu(), ref_q.data)
                      and torch.equal(q.block_scale.cpu().view(torch.uint8), ref_q.block_scale.view(torch.uint8))
                      and torch.equal(q.global_scale.cpu(), ref_q.global_scale))
        bias = torch.randn(N, generator=gen).to(x.dtype)
        q = ref_q.to(dev)
        ref = x.float() @ dequantize_ref(ref_q, torch.float32).t() + bias.float()
        worst = max(worst, _rel_error(backend.apply(x.to(dev), backend.prepare(q), bias.to(dev)), ref))
        if backend.uses_static_input_scale:
            g = global_scale_from_amax(amax_finite(_data((M, K), calibration)))
            pw = backend.prepare(q, g.to(dev))
            worst_static = max(worst_static, _rel_error(backend.apply(x.to(dev), pw, bias.to(dev)), ref))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    tol = TOLERANCE[backend.name]
    static = {"static_scale_max_rel_error": worst_static} if backend.uses_static_input_scale else {}
    return {
        "backend": backend.name,
        "device": str(dev),
        "ok": bool(bit_exact and worst <= tol and worst_static <= tol),
        "quantizer_bit_exact": bool(bit_exact),
        "max_rel_error": worst,
        **static,
        "tolerance": tol,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def fp8_selfcheck(backend: str, device: torch.device | str = "cpu") -> dict:
    """Run FP8-weight path `backend` on `device` on seeded data: FP8Linear (with bias) against
    the float32 linear of its dequantized weight; JSON-ready dict, never raises on a mismatch
    (a path the device cannot run, or one that crashes, is ``ok`` False with a ``reason``)."""
    from gpubake.kernels.fp8_linear import FP8Linear

    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(1234)
    tol = FP8_TOLERANCE.get(backend)
    out: dict = {"backend": backend, "device": str(dev), "format": "fp8", "tolerance": tol}
    worst = worst_source = 0.0
    try:
        for M, N, K in SHAPES:
            w = _data((N, K), gen)
            x = _data((M, K), gen)
            if backend != "reference":  # the fast paths run bf16 activations, as in a model
                x = x.bfloat16()
            bias = torch.randn(N, generator=gen).to(x.dtype)
            lin = torch.nn.Linear(K, N)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(bias.float())
            layer = FP8Linear.from_linear(lin.to(dev), backend=backend)
            y = layer(x.to(dev))
            ref = x.float() @ layer.dequantized().cpu().t() + bias.float()
            worst = max(worst, _rel_error(y, ref))
            worst_source = max(worst_source, _rel_error(y, x.float() @ w.t() + bias.float()))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as exc:
        return {**out, "ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                "seconds": round(time.perf_counter() - t0, 3)}
    ok = tol is not None and worst <= tol
    return {**out, "ok": bool(ok), "max_rel_error": worst, "source_rel_error": worst_source,
            "seconds": round(time.perf_counter() - t0, 3),
            **({} if ok else {"reason": f"relative error {worst:.3g} > {tol}" if tol is not None
                              else f"no tolerance for backend {backend!r}"})}


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of a backend's output against the float32 CPU reference (inf if not finite)."""
    y = y.float().cpu()
    return float((y - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")


# An 8-bit attention kernel may be as far from exact attention as its own quantized
# arithmetic (its torch reference) is, times ATTENTION_FACTOR: the kernel rounds P at
# other points of its online softmax, so it is not bit-close to the reference (on the H100
# at this check's inputs: fa3-fp8 2.3e-2 and cudnn-fp8 5.3e-2 from their references, whose
# own error against exact attention is ~6e-2). A broken kernel, a wrong layout or a wheel
# built for another GPU is off by O(1).
ATTENTION_FACTOR = 2.0
ATTENTION_SHAPE = (1, 2, 2048, 128)  # [B, H, N, D]; N a multiple of 64 (sage-int8's tiles)


def attention_selfcheck(kernel: str, device: torch.device | str) -> dict:
    """Run 8-bit attention `kernel` on `device`, compare with exact attention and with its
    torch reference (CPU); returns a JSON-ready dict, ``ok`` False with ``reason`` instead of raising."""
    import torch.nn.functional as F

    from gpubake.kernels.attention import lowp_attention, reference_of

    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(4321)
    q, k, v = (torch.randn(ATTENTION_SHAPE, generator=gen) for _ in range(3))
    k = k + 3.0 * torch.randn(ATTENTION_SHAPE[-1], generator=gen)  # the per-channel offset smoothing removes
    q, k, v = (x.bfloat16() for x in (q, k, v))
    out: dict = {"kernel": kernel, "device": str(dev), "factor": ATTENTION_FACTOR}
    try:
        y = lowp_attention(q.to(dev), k.to(dev), v.to(dev), kernel=kernel, min_tokens=1).float().cpu()
    except Exception as exc:
        return {**out, "ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ref = reference_of(kernel)(q, k, v).float()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")

    err, ref_err = rel(y, exact), rel(ref, exact)
    bound = ATTENTION_FACTOR * max(ref_err, 5e-3)  # 5e-3: bf16 output rounding, if the reference were exact
    ok = err <= bound
    return {**out, "ok": ok, "rel_error": err, "reference_rel_error": ref_err, "vs_reference": rel(y, ref),
            "bound": bound, "seconds": round(time.perf_counter() - t0, 3),
            **({} if ok else {"reason": f"relative error {err:.3g} against exact attention > {bound:.3g} "
                                        f"({ATTENTION_FACTOR:g}x its reference's)"})}


# The fused Q/K norm + RoPE (`kernels.qk_norm_rope`): diffusers' arithmetic up to the sum of
# squares' order, so on this data (bf16, 3 heads: a ragged last block of tokens) nearly every
# value is bit-equal (on an H200 99.999 %, on the CPU all) and none is more than one bf16 step
# of the values' size off; the bounds are loose enough for another GPU's summation order and
# tight enough that a wrong table, eps or pairing fails (each changes most of the values).
QK_ROPE_SHAPE = (1, 100, 3 * 128)  # [B, S, H*D]
QK_ROPE_MIN_EQUAL = 0.99


def qk_norm_rope_selfcheck(device: torch.device | str) -> dict:
    """Run the fused Q/K norm + RoPE on `device` against its reference on the CPU; a JSON-ready
    dict, ``ok`` False with ``reason`` instead of raising."""
    from gpubake.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(2468)
    batch, tokens, dim = QK_ROPE_SHAPE
    q = (_data(QK_ROPE_SHAPE, gen) * 2).bfloat16()
    k = (_data(QK_ROPE_SHAPE, gen) + torch.randn(dim, generator=gen)).bfloat16()
    angles = torch.rand(1, tokens, 1, 64, generator=gen) * 6.3
    cos, sin = (f(angles).repeat_interleave(2, dim=-1) for f in (torch.cos, torch.sin))  # Wan's table layout
    norms = [torch.nn.RMSNorm(dim, eps=1e-6).bfloat16() for _ in range(2)]
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(1 + 0.2 * torch.randn(dim, generator=gen))
    out: dict = {"device": str(dev)}  # the plan names the kernel (runtime.FUSED_KERNELS)
    with torch.inference_mode():
        want = torch.cat([t.flatten().float() for t in qk_norm_rope_reference(q, k, *norms, cos, sin, 3)])
        try:
            on_dev = [n.to(dev) for n in norms]
            got = qk_norm_rope(q.to(dev), k.to(dev), *on_dev, cos.to(dev), sin.to(dev), 3)
        except Exception as exc:
            return {**out, "ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        got = torch.cat([t.flatten().float().cpu() for t in got])
    return _compare(out, got, want, t0, QK_ROPE_MIN_EQUAL, 2.0 ** -7 * (1 + float(want.abs().max())))


def _compare(out: dict, got: torch.Tensor, want: torch.Tensor, t0: float, min_equal: float, bound: float) -> dict:
    """`ok` when at least `min_equal` of the values are bit-equal and none is more than `bound` off."""
    diff = (got.float() - want.float()).abs()
    equal = float((diff == 0).float().mean())
    worst = float(diff.max()) if torch.isfinite(got.float()).all() else float("inf")
    ok = equal >= min_equal and worst <= bound
    return {**out, "ok": ok, "bit_equal_fraction": round(equal, 6), "max_abs_diff": worst, "bound": bound,
            "seconds": round(time.perf_counter() - t0, 3),
            **({} if ok else {"reason": f"{equal:.4%} of the values bit-equal (want >= {min_equal:.0%}), "
                                        f"largest difference {worst:.3g} (bound {bound:.3g})"})}


# The VAE decoder's RMS norm + SiLU (`kernels.vae_norm`): diffusers' bf16 arithmetic up to the sum
# of squares' order, at most two bf16 ulps on a few values (tests/kernels/test_vae_norm.py).
VAE_NORM_SHAPE = (1, 96, 2, 9, 11)  # [B, C, T, H, W]: the decoder's widest 96-channel blocks


def vae_norm_selfcheck(device: torch.device | str) -> dict:
    """The fused VAE norm on `device` against its reference on the CPU (JSON-ready, never raises)."""
    from gpubake.kernels.vae_norm import rms_norm_silu, rms_norm_silu_reference

    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(1357)
    x = (_data(VAE_NORM_SHAPE, gen) * 3).bfloat16()
    gamma = (1 + 0.1 * torch.randn(VAE_NORM_SHAPE[1], 1, 1, 1, generator=gen)).bfloat16()
    scale = VAE_NORM_SHAPE[1] ** 0.5
    out: dict = {"device": str(dev)}  # the plan names the kernel (runtime.FUSED_KERNELS)
    want = rms_norm_silu_reference(x, gamma, scale)
    try:
        got = rms_norm_silu(x.to(dev), gamma.to(dev), scale).cpu()
    except Exception as exc:
        return {**out, "ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    return _compare(out, got, want, t0, 0.99, 2.0 ** -6 * (1 + float(want.float().abs().max())))


# The FFN's GELU inside the FP8 activation quantization (`convert_triton.fp8_rowwise(gelu=True)`):
# the E4M3 codes of torch's GELU's on nearly every value (99.98 % on the CPU), the next code on the
# rest; compared as the codes' values times the row scales.
FFN_GELU_SHAPE = (64, 1000)  # [tokens, channels]: a ragged last tile


# A Wan block's modulated LayerNorm with its FP8 quantization (`kernels.norm_quant`): the
# reference's codes but where the mean and variance's order moves a value across a rounding edge.
NORM_QUANT_SHAPE = (1, 96, 5120)  # [B, S, K]: the A14B's hidden size


def norm_quant_selfcheck(device: torch.device | str) -> dict:
    """The fused norm + FP8 quantization on `device` against its reference on the CPU."""
    from gpubake.kernels.norm_quant import layer_norm_fp8, layer_norm_fp8_reference

    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(4242)
    x = (_data(NORM_QUANT_SHAPE, gen) * 3.0).bfloat16()
    table = torch.randn(1, 6, NORM_QUANT_SHAPE[-1], generator=gen) * 0.3
    shift, scale = table.chunk(6, dim=1)[:2]
    out: dict = {"device": str(dev)}  # the plan names the kernel (runtime.FUSED_KERNELS)
    wq, ws = layer_norm_fp8_reference(x, 1e-6, scale=scale, shift=shift)
    try:
        gq, gs = (t.cpu() for t in layer_norm_fp8(x.to(dev), 1e-6, scale=scale.to(dev), shift=shift.to(dev)))
    except Exception as exc:
        return {**out, "ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    want, got = wq.float() * ws, gq.float() * gs
    return _compare(out, got, want, t0, 0.99, 2.0 ** -3 * float(want.abs().max()))


def ffn_gelu_quant_selfcheck(device: torch.device | str) -> dict:
    """The GELU-quantizing kernel on `device` against torch's GELU then the reference quantization."""
    from gpubake.kernels.convert_triton import fp8_rowwise
    from gpubake.kernels.fp8_ref import fp8_rowwise_ref

    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(9753)
    x = (_data(FFN_GELU_SHAPE, gen) * 2.5).bfloat16()
    out: dict = {"device": str(dev)}  # the plan names the kernel (runtime.FUSED_KERNELS)
    wq, ws = fp8_rowwise_ref(torch.nn.functional.gelu(x, approximate="tanh"))
    try:
        gq, gs = (t.cpu() for t in fp8_rowwise(x.to(dev), gelu=True))
    except Exception as exc:
        return {**out, "ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    want, got = wq.float() * ws, gq.float() * gs
    return _compare(out, got, want, t0, 0.99, 2.0 ** -3 * float(want.abs().max()))

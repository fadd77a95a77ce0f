"""A Wan block's LayerNorm (and its modulation) with the FP8 activation quantization of the
linears it feeds, as one Triton pass, beside its reference, and the block forward that hands
its linears those rows (the runtime plan's `fuse_norm_quant`; issue 18: built, not yet
measured on a GPU, off).

In diffusers' ``WanTransformerBlock`` each of the three norms writes a bf16 tensor that only
linears read: ``norm1`` (modulated) feeds Q, K and V, ``norm2`` (affine) the cross-attention's
Q, ``norm3`` (modulated) the FFN's up-projection; on ``hopper-fp8`` each of those linears then
reads it again to quantize it per token to E4M3 (`convert_triton.fp8_rowwise`, 2 bytes read and
1 written a value each). Inductor fuses each norm with the residual add before it (8 bytes a
value: h and the attention's output read, h and the norm written), so a norm and its readers
move 17 bytes a value for the self-attention's input (three readers) and 11 for the other two;
with this pass, the residual alone (6) and the pass (3: h read, the codes written), 9 each. At
480p on an H200 (168 M values a norm, ~3 TB/s) that is ~0.7-1.0 ms of a 28 ms block (from the
2026-12-03 profile). One pass that normalises, modulates, rounds to the hidden states' dtype
as diffusers does and quantizes writes only the E4M3 codes and a scale a row.

`layer_norm_fp8_reference` is the definition: diffusers' arithmetic
(``FP32LayerNorm(x.float())``, then ``* (1 + scale) + shift`` in float32, ``.type_as(x)``),
then `fp8_ref.fp8_rowwise_ref`. The kernel computes the mean and variance in two sweeps
(torch: Welford, in another order), so the normalised value can be an ulp off in float32;
after the rounding to bf16 and to E4M3 the codes are the reference's on nearly every value and
the next code on the rest (tests/kernels/test_norm_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpubake.errors import KernelError
from gpubake.kernels.convert_triton import _e4m3_row_scale, _raw, _store_e4m3
from gpubake.kernels.fp8_ref import fp8_rowwise_ref
from gpubake.kernels.layers_common import QuantizedRows
from gpubake.kernels.quantize_triton import check_device, interpreting
from gpubake.kernels.triton_rounding import round_to_dtype

BLOCK_K = 1024  # channels a sweep step loads (5,120 = 5 steps)


def layer_norm_fp8_reference(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                             shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, K] hidden states -> (E4M3 [B*S, K], float32 [B*S, 1]): the FP8 per-token
    quantization of ``(layer_norm(x.float(), weight, bias) * (1 + scale) + shift).type_as(x)``
    (no modulation where `scale` is None), as diffusers' Wan block and `hopper-fp8` compute it."""
    k = x.shape[-1]
    y = torch.nn.functional.layer_norm(x.float(), (k,), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale) + shift
    return fp8_rowwise_ref(y.type_as(x).reshape(-1, k))


@triton.jit
def _normalised(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, row, batch, cols, K, stride_x, stride_mod, mean, rstd,
                AFFINE: tl.constexpr, MODULATE: tl.constexpr, BF16: tl.constexpr):
    """One sweep step's values as the reference rounds them: (x - mean) * rstd, the affine
    weight and bias, the modulation, each op rounded to float32, then to the output dtype."""
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd
    if AFFINE:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0) + tl.load(b_ptr + cols, mask=mask, other=0.0)
    if MODULATE:
        one_plus = 1.0 + tl.load(sc_ptr + batch * stride_mod + cols, mask=mask, other=0.0)
        y = y * one_plus + tl.load(sh_ptr + batch * stride_mod + cols, mask=mask, other=0.0)
    return round_to_dtype(y, BF16)


@triton.jit
def _layer_norm_fp8_kernel(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, out_ptr, scale_ptr, K, S, stride_x, stride_mod,
                           EPS: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr, BF16: tl.constexpr,
                           HW_CAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per token: sweeps for the mean, the variance, the amax of the normalised
    values and their codes (every sweep after the first reads the row from L2)."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // S
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        acc += tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    kf = K.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(acc, axis=0), kf)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32) - mean
        acc += tl.where(cols < K, d * d, 0.0)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(acc, axis=0), kf) + EPS))
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = tl.abs(_normalised(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, row, batch, cols, K, stride_x, stride_mod,
                               mean, rstd, AFFINE, MODULATE, BF16))
        amax = tl.maximum(amax, tl.where((a < float("inf")) & (cols < K), a, 0.0))
    s = _e4m3_row_scale(amax)
    tl.store(scale_ptr + row, s)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        y = _normalised(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, row, batch, cols, K, stride_x, stride_mod,
                        mean, rstd, AFFINE, MODULATE, BF16)
        _store_e4m3(out_ptr + row * K + cols, y, s, cols < K, HW_CAST)


def _modulation(t: torch.Tensor | None, batch: int, k: int, what: str) -> torch.Tensor | None:
    """diffusers' shift / scale chunk ([B, 1, K] float32, a view of the block's table) as
    [B, K] rows of unit stride."""
    if t is None:
        return None
    if t.dtype != torch.float32 or t.numel() != batch * k or t.shape[-1] != k:
        raise KernelError(f"layer_norm_fp8: {what} must be float32 [{batch}, 1, {k}], got {t.dtype} {list(t.shape)}")
    t = t.reshape(batch, k)
    return t if t.stride(1) == 1 else t.contiguous()


def layer_norm_fp8(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   block_k: int = BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_norm_fp8_reference` in one launch ([B, S, K] bf16 or float32 hidden states,
    CUDA, or the CPU under TRITON_INTERPRET=1): weight and bias together or neither, scale
    and shift together or neither."""
    check_device(x, "hidden states")
    if x.ndim != 3 or x.dtype not in (torch.bfloat16, torch.float32):
        raise KernelError(f"layer_norm_fp8: hidden states must be bf16 or float32 [B, S, K], got {x.dtype} {list(x.shape)}")
    if (weight is None) != (bias is None) or (scale is None) != (shift is None):
        raise KernelError("layer_norm_fp8: weight and bias come together, and so do scale and shift")
    batch, tokens, k = x.shape
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (k,):
            raise KernelError(f"layer_norm_fp8: {name} must be [{k}], got {list(p.shape)}")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    w, b = (None if p is None else p.detach().to(device=x.device, dtype=torch.float32).contiguous()
            for p in (weight, bias))
    sc, sh = _modulation(scale, batch, k, "scale"), _modulation(shift, batch, k, "shift")
    out = torch.empty((rows.shape[0], k), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        dummy = rows  # an unread pointer where a table is absent (read-only: no alias of an output)
        _layer_norm_fp8_kernel[(rows.shape[0],)](
            rows, dummy if w is None else w, dummy if b is None else b, dummy if sc is None else sc,
            dummy if sh is None else sh, _raw(out), row_scale, k, tokens, rows.stride(0),
            0 if sc is None else sc.stride(0), EPS=float(eps), AFFINE=w is not None, MODULATE=sc is not None,
            BF16=x.dtype == torch.bfloat16, HW_CAST=not interpreting(), BLOCK_K=block_k, num_warps=4,
            enable_fp_fusion=False)
    return out, row_scale


def _quantized(x: torch.Tensor, norm: torch.nn.Module, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> QuantizedRows:
    """What the block's linears after `norm` (a diffusers ``FP32LayerNorm``) would quantize."""
    codes, scales = layer_norm_fp8(x, norm.eps, norm.weight, norm.bias, scale, shift)
    return QuantizedRows(codes, scales, x.shape, x.dtype, x.device)


def fused_block_forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        temb: torch.Tensor, rotary_emb) -> torch.Tensor:
    """diffusers 0.42.1's ``WanTransformerBlock.forward`` line for line, each norm's output
    handed to its linears as `QuantizedRows` from `layer_norm_fp8` instead of a bf16 tensor
    they quantize themselves. Wan 2.2 TI2V's per-token modulation (a 4-D `temb`) runs
    diffusers' own forward."""
    if temb.ndim == 4:
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        self.scale_shift_table + temb.float()).chunk(6, dim=1)
    # 1. Self-attention
    attn_output = self.attn1(_quantized(hidden_states, self.norm1, scale_msa, shift_msa), None, None, rotary_emb)
    hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
    # 2. Cross-attention
    attn_output = self.attn2(_quantized(hidden_states, self.norm2), encoder_hidden_states, None, None)
    hidden_states = hidden_states + attn_output
    # 3. Feed-forward
    ff_output = self.ffn(_quantized(hidden_states, self.norm3, c_scale_msa, c_shift_msa))
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


def _norms_fit(block: torch.nn.Module) -> bool:
    """The block's three norms are what the kernel computes: diffusers' ``FP32LayerNorm``,
    norm1 and norm3 without an affine, norm2 with weight and bias (``cross_attn_norm``)."""
    def layer_norm(n, affine: bool) -> bool:
        return (type(n).__name__ == "FP32LayerNorm" and (n.weight is not None) == affine
                and (n.bias is not None) == affine)
    return layer_norm(block.norm1, False) and layer_norm(block.norm2, True) and layer_norm(block.norm3, False)


def _takes_rows(layer: torch.nn.Module, device: torch.device) -> bool:
    """Whether `layer` runs its GEMM on `QuantizedRows`: a quantized linear (or fused
    projection of them) without an input activation, bound to a backend that takes them."""
    from gpubake.kernels.fp8_linear import FP8Linear
    from gpubake.kernels.linear import FusedNVFP4Projection, NVFP4Linear

    if isinstance(layer, FusedNVFP4Projection):
        return all(_takes_rows(p, device) for p in layer.parts)
    if not isinstance(layer, (NVFP4Linear, FP8Linear)) or layer.input_activation is not None:
        return False
    bound = layer.bound_backend  # what runs wherever the layer sits (an offloaded expert waits on the host)
    try:
        backend = bound if bound is not None else layer.backend(device)
    except KernelError:
        return False
    return bool(getattr(backend, "takes_quantized_rows", False))


def _consumers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The linears that read the block's three norms' outputs, as diffusers' Wan block calls them."""
    attn1, attn2 = block.attn1, block.attn2
    self_in = [attn1.to_qkv] if getattr(attn1, "fused_projections", False) else [attn1.to_q, attn1.to_k, attn1.to_v]
    return [*self_in, attn2.to_q, block.ffn.net[0].proj]


def set_fused_norm_quant(model: torch.nn.Module, on: bool) -> int:
    """Each Wan block whose norms the kernel computes and whose norms' readers all take
    quantized rows (hopper-fp8, scaled-mm: bind the backends first) runs `fused_block_forward`
    (on), or diffusers' own forward again (off); returns how many blocks run fused."""
    n = 0
    for block in model.modules():
        if type(block).__name__ != "WanTransformerBlock":
            continue
        fused = getattr(block.__dict__.get("forward"), "__func__", None) is fused_block_forward
        if not on:
            if fused:
                del block.forward  # the class's (diffusers') forward again
            continue
        device = block.scale_shift_table.device
        ok = _norms_fit(block) and getattr(block.attn2, "add_k_proj", None) is None \
            and all(_takes_rows(m, device) for m in _consumers(block))
        if ok and not fused:
            block.forward = fused_block_forward.__get__(block)
        elif not ok and fused:
            del block.forward
        n += int(ok)
    return n

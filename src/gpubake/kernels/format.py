"""NVFP4 format: the plain-torch reference every fast path is tested against.

Layout (matches torch's ``float4_e2m1fn_x2`` and torchao's ``pack_uint4``):

* ``data``: uint8 ``[..., K // 2]``. Element ``2i`` of a row is the LOW nibble of byte
  ``i``, element ``2i + 1`` the HIGH nibble. A nibble is an E2M1 code: bit 3 = sign,
  bits 0-2 = magnitude index into ``0, 0.5, 1, 1.5, 2, 3, 4, 6``.
* ``block_scale``: ``float8_e4m3fn`` ``[..., K // 16]``, row-major, one per 16
  consecutive values along K. ``swizzle_scales`` gives the 128x4 blocked layout that
  ``torch._scaled_mm`` takes on Blackwell.
* ``global_scale``: float32 ``[]``, ``amax / (6 * 448)``.

Value of element k: ``e2m1[k] * float(block_scale[k // 16]) * global_scale``.

Quantization, in float32, operation for operation as torchao's ``nvfp4_quantize``::

    s_fp32  = (amax16 / 6) / global_scale               # amax16: max |x| of the block
    s       = e4m3(clamp(s_fp32, 2**-6, 448))           # round to nearest even
    y       = clamp(x * ((1 / global_scale) / float(s)), -6, 6)
    code    = e2m1_rne(y)                               # ties to the even code

Special values (each is tested in tests/kernels):

* ``+0`` -> code 0x0, ``-0`` -> 0x8; a negative value that rounds to zero -> 0x8 (-0).
* all-zero block -> scale ``2**-6`` (smallest normal E4M3, the clamp floor), codes 0.
* ``+-inf`` -> saturates: the block scale clamps to 448, the element to ``+-6``.
* ``NaN`` anywhere in a block -> that block's scale is E4M3 NaN (byte 0x7F) and all
  its 16 codes are 0x0, so the whole block dequantizes to NaN and a GEMM row that reads
  it yields NaN, as the unquantized product would.
* E4M3 subnormal scales (2**-9 .. 2**-6) are never produced (the clamp floor), but
  are decoded exactly wherever they appear (checkpoints from other tools).
* global scale: from the max |x| over FINITE elements, floored at ``2**-120`` so that
  ``1 / (global_scale * 2**-6)`` stays finite (an all-zero tensor gets ``2**-120``).
  A caller-given global scale must be finite and >= ``2**-120``.
* caller-given (static) global scale smaller than the data's: values above
  ``6 * 448 * global_scale`` saturate like ``+-inf`` (block scale 448, element ``+-6``),
  so they dequantize to ``+-6 * 448 * global_scale`` (the calibrated amax of a static
  activation scale, `INPUT_GLOBAL_SCALE_KEY`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpubake.errors import KernelError

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
MIN_GLOBAL_SCALE = 2.0**-120
E4M3_NAN_BYTE = 0x7F
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: E2M1 code -> value; codes 8..15 are the negatives (8 is -0.0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass
class NVFP4Tensor:
    """A quantized tensor: packed codes, row-major block scales, global scale, shape."""

    data: torch.Tensor          # uint8 [..., K // 2]
    block_scale: torch.Tensor   # float8_e4m3fn [..., K // 16]
    global_scale: torch.Tensor  # float32 []
    shape: torch.Size           # logical shape [..., K]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_ref(self, dtype)

    def to(self, device: torch.device | str) -> "NVFP4Tensor":
        return NVFP4Tensor(self.data.to(device), self.block_scale.to(device),
                           self.global_scale.to(device), self.shape)


# State-dict names of a quantized linear `P`'s weight (`P.<name>`): what checkpoints hold, the
# quantizer writes, the loader checks and `NVFP4Linear` registers as its buffers.
PACKED_KEY = "weight_packed"              # NVFP4Tensor.data, uint8 [out, in // 2]
SCALE_KEY = "weight_scale"                # NVFP4Tensor.block_scale, float8_e4m3fn [out, in // 16], row-major
GLOBAL_SCALE_KEY = "weight_global_scale"  # NVFP4Tensor.global_scale, float32 []
WEIGHT_KEYS = (PACKED_KEY, SCALE_KEY, GLOBAL_SCALE_KEY)

# Optional, per quantized linear: a STATIC activation global scale, float32 [] (0-dim), in
# gpubake's convention: calibrated input amax / 2688 (`global_scale_from_amax` of it), the
# `global_scale` the activations are quantized with instead of their own per-call amax.
# Published NVFP4 checkpoints carry it (LightX2V: `P.input_global_scale` = 2688 / amax, the
# INVERSE, so gpubake's value is 1 / LightX2V's; its `P.alpha` = 1 / (input_global_scale x
# weight_global_scale) is, in gpubake's convention, g_a * g_w, which the native backend
# computes and so never stores). Absent: activations get a dynamic per-tensor global scale.
# Only `blackwell-native` (W4A4) uses it; see docs/kernels.md "Static activation scales".
INPUT_GLOBAL_SCALE_KEY = "input_global_scale"  # float32 [], amax / 2688, >= 2**-120


def weight_tensors(q: NVFP4Tensor) -> dict[str, torch.Tensor]:
    """{name: tensor} of a quantized weight as stored, by `WEIGHT_KEYS` (global scale 0-dim)."""
    return {PACKED_KEY: q.data, SCALE_KEY: q.block_scale, GLOBAL_SCALE_KEY: q.global_scale.reshape(())}


# ---------------------------------------------------------------------------- checks

def check_input(x: torch.Tensor, what: str = "input") -> int:
    """Validate a tensor to quantize; return K."""
    if not isinstance(x, torch.Tensor):
        raise KernelError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{what}: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if x.dim() == 0 or x.shape[-1] % BLOCK != 0:
        raise KernelError(
            f"{what}: shape {tuple(x.shape)}: last dim K must be a multiple of {BLOCK}")
    return x.shape[-1]


def check_global_scale(global_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A caller-given global scale as a float32 scalar on `device`.

    Host values are validated; a device tensor is trusted (checking it would sync)."""
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1:
            raise KernelError(f"global_scale: expected one value, got shape {tuple(global_scale.shape)}")
        g = global_scale.reshape(()).to(device=device, dtype=torch.float32)
        if global_scale.device.type != "cpu":
            return g
        value = float(global_scale)
    else:
        value = float(global_scale)
        g = torch.tensor(value, dtype=torch.float32, device=device)
    if not (value >= MIN_GLOBAL_SCALE and value < float("inf")):
        raise KernelError(f"global_scale: {value!r} must be finite and >= 2**-120")
    return g


def check_static_scale(t: torch.Tensor, what: str = INPUT_GLOBAL_SCALE_KEY) -> None:
    """A stored static activation global scale: float32, 0-dim, finite and >= 2**-120.

    Read once at load (a CUDA value syncs here, not per call); a meta tensor has no value."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 0:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise KernelError(f"{what}: expected a float32 scalar (shape []), got {got}")
    if t.is_meta:
        return
    value = float(t)
    if not (value >= MIN_GLOBAL_SCALE and value < float("inf")):
        raise KernelError(f"{what}: {value!r} must be finite and >= 2**-120 (calibrated input amax / 2688)")


# ------------------------------------------------------------------ element encoding

def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """float32 in [-6, 6] -> E2M1 code (uint8), round to nearest, ties to the even code.

    The midpoints between grid values are 0.25 0.75 1.25 1.75 2.5 3.5 5; a tie goes
    to the code with an even index (0, 1.0, 2.0, 4.0), hence the > / >= alternation."""
    a = y.abs()
    mag = ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8)
           + (a > 1.25).to(torch.uint8) + (a >= 1.75).to(torch.uint8)
           + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
           + (a > 5.0).to(torch.uint8))
    sign = (torch.signbit(y)).to(torch.uint8) << 3
    return mag | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) -> float32 values (code 8 is -0.0)."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> bytes [..., K // 2]: even index low nibble, odd index high."""
    if codes.shape[-1] % 2:
        raise KernelError(f"pack_fp4: last dim {codes.shape[-1]} is odd")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(data: torch.Tensor) -> torch.Tensor:
    """bytes [..., K // 2] -> uint8 codes [..., K] (inverse of `pack_fp4`)."""
    return torch.stack((data & 0x0F, data >> 4), dim=-1).reshape(*data.shape[:-1], -1)


def e4m3_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a float8_e4m3fn tensor (for exact comparisons and kernels)."""
    return t.view(torch.uint8)


# ------------------------------------------------------------------ scale layout

def _ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def swizzled_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Padded 2-D shape of the blocked scales of a [rows, cols] scale matrix."""
    return _ceil_to(rows, 128), _ceil_to(cols, 4)


def swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """Row-major scales [rows, cols] -> the 128x4 blocked layout of cuBLAS/_scaled_mm.

    Same arrangement as torchao's ``to_blocked``: pad to (128, 4) multiples with zeros,
    cut into 128x4 tiles (row-major over tiles), and inside a tile store row
    ``32 * g + i``, column ``c`` at offset ``16 * i + 4 * g + c``. Returned as a
    contiguous [pad(rows, 128), pad(cols, 4)] tensor whose memory is that sequence."""
    rows, cols = scale.shape
    prows, pcols = swizzled_scale_shape(rows, cols)
    padded = scale
    if (prows, pcols) != (rows, cols):
        padded = torch.zeros((prows, pcols), dtype=scale.dtype, device=scale.device)
        padded[:rows, :cols] = scale
    u = padded.view(torch.uint8) if scale.dtype == torch.float8_e4m3fn else padded
    tiles = u.reshape(prows // 128, 4, 32, pcols // 4, 4)      # [R, g, i, C, c]
    out = tiles.permute(0, 3, 2, 1, 4).contiguous()            # [R, C, i, g, c]
    out = out.reshape(prows, pcols)
    return out.view(scale.dtype) if scale.dtype == torch.float8_e4m3fn else out


def unswizzle_scales(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `swizzle_scales`: blocked (any shape, padded numel) -> [rows, cols]."""
    prows, pcols = swizzled_scale_shape(rows, cols)
    if blocked.numel() != prows * pcols:
        raise KernelError(
            f"unswizzle_scales: {blocked.numel()} scales, expected {prows}x{pcols} for {rows}x{cols}")
    is_f8 = blocked.dtype == torch.float8_e4m3fn
    u = blocked.contiguous().view(torch.uint8) if is_f8 else blocked.contiguous()
    t = u.reshape(prows // 128, pcols // 4, 32, 4, 4)          # [R, C, i, g, c]
    out = t.permute(0, 3, 2, 1, 4).reshape(prows, pcols)[:rows, :cols].contiguous()
    return out.view(torch.float8_e4m3fn) if is_f8 else out


# ------------------------------------------------------------------ quantize

def amax_finite(x: torch.Tensor) -> torch.Tensor:
    """max |x| over finite elements (0 if none), float32 scalar."""
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), device=a.device))
    return a.amax() if a.numel() else torch.zeros((), device=a.device)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / (6 * 448), floored at 2**-120 (see module doc).

    The float32 quotient is correctly rounded (computed in float64, then rounded once:
    exact since 53 >= 2 * 24 + 2), whatever the device: CUDA torch divides by a Python
    scalar through its reciprocal, which is off by an ulp now and then."""
    q = (amax.double() / (E2M1_MAX * E4M3_MAX)).float()
    return torch.clamp(q, min=MIN_GLOBAL_SCALE)


def quantize_ref(x: torch.Tensor, global_scale: float | torch.Tensor | None = None) -> NVFP4Tensor:
    """Quantize along the last dim. Readable, CPU-friendly, the definition of the format."""
    check_input(x)
    shape = x.shape
    xf = x.detach().float().reshape(-1, shape[-1] // BLOCK, BLOCK)
    if global_scale is None:
        g = global_scale_from_amax(amax_finite(xf))
    else:
        g = check_global_scale(global_scale, xf.device)

    has_nan = torch.isnan(xf).any(dim=-1)
    block_amax = torch.nan_to_num(xf.abs(), nan=0.0).amax(dim=-1)
    s_fp32 = (block_amax / E2M1_MAX) / g
    s_f8 = torch.clamp(s_fp32, min=E4M3_MIN_NORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
    s_dec = s_f8.float()
    y = torch.clamp(xf * ((1.0 / g) / s_dec).unsqueeze(-1), -E2M1_MAX, E2M1_MAX)
    codes = e2m1_encode(y)
    codes = torch.where(has_nan.unsqueeze(-1), torch.zeros_like(codes), codes)
    s_bytes = torch.where(has_nan, torch.full_like(s_f8.view(torch.uint8), E4M3_NAN_BYTE),
                          s_f8.view(torch.uint8))
    lead = tuple(shape[:-1])
    data = pack_fp4(codes.reshape(-1, shape[-1])).reshape(*lead, shape[-1] // 2)
    scale = s_bytes.view(torch.float8_e4m3fn).reshape(*lead, shape[-1] // BLOCK)
    return NVFP4Tensor(data.contiguous(), scale.contiguous(), g.reshape(()).float(), torch.Size(shape))


def dequantize_ref(q: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """e2m1 * block_scale * global_scale, computed in float32 then cast to `dtype`."""
    vals = e2m1_decode(unpack_fp4(q.data))
    k = vals.shape[-1]
    vals = vals.reshape(*vals.shape[:-1], k // BLOCK, BLOCK)
    out = vals * q.block_scale.float().unsqueeze(-1) * q.global_scale.float()
    return out.reshape(q.shape).to(dtype)

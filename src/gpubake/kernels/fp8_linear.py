"""`FP8Linear`: a drop-in for `nn.Linear` whose weight is stored as FP8 (E4M3), one scale per row.

Why a second format beside NVFP4: on Hopper the NVFP4 weight must be re-expressed to E4M3
per call (`backends.HopperFp8`), which rounds it a second time; the peer stack (torchao's
``Float8DynamicActivationFloat8WeightConfig`` with ``PerRow``) stores E4M3 weights directly
and has about half the error against BF16. On >= 80 GB cards the 2x larger weight fits.

State dict of a layer ``P`` (compressed-tensors / vLLM channel-wise FP8 convention)::

    P.weight        float8_e4m3fn  [out, in]
    P.weight_scale  float32        [out, 1]   W ~= weight.float() * weight_scale
    P.bias          bias dtype     [out]      (absent when bias=False)

All are buffers (nothing here trains); the names are `FP8_WEIGHT_KEY` and `FP8_SCALE_KEY`.

Which path computes a layer is chosen once and bound to it (`bind_fp8_backends`, by the
runtime plan), never per forward:

| path           | where                                   | what runs                                        |
|----------------|-----------------------------------------|--------------------------------------------------|
| `scaled-mm`    | sm_89, sm_90, sm_100, sm_120 (and CPU)  | x -> E4M3 per token, `torch._scaled_mm` row-wise |
| `dequant-bf16` | any CUDA GPU (and CPU)                  | weight * scale -> bf16, `F.linear` in bf16       |
| `reference`    | anywhere                                | float32 dequant, `F.linear` in float32           |

The default per device is the `fp8_backend` column of `archs`; ``$GPUBAKE_FP8_BACKEND``
overrides it where the choice is made (`select_fp8_backend`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gpubake import envs
from gpubake.errors import KernelError
from gpubake.kernels import archs
from gpubake.kernels.fp8_ref import fp8_rowwise_ref
from gpubake.kernels.layers_common import (QuantizedRows, apply_input_activation, apply_keeping_dtypes, bind_all,
                                           check_takes_rows, count_bound)

FP8_WEIGHT_KEY = "weight"
FP8_SCALE_KEY = "weight_scale"
FP8_ENV_VAR = "GPUBAKE_FP8_BACKEND"
FP8_FORMAT = "fp8"


def quantize_fp8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantization of a weight [out, in] -> (E4M3 [out, in], float32 scale [out, 1]).

    ``scale = max(amax_finite(row) / 448, 2**-120)`` (the floor is `format.MIN_GLOBAL_SCALE`: an
    all-zero row gets a finite scale and codes 0), ``q = e4m3(clamp(w / scale, +-448))`` (torch's
    cast does not saturate, so clamp first): +-inf saturates to +-448 * scale, NaN stays NaN
    (byte 0x7F). The same definition as the activations' per-token quantization
    (`fp8_ref.fp8_rowwise_ref`), so one reference holds both."""
    if w.dim() != 2:
        raise KernelError(f"quantize_fp8_rowwise: weight shape {tuple(w.shape)}: need 2-D [out, in]")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelError(f"quantize_fp8_rowwise: weight dtype {w.dtype} not supported (float32, bf16, fp16)")
    return fp8_rowwise_ref(w)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = weight.float() * scale (exact in float32: 4 significant bits times a float32), in `dtype`."""
    return (weight.float() * scale.float()).to(dtype)


# ---------------------------------------------------------------------------- the paths


class FP8Backend:
    """One GEMM path for FP8 weights: where it runs and ``y = x @ W.T + bias``."""

    name: ClassVar[str] = ""
    needs_cuda: ClassVar[bool] = True
    caps: ClassVar[tuple[tuple[int, int], ...] | None] = None  # None: any CUDA GPU
    # whether `apply` takes ``input_gelu=True`` (the FFN's GELU computed in its activation quantization)
    fuses_input_gelu: ClassVar[bool] = False
    # whether `apply` takes `QuantizedRows` (activations quantized per token to E4M3 by their producer)
    takes_quantized_rows: ClassVar[bool] = False

    def supports_capability(self, cap: tuple[int, int] | None) -> bool:
        """Whether a device of this capability (None: the CPU) runs this path."""
        if cap is None:
            return not self.needs_cuda
        return self.caps is None or cap in self.caps

    def check(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise KernelError(f"fp8 {self.name}: activations dtype {x.dtype} not supported")
        N, K = weight.shape
        if x.shape[-1] != K:
            raise KernelError(f"fp8 {self.name}: activations shape {tuple(x.shape)} do not match weight [{N}, {K}]")
        if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32 or tuple(scale.shape) != (N, 1):
            raise KernelError(f"fp8 {self.name}: weight {weight.dtype} {list(weight.shape)} and scale "
                              f"{scale.dtype} {list(scale.shape)}: need float8_e4m3fn [N, K] and float32 [N, 1]")

    def apply(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def quantize_activations_rowwise(x: torch.Tensor | QuantizedRows, fuse_when_compiling: bool = False,
                                 gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E4M3 [M, K], float32 per-token scale [M, 1]): rows a producer already
    quantized (`QuantizedRows`) as they are; else the Triton kernel on CUDA, its
    plain-torch twin (bit-identical) on the CPU, and under torch.compile with
    `fuse_when_compiling` the twin too, so that inductor fuses the quantization into the norm
    and modulation that produced x instead of a separate pass over it (the peer's torchao
    quantization is torch ops, fused that way). Shared by both FP8-GEMM paths (`ScaledMm`
    here, `backends.HopperFp8`). `gelu`: of diffusers' FFN GELU of x (tanh approximation), which
    the kernel computes on the way (within one bf16 ulp of torch's on a few values)."""
    if isinstance(x, QuantizedRows):
        if gelu:
            raise KernelError("quantized rows: the FFN's GELU cannot be applied to activations already quantized")
        return x.codes, x.scales
    x2 = x.reshape(-1, x.shape[-1])
    if x2.device.type != "cuda" or (fuse_when_compiling and torch.compiler.is_compiling()):
        return fp8_rowwise_ref(apply_input_activation(x2, "gelu_tanh" if gelu else None).contiguous())
    from gpubake.kernels.convert_triton import fp8_rowwise

    return fp8_rowwise(x2, gelu=gelu)


class ScaledMm(FP8Backend):
    """W8A8 on FP8 tensor cores: activations E4M3 per token (Triton on CUDA, its plain-torch
    twin elsewhere, bit-identical), then torch's row-wise scaled `_scaled_mm` (as
    `backends.HopperFp8.apply`, with the stored weight instead of a re-expressed one).
    torch's CPU build has `_scaled_mm` for E4M3 too, which is what the tests run."""

    name = "scaled-mm"
    caps = archs.capabilities_defaulting_to_fp8("scaled-mm")
    # the runtime plan's `fuse_act_quant`, set where it binds (`runtime.bind_fp8`)
    fuse_act_quant_when_compiling = False
    fuses_input_gelu = True
    takes_quantized_rows = True

    def supports_capability(self, cap):
        return cap is None or cap in (self.caps or ())

    def apply(self, x, weight, scale, bias, input_gelu: bool = False):
        self.check(x, weight, scale)
        N, K = weight.shape
        if N % 16 or K % 16:
            raise KernelError(f"fp8 scaled-mm: weight [{N}, {K}]: torch._scaled_mm needs both multiples of 16")
        xq, xs = quantize_activations_rowwise(x, self.fuse_act_quant_when_compiling, input_gelu)
        out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, N), out_dtype=out_dtype,
                             bias=None if bias is None else bias.to(out_dtype), use_fast_accum=True)
        return y.to(x.dtype).reshape(*x.shape[:-1], N)


class DequantBf16Fp8(FP8Backend):
    """W8A16 for GPUs without FP8 tensor cores (sm_80, sm_86): the weight dequantized to bf16
    per call (float32 product, one rounding), cuBLAS bf16. Plain torch, so it runs on the CPU
    too (the tests); the default only on CUDA GPUs."""

    name = "dequant-bf16"
    needs_cuda = False

    def apply(self, x, weight, scale, bias):
        self.check(x, weight, scale)
        w = dequantize_fp8(weight, scale, torch.bfloat16)
        y = F.linear(x.to(torch.bfloat16), w, None if bias is None else bias.to(torch.bfloat16))
        return y.to(x.dtype)


class ReferenceFp8(FP8Backend):
    """The definition of the result: float32 dequant, float32 `F.linear`, cast to x's dtype."""

    name = "reference"
    needs_cuda = False

    def supports_capability(self, cap):
        return True

    def apply(self, x, weight, scale, bias):
        self.check(x, weight, scale)
        y = F.linear(x.float(), dequantize_fp8(weight, scale), None if bias is None else bias.float())
        return y.to(x.dtype)


FP8_BACKENDS: dict[str, FP8Backend] = {b.name: b for b in (ScaledMm(), DequantBf16Fp8(), ReferenceFp8())}


def get_fp8_backend(name: str) -> FP8Backend:
    """The path called `name`; KernelError naming the variable and the choices otherwise."""
    if name not in FP8_BACKENDS:
        raise KernelError(f"{FP8_ENV_VAR}: unknown backend {name!r} (one of {', '.join(FP8_BACKENDS)})")
    return FP8_BACKENDS[name]


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def default_fp8_backend(device: torch.device | str) -> str:
    """The path a device runs without an override: the `fp8_backend` column of `archs`."""
    return archs.arch_for(_capability(torch.device(device))).fp8_backend


def select_fp8_backend(device: torch.device | str) -> str:
    """``$GPUBAKE_FP8_BACKEND``, else `default_fp8_backend`; a KernelError naming both when
    the device cannot run the one asked for. Read once, where the runtime plan binds."""
    dev = torch.device(device)
    cap = _capability(dev)
    name = (envs.raw(FP8_ENV_VAR) or "").strip() or default_fp8_backend(dev)
    backend = get_fp8_backend(name)
    if not backend.supports_capability(cap):
        need = "a CUDA GPU" if backend.caps is None else ", ".join(archs.sm_name(c) for c in backend.caps)
        raise KernelError(f"{FP8_ENV_VAR}={name}: needs {need}, but device {dev} is {archs.sm_name(cap)}")
    return name


# ---------------------------------------------------------------------------- the layer


class FP8Linear(nn.Module):
    """y = x @ (weight * weight_scale).T + bias, computed by the bound path (else the device's default)."""

    _FIXED_DTYPE = (FP8_WEIGHT_KEY, FP8_SCALE_KEY)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 backend: str | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise KernelError(f"FP8Linear: shape [{out_features}, {in_features}] is empty")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(FP8_WEIGHT_KEY, torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                         device=device))
        self.register_buffer(FP8_SCALE_KEY, torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)
        self._backend: FP8Backend | None = get_fp8_backend(backend) if backend else None
        self.input_activation: str | None = None  # as NVFP4Linear's (`fuse_ffn_gelu`)
        # (device, the path a forward there runs): resolved on the first forward on a device,
        # not on every one (as NVFP4Linear's prepared weight)
        self._resolved: tuple[torch.device, FP8Backend] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str | None = None) -> FP8Linear:
        """Quantize an `nn.Linear` with `quantize_fp8_rowwise` (on the weight's device)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                  dtype=linear.bias.dtype if linear.bias is not None else w.dtype, backend=backend)
        mod.load_fp8(*quantize_fp8_rowwise(w))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def load_fp8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Copy a quantized weight (E4M3 [out, in], float32 [out, 1]) into the buffers."""
        want = (self.out_features, self.in_features)
        if tuple(q.shape) != want or tuple(scale.shape) != (want[0], 1):
            raise KernelError(f"FP8Linear: weight {tuple(q.shape)} / scale {tuple(scale.shape)} != "
                              f"{want} / ({want[0]}, 1)")
        if q.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
            raise KernelError(f"FP8Linear: dtypes {q.dtype}/{scale.dtype}, need float8_e4m3fn and float32")
        self._buffers[FP8_WEIGHT_KEY].copy_(q)
        self._buffers[FP8_SCALE_KEY].copy_(scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self._buffers[FP8_WEIGHT_KEY], self._buffers[FP8_SCALE_KEY], dtype)

    def bind_backend(self, backend: FP8Backend | str) -> None:
        """Run this layer on `backend` (a name or an instance) from the next forward on."""
        self._backend = get_fp8_backend(backend) if isinstance(backend, str) else backend
        self._resolved = None

    @property
    def bound_backend(self) -> FP8Backend | None:
        """The bound path; None: unbound (the device's default runs)."""
        return self._backend

    @property
    def backend_name(self) -> str | None:
        """The bound path's name; None: unbound (the device's default runs)."""
        return self._backend.name if self._backend is not None else None

    def backend(self, device: torch.device) -> FP8Backend:
        """The path a forward on `device` runs: the bound one, else the device's default."""
        b = self._backend if self._backend is not None else get_fp8_backend(default_fp8_backend(device))
        if not b.supports_capability(_capability(device)):
            raise KernelError(f"FP8Linear: backend {b.name} cannot run on {device}")
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resolved = self._resolved
        if resolved is None or resolved[0] != x.device:
            resolved = self._resolved = (x.device, self.backend(x.device))
        path, w, scale = resolved[1], self._buffers[FP8_WEIGHT_KEY], self._buffers[FP8_SCALE_KEY]
        check_takes_rows(x, path, "FP8Linear")
        if self.input_activation is not None and path.fuses_input_gelu:
            return path.apply(x, w, scale, self.bias, input_gelu=True)
        return path.apply(apply_input_activation(x, self.input_activation), w, scale, self.bias)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half(): buffers move, and the format's float8 weight and float32
        scale keep their dtypes on a model-wide dtype cast (the bias follows it)."""
        self._resolved = None
        return apply_keeping_dtypes(self, self._FIXED_DTYPE, lambda: super(FP8Linear, self)._apply(fn, recurse))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format=fp8")


def bind_fp8_backends(model: nn.Module, backend: FP8Backend | str) -> int:
    """Bind `backend` to every `FP8Linear` of `model`; returns how many layers."""
    return bind_all(model, FP8Linear, backend)


def bound_fp8_backends(model: nn.Module) -> dict[str, int]:
    """{path name: number of layers} of the `FP8Linear`s of `model` ("default" for unbound)."""
    return count_bound(model, FP8Linear)

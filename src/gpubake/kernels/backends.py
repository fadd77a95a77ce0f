"""NVFP4 GEMM backends behind one small interface, chosen by compute capability.

Modelled on vLLM's quantization methods: a backend turns the stored weight into its
run-time form ONCE (`prepare`, at load) and computes ``y = x @ W.T + bias`` (`apply`).

| name               | devices              | weight at run time                     | activations        |
|--------------------|----------------------|----------------------------------------|--------------------|
| `blackwell-native` | sm_100, sm_120       | FP4 bytes + swizzled E4M3 scales       | NVFP4 on the fly (1)|
| `hopper-fp8`       | sm_89, sm_90         | FP4 in memory -> E4M3 scratch per call | FP8 per token      |
| `dequant-bf16`     | any CUDA GPU         | FP4 in memory -> bf16 scratch per call | as given (bf16)    |
| `cpu-reference`    | anywhere (plain torch)| dequantized in float32                | as given           |

The default per architecture is a column of the one table, `kernels.archs`; a GPU backend
runs on the architectures that default to it (`dequant-bf16`: any CUDA GPU).
`select_backend(device)` (and `backend_name_for(cap)`, the same choice from a capability)
takes ``GPUBAKE_NVFP4_BACKEND=<name>`` over that default; asking for a backend the device
cannot run is a `KernelError` naming both. The environment is read there, at load: an
`NVFP4Linear` runs the backend bound to it (`linear.bind_backends`, by the runtime plan).

(1) With the layer's static activation global scale (`format.INPUT_GLOBAL_SCALE_KEY`, from
a published checkpoint's calibration) when it has one, else the activations' own per-call
amax. Only W4A4 quantizes activations to NVFP4, so only `blackwell-native` uses it
(`uses_static_input_scale`); the other backends quantize activations their own way (FP8
per token, or not at all) and ignore it: same output with or without.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gpubake import envs
from gpubake.errors import KernelError
from gpubake.kernels import archs
from gpubake.kernels.format import BLOCK, NVFP4Tensor, dequantize_ref, swizzle_scales

ENV_VAR = "GPUBAKE_NVFP4_BACKEND"


@dataclass
class PreparedWeight:
    """A weight in the form a backend runs: the stored tensor plus backend extras."""

    weight: NVFP4Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    # static activation global scale (float32 [], amax / 2688) or None: dynamic per call
    input_global_scale: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """`device` as a torch.device; None: the GPU if there is one, else the CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


class GemmBackend:
    """Base class: input checks shared by every backend."""

    name: ClassVar[str] = ""
    needs_cuda: ClassVar[bool] = True
    caps: ClassVar[tuple[tuple[int, int], ...] | None] = None  # None: any CUDA GPU
    # whether `apply` quantizes activations with `PreparedWeight.input_global_scale`
    uses_static_input_scale: ClassVar[bool] = False
    # whether `apply` takes ``input_gelu=True`` (the FFN's GELU computed in its activation quantization)
    fuses_input_gelu: ClassVar[bool] = False
    # whether `apply` / `apply_fused` take `layers_common.QuantizedRows` (activations quantized
    # per token to E4M3 by their producer, as this backend would quantize them)
    takes_quantized_rows: ClassVar[bool] = False

    def supports(self, device: torch.device) -> bool:
        return self.supports_capability(capability(device))

    def supports_capability(self, cap: tuple[int, int] | None) -> bool:
        """Whether a device of this capability (None: the CPU) runs this backend."""
        if not self.needs_cuda:
            return True
        if cap is None:
            return False
        return self.caps is None or cap in self.caps

    def check(self, x: torch.Tensor, pw: PreparedWeight) -> None:
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise KernelError(f"{self.name}: activations dtype {x.dtype} not supported")
        if x.shape[-1] != pw.in_features:
            raise KernelError(
                f"{self.name}: activations shape {tuple(x.shape)} do not match weight "
                f"[{pw.out_features}, {pw.in_features}]")
        if self.needs_cuda and (x.device.type != "cuda" or pw.weight.data.device.type != "cuda"):
            raise KernelError(
                f"{self.name}: needs CUDA tensors, got activations on {x.device} and "
                f"weight on {pw.weight.data.device}")

    def prepare(self, w: NVFP4Tensor, input_global_scale: torch.Tensor | None = None) -> PreparedWeight:
        """The run-time form of `w`; `input_global_scale`: the layer's static activation
        global scale (checked at load, `format.check_static_scale`), kept for the backends
        that use it."""
        if len(w.shape) != 2 or w.shape[1] % BLOCK:
            raise KernelError(f"{self.name}: weight shape {tuple(w.shape)}: need 2-D [N, K], K % 16 == 0")
        if w.data.dtype != torch.uint8 or w.block_scale.dtype != torch.float8_e4m3fn:
            raise KernelError(
                f"{self.name}: weight dtypes {w.data.dtype}/{w.block_scale.dtype}, "
                "need uint8 data and float8_e4m3fn scales")
        if input_global_scale is not None and (input_global_scale.numel() != 1
                                               or input_global_scale.dtype != torch.float32):
            raise KernelError(
                f"{self.name}: static input global scale must be one float32 value, got "
                f"{input_global_scale.dtype} {list(input_global_scale.shape)}")
        return PreparedWeight(w, input_global_scale=None if input_global_scale is None
                              else input_global_scale.reshape(()))

    def cache_weight(self, pw: PreparedWeight) -> None:
        """Keep the run-time form of the weight instead of re-expressing it per call.

        Costs memory (1 byte a weight for FP8, 2 for bf16), saves the per-call
        conversion: worth it only where M is small (cross-attention K/V on 512 text
        tokens), see docs/benchmarks.md. No-op where the stored form already runs."""

    def apply(self, x: torch.Tensor, pw: PreparedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def can_fuse(self, pws: list[PreparedWeight]) -> bool:
        """Whether `apply_fused` computes these parts of one input as one GEMM with the
        result of running them in turn (`linear.FusedNVFP4Projection` asks once per binding)."""
        return False

    def apply_fused(self, x: torch.Tensor, pws: list[PreparedWeight],
                    biases: list[torch.Tensor | None]) -> torch.Tensor:
        """``cat([apply(x, pw, b) ...], -1)`` as one GEMM, where `can_fuse` says so."""
        raise NotImplementedError


def _fused_bias(pws: list[PreparedWeight], biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The parts' biases side by side (zeros for a part without one), in their own dtype (the
    GEMM casts it, as `apply` casts each); None if no part has one."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return torch.cat([b if b is not None else present[0].new_zeros(pw.out_features) for b, pw in zip(biases, pws)])


class CpuReference(GemmBackend):
    """dequantize_ref(W) in float32, then a float32 matmul: the definition of the result."""

    name = "cpu-reference"
    needs_cuda = False

    def prepare(self, w: NVFP4Tensor, input_global_scale: torch.Tensor | None = None) -> PreparedWeight:
        pw = super().prepare(w, input_global_scale)  # W4A16: the static scale is not used
        pw.extras["w"] = dequantize_ref(w, torch.float32)
        return pw

    def apply(self, x, pw, bias=None):
        self.check(x, pw)
        y = x.float() @ pw.extras["w"].to(x.device).t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


class _Scratch:
    """One growing buffer per (device, dtype), shared by all layers of a backend.

    Layers run one after another on one stream, so the weight re-expressed for one
    layer is dead by the time the next layer overwrites it."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        key = (str(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:n].view(shape)


class DequantBf16(GemmBackend):
    """Dequantize the weight to a bf16 scratch (Triton), then cuBLAS. Any CUDA GPU."""

    name = "dequant-bf16"

    def __init__(self) -> None:
        self.scratch = _Scratch()

    def cache_weight(self, pw):
        from gpubake.kernels.convert_triton import nvfp4_to_bf16

        pw.extras["bf16_weight"] = nvfp4_to_bf16(pw.weight)

    def apply(self, x, pw, bias=None):
        from gpubake.kernels.convert_triton import nvfp4_to_bf16

        self.check(x, pw)
        w = pw.extras.get("bf16_weight")
        if w is None:
            w = nvfp4_to_bf16(pw.weight, self.scratch.get((pw.out_features, pw.in_features),
                                                          torch.bfloat16, x.device))
        return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


class HopperFp8(GemmBackend):
    """W4 stored, FP8 computed: weight -> E4M3 scratch with a per-row scale, activations
    -> E4M3 per token, then cuBLAS's row-wise scaled FP8 GEMM (`torch._scaled_mm`)."""

    name = "hopper-fp8"
    caps = archs.capabilities_defaulting_to("hopper-fp8")  # sm_89, sm_90

    def __init__(self, fast_accum: bool = True) -> None:
        self.scratch = _Scratch()
        # cuBLAS FP8 "fast accumulation" (no periodic promotion of the tensor-core
        # accumulator): faster, error change measured in docs/benchmarks.md
        self.fast_accum = fast_accum
        # Under torch.compile, quantize activations with the plain-torch definition
        # (fp8_ref, bit-identical to the Triton kernel) so that inductor fuses it into
        # the norm/modulation that produced x instead of a separate pass over x.
        self.fuse_act_quant_when_compiling = False

    def prepare(self, w, input_global_scale=None):
        from gpubake.kernels.convert_triton import fp8_row_factors

        pw = super().prepare(w, input_global_scale)  # activations are FP8 per token: not used
        pw.extras["fp8_factors"] = fp8_row_factors(w)  # per-row power of two, row scale
        return pw

    def cache_weight(self, pw):
        from gpubake.kernels.convert_triton import nvfp4_to_fp8

        pw.extras["fp8_weight"] = nvfp4_to_fp8(pw.weight, None, pw.extras["fp8_factors"])

    def _quantize_activations(self, x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., K] (with `gelu`: its FFN GELU) -> (E4M3 [M, K], per-token scale): rows already
        quantized as they are, else the Triton kernel, or under torch.compile with
        `fuse_act_quant_when_compiling` its plain-torch twin for inductor to fuse."""
        from gpubake.kernels.fp8_linear import quantize_activations_rowwise

        return quantize_activations_rowwise(x, self.fuse_act_quant_when_compiling, gelu)

    fuses_input_gelu = True
    takes_quantized_rows = True

    def apply(self, x, pw, bias=None, input_gelu: bool = False):
        from gpubake.kernels.convert_triton import nvfp4_to_fp8

        self.check(x, pw)
        N, K = pw.out_features, pw.in_features
        xq, xs = self._quantize_activations(x, input_gelu)
        cached = pw.extras.get("fp8_weight")
        wq, ws = cached if cached is not None else nvfp4_to_fp8(
            pw.weight, self.scratch.get((N, K), torch.float8_e4m3fn, x.device), pw.extras["fp8_factors"])
        out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, N), out_dtype=out_dtype,
                             bias=None if bias is None else bias.to(out_dtype),
                             use_fast_accum=self.fast_accum)
        return y.to(x.dtype).reshape(*x.shape[:-1], N)

    def can_fuse(self, pws):
        return True  # activations FP8 per token: the same for every part of one input

    def apply_fused(self, x: torch.Tensor, pws: list[PreparedWeight],
                    biases: list[torch.Tensor | None]) -> torch.Tensor:
        """``cat([apply(x, pw, b) ...], -1)`` as one GEMM: x quantized once, each weight
        re-expressed into its rows of one scratch (or its cached FP8 copied there), the
        per-row scales side by side (each already holds its part's global scale)."""
        from gpubake.kernels.convert_triton import nvfp4_to_fp8

        for pw in pws:
            self.check(x, pw)
        K = pws[0].in_features
        N = sum(pw.out_features for pw in pws)
        xq, xs = self._quantize_activations(x)
        wq = self.scratch.get((N, K), torch.float8_e4m3fn, x.device)
        scales, row = [], 0
        for pw in pws:
            rows = wq[row:row + pw.out_features]
            cached = pw.extras.get("fp8_weight")
            if cached is not None:
                rows.copy_(cached[0])
                scales.append(cached[1])
            else:
                scales.append(nvfp4_to_fp8(pw.weight, rows, pw.extras["fp8_factors"])[1])
            row += pw.out_features
        out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
        bias = _fused_bias(pws, biases)
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=torch.cat(scales).view(1, N), out_dtype=out_dtype,
                             bias=None if bias is None else bias.to(out_dtype), use_fast_accum=self.fast_accum)
        return y.to(x.dtype).reshape(*x.shape[:-1], N)


class BlackwellNative(GemmBackend):
    """W4A4 on FP4 tensor cores: activations NVFP4-quantized on the fly (Triton, scales
    written pre-swizzled), weight scales swizzled once at `prepare`, then
    ``torch._scaled_mm(a_fp4, b_fp4.t(), sa, sb) * (g_a * g_w) + bias``.

    g_a is the layer's static activation global scale when it has one (a published
    checkpoint's calibration, `PreparedWeight.input_global_scale`), else computed from the
    activations' amax on every call. The static case is LightX2V's W4A4 recipe
    (ModelTC/LightX2V f8aee98, lightx2v/common/ops/mm/mm_weight.py:641-644 and 1238-1248:
    ``scaled_nvfp4_quant(x, input_global_scale)`` then ``cutlass_scaled_nvfp4_mm(..., alpha)``
    with ``alpha = 1 / (input_global_scale * weight_global_scale)``, lines 1042-1066), in
    gpubake's convention g = 1 / LightX2V's scale, so alpha = g_a * g_w as in the dynamic case.
    Values beyond the calibrated amax saturate (block scale 448, element +-6: `format`)."""

    name = "blackwell-native"
    caps = archs.capabilities_defaulting_to("blackwell-native")  # sm_100, sm_103, sm_120, sm_121
    uses_static_input_scale = True

    def prepare(self, w, input_global_scale=None):
        pw = super().prepare(w, input_global_scale)
        pw.extras["scale_swizzled"] = swizzle_scales(w.block_scale)
        return pw

    def operands(self, x2d: torch.Tensor, pw: PreparedWeight) -> dict[str, torch.Tensor]:
        """What `apply` hands to `torch._scaled_mm` (checked bit-exactly on the CPU).

        With a static scale the quantizer reads it from device memory: no amax pass, no sync."""
        from gpubake.kernels.quantize_triton import quantize

        g = pw.input_global_scale
        qa = quantize(x2d, None if g is None else g.to(x2d.device), swizzled=True)
        return {
            "a": qa.data, "b": pw.weight.data,
            "scale_a": qa.block_scale, "scale_b": pw.extras["scale_swizzled"],
            "alpha": qa.global_scale * pw.weight.global_scale,
        }

    @staticmethod
    def _gemm(x: torch.Tensor, op: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """The FP4 GEMM of `operands` (or `operands_fused`): ``_scaled_mm * alpha + bias``,
        shaped as x with the weight's N columns."""
        out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
        y = torch._scaled_mm(op["a"].view(torch.float4_e2m1fn_x2),
                             op["b"].view(torch.float4_e2m1fn_x2).t(),
                             op["scale_a"], op["scale_b"], out_dtype=out_dtype)
        y = y * op["alpha"].to(out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    def apply(self, x, pw, bias=None):
        self.check(x, pw)
        return self._gemm(x, self.operands(x.reshape(-1, pw.in_features), pw), bias)

    def can_fuse(self, pws):
        """One NVFP4 quantization of x serves every part only if each part would quantize x
        alike: all with a per-call scale, or all with one static scale (compared here, once
        per binding: a device sync, not one per call)."""
        gs = [pw.input_global_scale for pw in pws]
        if all(g is None for g in gs):
            return True
        if any(g is None for g in gs):
            return False
        return all(bool(torch.equal(g, gs[0])) for g in gs[1:])

    def operands_fused(self, x2d: torch.Tensor, pws: list[PreparedWeight]) -> dict[str, torch.Tensor]:
        """`operands` of the parts side by side: x quantized once, the FP4 weights' rows and
        their block scales concatenated (then swizzled as one [sum N, K/16] matrix), and alpha
        a vector, each part's g_a * g_w over its columns (the FP4 GEMM itself takes no alpha,
        so the parts' different weight global scales cost nothing)."""
        from gpubake.kernels.quantize_triton import quantize

        g = pws[0].input_global_scale
        qa = quantize(x2d, None if g is None else g.to(x2d.device), swizzled=True)
        return {
            "a": qa.data, "b": torch.cat([pw.weight.data for pw in pws]),
            "scale_a": qa.block_scale,
            "scale_b": swizzle_scales(torch.cat([pw.weight.block_scale for pw in pws])),
            "alpha": torch.cat([(qa.global_scale * pw.weight.global_scale).reshape(1).expand(pw.out_features)
                                for pw in pws]),
        }

    def apply_fused(self, x, pws, biases):
        for pw in pws:
            self.check(x, pw)
        return self._gemm(x, self.operands_fused(x.reshape(-1, pws[0].in_features), pws), _fused_bias(pws, biases))


BACKENDS: dict[str, type[GemmBackend]] = {
    b.name: b for b in (BlackwellNative, HopperFp8, DequantBf16, CpuReference)
}
_instances: dict[str, GemmBackend] = {}


def get_backend(name: str) -> GemmBackend:
    """The (shared) backend instance called `name`."""
    if name not in BACKENDS:
        raise KernelError(f"{ENV_VAR}: unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    if name not in _instances:
        _instances[name] = BACKENDS[name]()
    return _instances[name]


def default_backend_name(cap: tuple[int, int] | None) -> str:
    """The backend a device of this capability gets without an override (`archs` table)."""
    return archs.arch_for(cap).nvfp4_backend


def override_name() -> str | None:
    """The backend named by ``$GPUBAKE_NVFP4_BACKEND`` (None: unset); KernelError if it names none."""
    name = (envs.raw(ENV_VAR) or "").strip()
    if name:
        get_backend(name)
    return name or None


def backend_name_for(cap: tuple[int, int] | None, device: torch.device | str | None = None) -> str:
    """The backend a device of capability `cap` runs: ``$GPUBAKE_NVFP4_BACKEND``, else the
    architecture's default; a KernelError naming both when the device cannot run it."""
    backend = get_backend(override_name() or default_backend_name(cap))
    if not backend.supports_capability(cap):
        need = "a CUDA GPU" if backend.caps is None else ", ".join(archs.sm_name(c) for c in backend.caps)
        where = f"device {device}" if device is not None else "the device"
        raise KernelError(f"{ENV_VAR}={backend.name}: needs {need}, but {where} is {archs.sm_name(cap)}")
    return backend.name


def select_backend(device: torch.device | str | None = None) -> GemmBackend:
    """Backend for `device` by compute capability; `GPUBAKE_NVFP4_BACKEND` overrides."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return get_backend(backend_name_for(capability(dev), dev))


def default_backend(device: torch.device) -> GemmBackend:
    """The architecture's own backend for `device`, no override: what an `NVFP4Linear`
    that no one bound a backend to runs (reading no environment on its forward)."""
    return get_backend(default_backend_name(capability(device)))

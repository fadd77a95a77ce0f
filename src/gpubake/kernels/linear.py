"""`NVFP4Linear`: a drop-in for `nn.Linear` whose weight is stored as NVFP4.

State dict of a layer ``P`` (what checkpoints hold)::

    P.weight_packed        uint8          [out, in // 2]   (format.py nibble order)
    P.weight_scale         float8_e4m3fn  [out, in // 16]  (row-major; swizzled at load if needed)
    P.weight_global_scale  float32        []
    P.bias                 bias dtype     [out]            (absent when bias=False)
    P.input_global_scale   float32        []               (optional: static activation scale)

All are buffers (nothing here trains); the names are `format.WEIGHT_KEYS` and
`format.INPUT_GLOBAL_SCALE_KEY`. The static activation global scale (calibrated input amax
/ 2688, gpubake's convention; published checkpoints carry it) is absent (None) unless the
layer is built with ``static_input_scale=True``, given one (`set_input_global_scale`) or
loads a state dict that holds it; `blackwell-native` quantizes the activations with it,
the other backends ignore it (`backends.GemmBackend.uses_static_input_scale`). The backend's
run-time form of the weight is built on the first forward after construction,
`load_state_dict`, `.to()` or a new binding.

Which backend computes a layer is bound to it, once: by the constructor's `backend`, or
by `bind_backends(model, backend)`, which the runtime plan calls with the backend it
resolved (``$GPUBAKE_NVFP4_BACKEND`` or the architecture's default) and reports. A layer
nothing bound runs its device's default backend (`backends.default_backend`); a forward
never reads the environment.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from gpubake.errors import KernelError
from gpubake.kernels.backends import GemmBackend, PreparedWeight, default_backend, get_backend
from gpubake.kernels.format import (
    BLOCK,
    GLOBAL_SCALE_KEY,
    INPUT_GLOBAL_SCALE_KEY,
    PACKED_KEY,
    SCALE_KEY,
    NVFP4Tensor,
    check_static_scale,
    weight_tensors,
)
from gpubake.kernels.layers_common import (apply_input_activation, apply_keeping_dtypes, bind_all, check_takes_rows,
                                           count_bound)
from gpubake.kernels.quantizer import quantize


class NVFP4Linear(nn.Module):
    """y = x @ dequant(W).T + bias, computed by the bound backend (else the device's default)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 backend: str | None = None, static_input_scale: bool = False) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise KernelError(f"NVFP4Linear: in_features={in_features} is not a multiple of {BLOCK}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(PACKED_KEY, torch.zeros(out_features, in_features // 2,
                                                     dtype=torch.uint8, device=device))
        self.register_buffer(SCALE_KEY, torch.zeros(out_features, in_features // BLOCK,
                                                    dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer(GLOBAL_SCALE_KEY, torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)
        # static activation global scale: a placeholder that loading fills, or None (dynamic)
        self.register_buffer(INPUT_GLOBAL_SCALE_KEY, torch.ones((), dtype=torch.float32, device=device)
                             if static_input_scale else None)
        self._backend: GemmBackend | None = get_backend(backend) if backend else None
        # an activation applied to the input first (`layers_common.apply_input_activation`; the
        # runtime plan's `fuse_ffn_gelu`), inside the backend's quantization where it can
        self.input_activation: str | None = None
        # keep the backend's run-time weight (GemmBackend.cache_weight): set by the
        # runtime for small-M layers, where the per-call re-expression dominates
        self.keep_runtime_weight = False
        # (device, backend, weight in its run-time form), built by the first forward on a device
        self._prepared: tuple[torch.device, GemmBackend, PreparedWeight] | None = None

    # -------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, global_scale: float | torch.Tensor | None = None,
                    backend: str | None = None,
                    input_global_scale: float | torch.Tensor | None = None) -> "NVFP4Linear":
        """Quantize an `nn.Linear` (`quantizer.quantize`: Triton on CUDA, the reference elsewhere; same bytes);
        `input_global_scale`: a static activation global scale (amax / 2688), None: dynamic."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=w.device, dtype=(linear.bias.dtype if linear.bias is not None else w.dtype),
                  backend=backend)
        mod.load_nvfp4(quantize(w, global_scale))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        mod.set_input_global_scale(input_global_scale)
        return mod

    def set_input_global_scale(self, g: float | torch.Tensor | None) -> None:
        """Set (or, with None, remove) the static activation global scale: amax / 2688 of
        the calibrated input, `format.INPUT_GLOBAL_SCALE_KEY`'s convention. Read it as
        ``layer.input_global_scale`` (None: activations get a per-call global scale)."""
        if g is None:
            self._buffers[INPUT_GLOBAL_SCALE_KEY] = None
        else:
            t = torch.as_tensor(g, dtype=torch.float32).detach().reshape(())
            check_static_scale(t, INPUT_GLOBAL_SCALE_KEY)
            self._buffers[INPUT_GLOBAL_SCALE_KEY] = t.to(self._buffers[GLOBAL_SCALE_KEY].device).clone()
        self._prepared = None

    def load_nvfp4(self, q: NVFP4Tensor) -> None:
        """Copy a quantized weight [out, in] into the buffers."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise KernelError(
                f"NVFP4Linear: weight shape {tuple(q.shape)} != ({self.out_features}, {self.in_features})")
        for key, t in weight_tensors(q).items():
            self._buffers[key].copy_(t)
        self._prepared = None

    def nvfp4_weight(self) -> NVFP4Tensor:
        return NVFP4Tensor(self._buffers[PACKED_KEY], self._buffers[SCALE_KEY], self._buffers[GLOBAL_SCALE_KEY],
                           torch.Size((self.out_features, self.in_features)))

    # -------------------------------------------------------------- running

    def bind_backend(self, backend: GemmBackend | str) -> None:
        """Run this layer on `backend` (a name or an instance) from the next forward on."""
        self._backend = get_backend(backend) if isinstance(backend, str) else backend
        self._prepared = None

    @property
    def bound_backend(self) -> GemmBackend | None:
        """The bound backend; None: unbound (the device's default runs)."""
        return self._backend

    @property
    def backend_name(self) -> str | None:
        """The name of the bound backend; None: unbound (the device's default runs)."""
        return self._backend.name if self._backend is not None else None

    def backend(self, device: torch.device) -> GemmBackend:
        """The backend a forward on `device` runs: the bound one, else the device's default."""
        b = self._backend if self._backend is not None else default_backend(device)
        if not b.supports(device):
            raise KernelError(f"NVFP4Linear: backend {b.name} cannot run on {device}")
        return b

    def set_keep_runtime_weight(self, keep: bool = True) -> None:
        """Cache the backend's run-time weight from the next forward on (or stop)."""
        self.keep_runtime_weight = keep
        self._prepared = None

    def prepared(self, device: torch.device) -> tuple[GemmBackend, PreparedWeight]:
        """The backend a forward on `device` runs and its run-time weight (built once)."""
        if self._prepared is None or self._prepared[0] != device:
            b = self.backend(device)
            pw = b.prepare(self.nvfp4_weight(), self._buffers[INPUT_GLOBAL_SCALE_KEY])
            if self.keep_runtime_weight:
                b.cache_weight(pw)
            self._prepared = (device, b, pw)
        return self._prepared[1], self._prepared[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, pw = self.prepared(x.device)
        check_takes_rows(x, b, "NVFP4Linear")
        if self.input_activation is not None and b.fuses_input_gelu:
            return b.apply(x, pw, self.bias, input_gelu=True)
        return b.apply(apply_input_activation(x, self.input_activation), pw, self.bias)

    _FIXED_DTYPE = (SCALE_KEY, GLOBAL_SCALE_KEY, INPUT_GLOBAL_SCALE_KEY)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half(): buffers move, the prepared cache dies, and the
        format's own dtypes (float8 scales, float32 global scales) survive a model-wide dtype
        cast (`layers_common.apply_keeping_dtypes`; the bias does follow the cast)."""
        self._prepared = None
        return apply_keeping_dtypes(self, self._FIXED_DTYPE, lambda: super(NVFP4Linear, self)._apply(fn, recurse))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The optional static activation scale is loaded when the state dict holds it
        (checked: float32 scalar, finite, >= 2**-120; one line naming the key)."""
        self._prepared = None
        key = prefix + INPUT_GLOBAL_SCALE_KEY
        if key in state_dict:
            check_static_scale(state_dict[key], key)
            if self._buffers[INPUT_GLOBAL_SCALE_KEY] is None:
                self._buffers[INPUT_GLOBAL_SCALE_KEY] = torch.ones(
                    (), dtype=torch.float32, device=self._buffers[GLOBAL_SCALE_KEY].device)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        static = ", static_input_scale=True" if self._buffers[INPUT_GLOBAL_SCALE_KEY] is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format=nvfp4{static}")


class FusedNVFP4Projection(nn.Module):
    """Several `NVFP4Linear`s of one input as ONE GEMM: ``cat([p(x) for p in parts], -1)``.

    The parts keep their own weights, names and state-dict keys (they are not submodules of
    this one, which holds no tensor); a backend whose `can_fuse` says yes computes them with
    `apply_fused` (hopper-fp8: one FP8 quantization of x, the parts' FP8 weights side by side,
    one cuBLAS call; blackwell-native: one NVFP4 quantization of x, the parts' FP4 weights side
    by side, one FP4 GEMM, alpha per part), any other one after another. diffusers' Wan
    attention takes it as ``to_qkv``."""

    def __init__(self, parts: list[NVFP4Linear]) -> None:
        super().__init__()
        if len(parts) < 2 or len({p.in_features for p in parts}) != 1:
            raise KernelError("FusedNVFP4Projection: needs two or more NVFP4Linear of one input size")
        self.__dict__["parts"] = tuple(parts)  # not registered: no second copy of their keys
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        # (weak references to the parts' run-time weights, whether their backend fuses them):
        # asked once per binding; weak, so that a stale run-time weight is not kept alive
        self._fusable: tuple[tuple[weakref.ref, ...], bool] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        got = [p.prepared(x.device) for p in self.parts]
        for b, _ in got:  # fused or part by part, each backend must take rows that arrive quantized
            check_takes_rows(x, b, "FusedNVFP4Projection")
        backend, pws = got[0][0], [pw for _, pw in got]
        known = self._fusable
        if known is None or any(r() is not pw for r, pw in zip(known[0], pws)):
            fuse = all(b is backend for b, _ in got) and backend.can_fuse(pws)
            self._fusable = known = (tuple(weakref.ref(pw) for pw in pws), fuse)
        if known[1]:
            return backend.apply_fused(x, pws, [p.bias for p in self.parts])
        return torch.cat([b.apply(x, pw, p.bias) for (b, pw), p in zip(got, self.parts)], dim=-1)

    def extra_repr(self) -> str:
        return f"parts={len(self.parts)}, in_features={self.in_features}, out_features={self.out_features}"


def bind_backends(model: nn.Module, backend: GemmBackend | str) -> int:
    """Bind `backend` to every `NVFP4Linear` of `model`; returns how many layers."""
    return bind_all(model, NVFP4Linear, backend)


def bound_backends(model: nn.Module) -> dict[str, int]:
    """{backend name: number of layers} of the `NVFP4Linear`s of `model` ("default" for
    unbound layers): what the self-test reports as the backend that runs."""
    return count_bound(model, NVFP4Linear)

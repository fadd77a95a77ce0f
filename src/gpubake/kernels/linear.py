"""`NVFP4Linear`: a drop-in for `nn.Linear` whose weight is stored as NVFP4.

State dict of a layer ``P`` (what checkpoints hold)::

    P.weight_packed        uint8          [out, in // 2]   (format.py nibble order)
    P.weight_scale         float8_e4m3fn  [out, in // 16]  (row-major; swizzled at load if needed)
    P.weight_global_scale  float32        []
    P.bias                 bias dtype     [out]            (absent when bias=False)
    P.input_global_scale   float32        []               optional: a static activation scale
                                                           (amax / 2688, imported checkpoints)

All are buffers (nothing here trains). The backend's run-time form of the weight is
built on the first forward after construction, `load_state_dict` or `.to()`.
"""

from __future__ import annotations

import torch
from torch import nn

from gpubake.errors import KernelError
from gpubake.kernels.backends import GemmBackend, PreparedWeight, get_backend, select_backend
from gpubake.kernels.format import BLOCK, NVFP4Tensor, quantize_ref


class NVFP4Linear(nn.Module):
    """y = x @ dequant(W).T + bias, computed by the backend for x's device."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                 backend: str | None = None) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise KernelError(f"NVFP4Linear: in_features={in_features} is not a multiple of {BLOCK}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2,
                                                          dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // BLOCK,
                                                         dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_global_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)
        # set (a float32 [] tensor) only for checkpoints that carry one; not used by the GEMMs yet
        self.register_buffer("input_global_scale", None)
        self.backend_name = backend
        # keep the backend's run-time weight (GemmBackend.cache_weight): set by the
        # runtime for small-M layers, where the per-call re-expression dominates
        self.keep_runtime_weight = False
        self._prepared: tuple[str, str, PreparedWeight] | None = None

    # -------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, global_scale: float | torch.Tensor | None = None,
                    backend: str | None = None) -> "NVFP4Linear":
        """Quantize an `nn.Linear` (reference quantizer on CPU, Triton on CUDA; same bytes)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=w.device, dtype=(linear.bias.dtype if linear.bias is not None else w.dtype),
                  backend=backend)
        if w.device.type == "cuda":
            from gpubake.kernels.quantize_triton import quantize
            q = quantize(w, global_scale)
        else:
            q = quantize_ref(w, global_scale)
        mod.load_nvfp4(q)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def load_nvfp4(self, q: NVFP4Tensor) -> None:
        """Copy a quantized weight [out, in] into the buffers."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise KernelError(
                f"NVFP4Linear: weight shape {tuple(q.shape)} != ({self.out_features}, {self.in_features})")
        self.weight_packed.copy_(q.data)
        self.weight_scale.copy_(q.block_scale)
        self.weight_global_scale.copy_(q.global_scale)
        self._prepared = None

    def nvfp4_weight(self) -> NVFP4Tensor:
        return NVFP4Tensor(self.weight_packed, self.weight_scale, self.weight_global_scale,
                           torch.Size((self.out_features, self.in_features)))

    # -------------------------------------------------------------- running

    def backend(self, device: torch.device) -> GemmBackend:
        if self.backend_name:
            b = get_backend(self.backend_name)
            if not b.supports(device):
                raise KernelError(f"NVFP4Linear: backend {b.name} cannot run on {device}")
            return b
        return select_backend(device)

    def set_keep_runtime_weight(self, keep: bool = True) -> None:
        """Cache the backend's run-time weight from the next forward on (or stop)."""
        self.keep_runtime_weight = keep
        self._prepared = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backend(x.device)
        key = (b.name, str(x.device))
        if self._prepared is None or self._prepared[:2] != key:
            pw = b.prepare(self.nvfp4_weight())
            if self.keep_runtime_weight:
                b.cache_weight(pw)
            self._prepared = (*key, pw)
        return b.apply(x, self._prepared[2], self.bias)

    _FIXED_DTYPE = ("weight_scale", "weight_global_scale", "input_global_scale")

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half(): buffers move, the prepared cache dies, and the
        format's own dtypes survive a model-wide dtype cast (float8 scales and the
        float32 global scale are floating point, so `.to(torch.bfloat16)` would
        otherwise convert them; the bias does follow the cast)."""
        self._prepared = None
        keep = {n: self._buffers[n] for n in self._FIXED_DTYPE if self._buffers[n] is not None}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format=nvfp4")

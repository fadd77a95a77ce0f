"""What the quantized layers (`linear.NVFP4Linear`, `fp8_linear.FP8Linear`) share: binding a
backend to every layer of a kind, counting what is bound, and keeping the format's own
dtypes through a model-wide dtype cast. One definition, so both formats behave alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from gpubake.errors import KernelError


def bind_all(model: nn.Module, kind: type, backend: Any) -> int:
    """`layer.bind_backend(backend)` on every `kind` layer of `model`; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, kind)]
    for m in layers:
        m.bind_backend(backend)
    return len(layers)


def count_bound(model: nn.Module, kind: type) -> dict[str, int]:
    """{backend name: number of `kind` layers of `model` bound to it} ("default" for unbound)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, kind):
            key = m.backend_name or "default"
            out[key] = out.get(key, 0) + 1
    return out


def apply_keeping_dtypes(module: nn.Module, names: Iterable[str], apply: Callable[[], nn.Module]) -> nn.Module:
    """Run `apply` (the module's `nn.Module._apply`) so that buffers move with it but the
    buffers `names` keep their dtypes: float8 and float32 format tensors are floating point,
    so `.to(torch.bfloat16)` would otherwise convert them (the bias does follow the cast)."""
    buffers: dict[str, torch.Tensor | None] = module._buffers  # type: ignore[assignment]
    keep = {n: buffers[n] for n in names if buffers.get(n) is not None}
    out = apply()
    for n, old in keep.items():
        new = buffers[n]
        if new is not None and new.dtype != old.dtype:
            buffers[n] = old.to(device=new.device)
    return out


def apply_input_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """What a quantized layer applies to its input before the GEMM (`input_activation`) where
    its backend does not fuse it: None, or "gelu_tanh", the Wan FFN's tanh-approximate GELU
    moved from the up-projection's module into the down-projection (the runtime plan's
    `fuse_ffn_gelu`), as diffusers' FFN computes it."""
    if activation is None:
        return x
    return torch.nn.functional.gelu(x, approximate="tanh")


class QuantizedRows(NamedTuple):
    """Activations their producer already quantized per token to E4M3 as the FP8 backends do
    (`norm_quant.layer_norm_fp8`, the runtime plan's `fuse_norm_quant`): a quantized layer
    whose backend `takes_quantized_rows` runs its GEMM on them as they are. `shape` and
    `dtype` are the unquantized activations' ([..., K]; the output takes the dtype)."""

    codes: torch.Tensor  # float8_e4m3fn [M, K]
    scales: torch.Tensor  # float32 [M, 1]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device  # the codes' (a field, not a property: dynamo traces a named tuple's fields)


def check_takes_rows(x: Any, backend: Any, layer: str) -> None:
    """One line where rows arrive quantized at a layer whose backend quantizes its own input
    (a backend bound after the plan applied `fuse_norm_quant`)."""
    if isinstance(x, QuantizedRows) and not getattr(backend, "takes_quantized_rows", False):
        raise KernelError(f"{layer}: activations arrive quantized (fuse_norm_quant) but backend {backend.name} "
                          "quantizes its own; apply the runtime plan again after binding it")

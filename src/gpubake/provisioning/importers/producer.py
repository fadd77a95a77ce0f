"""What every producer module provides, and the checks they share.

A producer stores, per quantized linear `P`, `P.weight` (uint8 for NVFP4, float8_e4m3fn
for FP8) and a few more `P.<suffix>` tensors. Its module says which suffixes (dtype and
shape for a layer of [out, in]), checks the scales (one line naming the file and key), and
converts one layer into gpubake's layout (`target.Layer` / `target.FP8Layer`), exactly.
A producer class handles one precision (`precision`): the producer's name says whose
conventions the keys follow, the weights' dtype which precision (`detect.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpubake.provisioning.importers.source import Expert, SourceError, TensorInfo
from gpubake.provisioning.importers.target import Layer

FLOATS = ("float32", "bfloat16", "float16")
FP8_DTYPE = "float8_e4m3fn"
SCALE_DTYPES = ("float8_e4m3fn", "uint8")  # E4M3 bytes, typed or raw

Read = Callable[[str], Any]          # suffix -> tensor (CPU)
Where = Callable[[str], str]         # suffix -> "file: key" for errors


@dataclass(frozen=True)
class Want:
    dtypes: tuple[str, ...]
    shape: tuple[int, ...] | None  # None: a scalar, stored as [] or [1]
    vector: bool = False           # any 1-D length (a byte string)
    also: tuple[tuple[int, ...], ...] = ()  # other accepted shapes (e.g. [out] beside [out, 1])

    def check(self, info: TensorInfo) -> None:
        if info.dtype not in self.dtypes:
            raise SourceError(f"{info.where()}: dtype {info.dtype}, expected {' or '.join(self.dtypes)}")
        if self.vector:
            if len(info.shape) != 1:
                raise SourceError(f"{info.where()}: shape {list(info.shape)}, expected a 1-D byte string")
        elif self.shape is None:
            if info.shape not in ((), (1,)):
                raise SourceError(f"{info.where()}: shape {list(info.shape)}, expected a scalar ([] or [1])")
        elif tuple(info.shape) != self.shape and tuple(info.shape) not in self.also:
            shapes = " or ".join(str(list(s)) for s in (self.shape, *self.also))
            raise SourceError(f"{info.where()}: shape {list(info.shape)}, expected {shapes}")


def scalar() -> Want:
    return Want(FLOATS, None)


def swizzled_shape(out_f: int, in_f: int) -> tuple[int, int]:
    from gpubake.kernels.format import swizzled_scale_shape

    return swizzled_scale_shape(out_f, in_f // 16)


class Producer:
    """Base class; subclasses set `name` and implement `wants` and `convert`."""

    name = "?"
    precision = "nvfp4"            # the checkpoint format it converts to: nvfp4 | fp8
    markers: tuple[str, ...] = ()  # file-level tensors that only mark the format (read, not copied)

    def prepare(self, expert: Expert, names: dict[str, str]) -> None:
        """Called once per expert before any layer (header metadata, name map)."""

    def is_quantized(self, module: str, parts: dict[str, TensorInfo]) -> bool:
        w = parts.get("weight")
        return w is not None and w.dtype == ("uint8" if self.precision == "nvfp4" else FP8_DTYPE)

    def dummy(self, module: str, suffix: str) -> bool:
        """Whether `suffix` beside an unquantized weight is a no-op the producer allows
        (checked to be 1.0, then dropped)."""
        return False

    def wants(self, module: str, out_f: int, in_f: int, present: set[str]) -> tuple[dict[str, Want], dict[str, Want]]:
        """(required, optional) suffixes of a quantized layer, `bias` excluded."""
        raise NotImplementedError

    def scalars(self, module: str, read: Read, where: Where, present: set[str]) -> Layer:
        """The layer's global and activation scales, checked (reads only small tensors;
        run for every layer before anything is written). `packed`/`block_scale` unset."""
        raise NotImplementedError

    def codes(self, out_f: int, in_f: int, read: Read) -> tuple[Any, Any]:
        """(packed codes low nibble first, row-major E4M3 block scales)."""
        raise NotImplementedError

    def convert(self, module: str, out_f: int, in_f: int, read: Read, where: Where, present: set[str]) -> Layer:
        layer = self.scalars(module, read, where, present)
        layer.packed, layer.block_scale = self.codes(out_f, in_f, read)
        return layer


def value(t: Any) -> Any:
    """A stored scalar as a float32 [] tensor (exact from float32/bf16/fp16)."""
    import torch

    return t.reshape(()).to(torch.float32)


def check_scale(t: Any, where: str, *, zero_ok: bool = False) -> None:
    import math

    v = float(t)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise SourceError(f"{where}: {v!r} is not a {'non-negative' if zero_ok else 'positive'} finite scale")


def scale_2_and_input_scale(read: Callable[[str], Any], where: Callable[[str], str],
                            present: set[str] | Any) -> tuple[Any, Any]:
    """(`weight_scale_2`, `input_scale` or None) as checked float32 scalars: ModelOpt's export
    names, which ComfyUI's NVFP4 layers use too (amax / 2688 and the static input scale)."""
    g = value(read("weight_scale_2"))
    check_scale(g, where("weight_scale_2"), zero_ok=True)
    inp = None
    if "input_scale" in present:
        inp = value(read("input_scale"))
        check_scale(inp, where("input_scale"))
    return g, inp


def e4m3(t: Any) -> Any:
    import torch

    return t if t.dtype == torch.float8_e4m3fn else t.contiguous().view(torch.float8_e4m3fn)


def unswizzle(t: Any, out_f: int, in_f: int) -> Any:
    """The 128x4 blocked scales of a [out, in] weight -> row-major [out, in/16]."""
    from gpubake.kernels.format import unswizzle_scales

    return unswizzle_scales(e4m3(t), out_f, in_f // 16)


def check_scales(t: Any, where: str) -> None:
    """Every element of a per-row scale positive and finite (one line naming the first row that is not)."""
    import torch

    v = t.reshape(-1).to(torch.float64)
    bad = ~(torch.isfinite(v) & (v > 0))
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise SourceError(f"{where}: row {row}: {float(v[row])!r} is not a positive finite scale")


def row_scale(t: Any, out_f: int) -> Any:
    """A stored per-row scale ([out, 1] or [out]) as gpubake's float32 [out, 1] (exact
    from float32, bf16 and fp16)."""
    import torch

    return t.reshape(out_f, 1).to(torch.float32)

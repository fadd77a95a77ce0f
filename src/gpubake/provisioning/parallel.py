"""One clip across GPUs: diffusers' own context parallelism, planned and applied (issue 15).

The engine is diffusers' (0.42.1): `ContextParallelConfig(ring_degree=, ulysses_degree=)`
and `ModelMixin.enable_parallelism`, whose hooks split the video tokens across the ranks
at the first block and gather them after `proj_out` (`WanTransformer3DModel._cp_plan`),
and whose templated attention (`attention_dispatch.TemplatedUlyssesAttention` /
`TemplatedRingAttention`) runs the self-attention over the whole sequence:

* ``ulysses:N``: an all-to-all swaps the token split for a head split, each rank attends
  over every token for heads/N heads, a second all-to-all swaps back. Needs heads % N == 0
  (Wan 2.2 A14B: 40 heads, so 2, 4, 5, 8 GPUs). Each rank's attention is plain attention,
  so the result is the one-GPU result (bit-exact on the CPU: tests/perf/test_parallel.py).
* ``ring:N``: each rank keeps its queries, sees every rank's keys/values in turn and
  merges the partial results with their log-sum-exp (an online softmax in another order
  than one GPU's kernel: equal within rounding, not bit-exact). Needs a backend that
  returns the LSE.

What runs the self-attention under CP: a diffusers backend that declares context-parallel
support. Our 8-bit kernels (fa3-fp8, cudnn-fp8, sage-int8, `kernels.attention`) are plain
functions in diffusers' backend slots: no LSE, no all-to-all, and they refuse a
`_parallel_config`. So with CP on, the plan runs BF16 self-attention instead and says so
(`RuntimePlan.notes`, and `apply_runtime`'s "parallel" entry in the report):
Ulysses: diffusers' ``native`` (torch SDPA's own choice: cuDNN on Hopper); ring: ``_native_cudnn``
on a GPU (``_native_flash`` while our cudnn-fp8 function occupies that slot).

The CPU (tests, `bench_multigpu.py --small`) needs two shims, both here and only for
the CPU: diffusers computes the rank's device as ``rank % torch.accelerator.device_count()``,
a ZeroDivisionError on a CPU-only torch (device_count is 0 there), and no stock backend
returns an LSE on the CPU (``native`` refuses ``return_lse``; ``_native_flash`` calls
``aten::_scaled_dot_product_flash_attention``, which has no CPU kernel), so ring attention
on the CPU runs ATen's CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``,
the same outputs) through diffusers' ring code.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gpubake.errors import GpubakeError

KINDS = ("none", "ring", "ulysses")
# Below this many video tokens per rank a clip is not split: the all-to-alls / K-V
# rotations cost more than the attention they share. UNMEASURED: a placeholder for
# bench/bench_multigpu.py's 2- and 8-GPU run to set (docs/benchmarks.md, "not yet run").
MIN_TOKENS_PER_RANK = 1024
# Wan 2.2's latent geometry: the VAE's 8x spatial / 4x temporal compression, then the
# transformer's (1, 2, 2) patches.
_VAE_SPATIAL, _VAE_TEMPORAL, _PATCH = 8, 4, (1, 2, 2)
_VALUE = re.compile(r"^(none|(ring|ulysses):([0-9]+))$")


class ParallelError(GpubakeError):
    """A context-parallel setting that cannot run: a bad value, or no process group."""


@dataclass(frozen=True)
class Parallel:
    """How one clip is split: none, or ring / Ulysses attention over `degree` ranks."""

    kind: str = "none"
    degree: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ParallelError(f"parallel={self.kind!r} (one of none, ring:N, ulysses:N)")
        if (self.kind == "none") != (self.degree == 1) or self.degree < 1:
            raise ParallelError(f"parallel={self}: none has degree 1, ring and ulysses a degree >= 2")

    @classmethod
    def parse(cls, value: str) -> Parallel:
        m = _VALUE.match(value.strip())
        if not m:
            raise ParallelError(f"parallel={value!r}: none, ring:N or ulysses:N (N >= 2 processes)")
        return cls() if m.group(1) == "none" else cls(m.group(2), int(m.group(3)))

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.degree}"


def clip_tokens(width: int, height: int, frames: int) -> int:
    """Video tokens of a Wan 2.2 clip: what context parallelism splits (480x832x81: 32760)."""
    lf = (frames - 1) // _VAE_TEMPORAL + 1
    return lf // _PATCH[0] * (height // _VAE_SPATIAL // _PATCH[1]) * (width // _VAE_SPATIAL // _PATCH[2])


def parallel_for(world_size: int, *, heads: int | None = None, tokens: int | None = None) -> tuple[Parallel, str]:
    """The split for a process group of `world_size` (one process per GPU) and a clip of
    `tokens` video tokens, with the reason. Ulysses where the heads divide (one all-to-all
    pair per attention, NVLink's strength), else ring; none for one process or a clip
    too short to pay for the traffic."""
    if world_size < 2:
        return Parallel(), "one process: nothing to split"
    if tokens is not None and tokens // world_size < MIN_TOKENS_PER_RANK:
        return Parallel(), (f"{tokens} tokens over {world_size} ranks is under {MIN_TOKENS_PER_RANK} "
                            "a rank: not split")
    if heads is None or heads % world_size == 0:
        return Parallel("ulysses", world_size), f"{heads or 'the'} heads divide by {world_size}: Ulysses"
    return Parallel("ring", world_size), f"{heads} heads do not divide by {world_size}: ring"


def world_size() -> int:
    """The size of the initialised torch.distributed group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ------------------------------------------------------------------------ applying


def self_attention_backend(par: Parallel, device_type: str) -> str:
    """The context-parallel-capable diffusers backend the self-attention runs under `par`."""
    from diffusers.models import attention_dispatch as ad

    if par.kind == "ulysses":
        return ad.AttentionBackendName.NATIVE.value
    if device_type == "cpu":
        return ad.AttentionBackendName._NATIVE_FLASH.value  # with the CPU kernel (`_cpu_ring_shim`)
    cudnn = ad.AttentionBackendName._NATIVE_CUDNN
    stock = ad._AttentionBackendRegistry._backends.get(cudnn)
    if stock is not None and getattr(stock, "__module__", "") == ad.__name__:
        return cudnn.value
    return ad.AttentionBackendName._NATIVE_FLASH.value  # our cudnn-fp8 function holds the cuDNN slot


def _cpu_flash_forward_op(ctx: Any, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                          return_lse: bool = False, _save_ctx: bool = True, _parallel_config: Any = None) -> Any:
    """diffusers' `_native_flash_attention_forward_op` on ATen's CPU flash kernel (forward
    only: inference); [B, S, H, D] in, out and LSE [B, S, H] as diffusers lays them out."""
    import torch

    if query.device.type != "cpu":
        return _CUDA_FLASH_FORWARD_OP[0](ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         return_lse, _save_ctx=_save_ctx, _parallel_config=_parallel_config)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


_CUDA_FLASH_FORWARD_OP: list[Any] = []


def _cpu_ring_shim() -> None:
    """Route `_native_flash`'s forward op through `_cpu_flash_forward_op` (CPU tensors only)."""
    from diffusers.models import attention_dispatch as ad

    if ad._native_flash_attention_forward_op is not _cpu_flash_forward_op:
        _CUDA_FLASH_FORWARD_OP[:] = [ad._native_flash_attention_forward_op]
        ad._native_flash_attention_forward_op = _cpu_flash_forward_op


@contextlib.contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers takes ``rank % torch.accelerator.device_count()``: 0 on a CPU-only torch."""
    import torch

    real = torch.accelerator.device_count
    if real() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = real  # type: ignore[assignment]


_MESHES: dict[tuple[str, int, int], Any] = {}


def _mesh(device_type: str, ring: int, ulysses: int) -> Any:
    """One device mesh per split, shared by both experts (a mesh is a set of process groups)."""
    key = (device_type, ring, ulysses)
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[key] = init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    return _MESHES[key]


def enable_context_parallel(model: Any, par: Parallel, *, tokens: int | None = None) -> dict[str, Any]:
    """Split `model`'s (a diffusers Wan transformer, on this rank's device) self-attention
    across the process group as `par` says; returns what was done, for the report.

    Ulysses over heads that do not divide falls back to ring (said in the result). A clip
    whose `tokens` do not divide by the degree (None: unknown, any request size) uses
    diffusers' "anything" variant of the same attention, which pads unequal shards."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.models import attention_dispatch as ad

    if not par.on:
        return {"parallel": "none"}
    if not (dist.is_available() and dist.is_initialized()):
        raise ParallelError(f"parallel={par}: needs torch.distributed initialised (one process per GPU, "
                            "launched by torchrun)")
    if dist.get_world_size() != par.degree:
        raise ParallelError(f"parallel={par}: the process group has {dist.get_world_size()} ranks, "
                            f"not {par.degree}")
    notes: list[str] = []
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if par.kind == "ulysses" and heads is not None and heads % par.degree:
        notes.append(f"{heads} heads do not divide by {par.degree}: ring instead of Ulysses")
        par = Parallel("ring", par.degree)
    device_type = next(model.parameters()).device.type
    backend = self_attention_backend(par, device_type)
    n = 0
    for name, mod in model.named_modules():
        proc = getattr(mod, "processor", None)
        if name.endswith("attn1") and proc is not None and hasattr(proc, "_attention_backend"):
            proc._attention_backend = ad.AttentionBackendName(backend)
            n += 1
    uneven = tokens is None or tokens % par.degree != 0
    ring, uly = (par.degree, 1) if par.kind == "ring" else (1, par.degree)
    cfg = ContextParallelConfig(ring_degree=ring, ulysses_degree=uly, mesh=_mesh(device_type, ring, uly),
                                ring_anything=uneven and par.kind == "ring",
                                ulysses_anything=uneven and par.kind == "ulysses")
    if device_type == "cpu" and par.kind == "ring":
        _cpu_ring_shim()
    with _cpu_device_count() if device_type == "cpu" else contextlib.nullcontext():
        model.enable_parallelism(config=cfg)
    return {"parallel": str(par), "rank": dist.get_rank(), "self_attention_backend": backend,
            "self_attention_modules": n, "anything": uneven, "notes": notes}

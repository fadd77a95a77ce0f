"""Run-time levers of the Wan denoising step, chosen per GPU architecture (issue 7).

The NVFP4 GEMM backend is picked by `gpubake.kernels.backends` from the compute
capability (or ``$GPUBAKE_NVFP4_BACKEND``), recorded in the plan and bound to every NVFP4
layer when the plan is applied; this module adds the levers around it that
`bench/bench_step.py` measured one at a time (docs/benchmarks.md, "Denoising step on
Hopper"), and keeps only those that won on that architecture:

* ``attention``: which kernel runs attention ("default" leaves torch SDPA's own choice,
  "cudnn" forces cuDNN's fused attention, "flash" FlashAttention-2; "sage-int8" and
  "cudnn-fp8" run the long self-attention through 8-bit SageAttention-1 or cuDNN's FP8
  SDPA, `gpubake.kernels.attention`); "sparse-flex" runs it block-sparse through
  FlexAttention, keeping the ``sparse_keep`` fraction of key blocks for each query block of
  ``sparse_block_q`` tokens (LightX2V's router,
  `gpubake.kernels.attention_sparse`; in no architecture's plan, a model may declare it:
  `plan_from_env`'s `model_levers`);
* ``cfg_batch``: both classifier-free-guidance passes in ONE forward of batch 2;
* ``cache_small_m``: the cross-attention K/V projections (M = 512 text tokens) keep the
  backend's run-time weight instead of re-expressing NVFP4 per call;
* ``compile_blocks``: regional ``torch.compile`` of the repeated transformer block;
* ``fuse_qkv``: each self-attention's Q, K and V projections as one GEMM
  (`kernels.linear.FusedNVFP4Projection`; on `hopper-fp8` one FP8 activation quantization and
  one cuBLAS call instead of three of each, on `blackwell-native` one NVFP4 quantization and
  one FP4 GEMM with alpha per part); on an H200 (2026-12-03, compiled blocks) no gain: 1.848
  against 1.843 s a 480p step (inductor already fuses around the three); not run on Blackwell: off;
* ``fuse_qk_rope``: each self-attention's Q/K RMS norm (over all heads) and rotary embedding
  as one Triton pass (`kernels.qk_norm_rope`, diffusers' arithmetic up to the sum of squares'
  order) instead of inductor's reduction kernel, which a 720p profile measured at 3.28 ms a
  block, five times the pass's memory traffic (`bench/profile_forward.py`);
* ``fuse_ffn_gelu``: the FFN's tanh GELU moved into the down-projection, whose FP8 activation
  quantization (`hopper-fp8`, `scaled-mm`) computes it on the way: one pass over the
  13,824-wide activation instead of a GELU kernel's read and write and the quantizer's; the
  same state dict; measured on an H200 (2026-12-04, 720p, 4 blocks): 323.8 against 321.4 ms a
  forward, slower (the two-pass quantizer computes the GELU in both passes, +2.3 ms a block,
  for the 1.44 ms GELU kernel it saves): off;
* ``fuse_norm_quant``: each block's three LayerNorms (with their modulation) hand their
  linears E4M3 rows quantized in the same pass (`kernels.norm_quant`), so the norm writes no
  bf16 tensor and Q, K and V do not quantize it three times; the linears must take quantized
  rows (`hopper-fp8`, `scaled-mm`), the state dict is the same; predicted 0.7-1.0 ms a 480p
  block (2.5-3.5 %) from the bytes moved, not measured on a GPU: off;
* ``fuse_act_quant``: under that compile, the FP8 activation quantization of the
  `hopper-fp8` backend is left to inductor (fused into the op before it);
* ``text_encoder``: "shrink" puts the UMT5 encoder in ~4.4 GiB instead of ~12.5
  (`gpubake.provisioning.text_encoder`), a memory lever, not a speed one;
* ``vae_tiling``: the VAE decodes in spatial tiles (diffusers' `enable_tiling`), which
  bounds the decode's working memory, the largest peak of a clip otherwise;
* ``vae_channels_last``: the VAE's 3-D convolution weights in ``channels_last_3d`` (NDHWC),
  so cuDNN runs its convolutions in the layout its tensor-core kernels take instead of
  transposing around each (the decode is a third of a sparse 4-step 480p clip): measured on
  an H200, the decode 7-9 % faster, the clip 1.5-1.8 %, under the 2 % rule: off;
* ``vae_compile``: ``torch.compile`` of the VAE's decoder (each latent frame's call; three
  graphs a size: the first frame, the second, the rest), so inductor fuses the norms, SiLUs,
  causal-padding copies and residual adds around cuDNN's convolutions
  (`gpubake.provisioning.vae_decode`: two workarounds keep the decoder in those graphs on
  torch 2.10/2.11): on an H200 the decode 1.49x / 1.44x faster at 480p / 720p, a 4-step clip
  1.11x / 1.08x, for ~55-77 s of compile per clip size: off (the first clip of each size, the
  boot's among them, would pay it); a long-running service's lever;
* ``vae_conv_pad``: the decoder's 96-filter causal convolutions (full resolution, the decode's
  largest cost) run with zero filters up to 128 in NDHWC, so cuDNN picks its wide-tile kernel
  (1.65x a call on an H200), the real filters sliced back out: the eager decode 10 % faster;
  on for Hopper, where it was measured;
* ``vae_fused_norm``: the decoder's residual blocks run each RMS norm and the SiLU after it as
  one Triton pass (`gpubake.kernels.vae_norm`, diffusers' bf16 arithmetic up to the sum of
  squares' order: within two bf16 ulps on a few values, CPU-tested) instead of six to eight
  passes of eager torch: for the eager decode what the compiled decoder gets from inductor,
  without its compile; on an H200 (2026-12-03) the eager padded decode 11 % / 9.5 % faster at
  480p / 720p (1.647 -> 1.465 s, 3.759 -> 3.402 s), a 4-step clip 1.4 %: on for Hopper;
* ``expert_offload``: only the A14B expert that denoises sits on the GPU, the other in
  (pinned) host memory, swapped by a forward pre-hook (`provisioning.expert_offload`): ~7.8
  GiB less resident for two host-to-device copies a clip; on for cards under 28 GiB, where
  it was measured (H200 capped to 23.5 GiB: 16.5 / 20.3 GiB reserved with the context at
  480p / 720p);
* ``parallel``: one clip across the GPUs of a torch.distributed group (one process per
  GPU): ``none``, ``ulysses:N`` or ``ring:N``, diffusers' context parallelism
  (`gpubake.provisioning.parallel`); set from the group's size and the clip's tokens. The
  8-bit attention kernels do not run inside it: with it on, self-attention is BF16 and
  the plan's ``notes`` say so.
* ``step_cache``: ``none``, ``fbc:THRESHOLD`` (diffusers' First Block Cache on each expert: a
  forward whose first block changed little since the previous step skips the others) or
  ``mag:THRESHOLD[:K[:RETENTION]]`` (MagCache: whole forwards skipped on the schedule a
  calibrated ratio table fixes in advance), `gpubake.provisioning.step_cache`. Approximations,
  off until measured (issue 18).

A plan is data, so a new measurement changes a table entry, not code.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from gpubake.errors import GpubakeError
from gpubake.kernels import archs
from gpubake.kernels.backends import BACKENDS, backend_name_for, capability, get_backend, resolve_device
from gpubake.provisioning.models import experts_of
from gpubake.provisioning.vae_decode import (  # noqa: F401 (the plan's VAE levers, bench/clip_variants.py's too)
    set_vae_compile, set_vae_conv_padding, set_vae_fused_norm, set_vae_layout)

ATTENTION_CHOICES = ("default", "cudnn", "flash", "sage-int8", "cudnn-fp8", "fa3-fp8", "sparse-flex")
SPARSE_KEEP = 0.1  # sparse-flex's default keep ratio: LightX2V's 90 % sparsity (kernels.attention_sparse)
SPARSE_BLOCK_Q = 64  # sparse-flex's default query block: LightX2V's on sm_90 (attention_sparse.BLOCK_Q)
# self-attention kernels that are no context-parallel backend: the 8-bit ones
# (kernels.attention.LOWP_KERNELS, checked equal by a test) and the sparse one
NOT_CONTEXT_PARALLEL = ("sage-int8", "cudnn-fp8", "fa3-fp8", "sparse-flex")
# "shrink": NVFP4 weight-only linears, BF16 `wo`, host-memory embedding (provisioning.text_encoder)
TEXT_ENCODER_CHOICES = ("keep", "shrink")

# Linears whose input is the (constant, 512-token) text context, not the video tokens.
SMALL_M_LAYERS = re.compile(r"(^|\.)attn2\.(to_k|to_v|add_k_proj|add_v_proj)$")


class RuntimePlanError(GpubakeError):
    """A runtime plan names a lever value that does not exist."""


@dataclass(frozen=True)
class RuntimePlan:
    """What the denoising loop turns on for one GPU architecture."""

    arch: str
    gemm_backend: str
    attention: str = "default"
    cfg_batch: bool = False
    cache_small_m: bool = False
    compile_blocks: bool = False
    fuse_qkv: bool = False  # self-attention's Q, K, V as one GEMM (one activation quantization); no gain on an H200
    fuse_act_quant: bool = False
    fuse_qk_rope: bool = False  # self-attention's Q/K RMS norm + RoPE as one Triton pass (`kernels.qk_norm_rope`)
    fuse_ffn_gelu: bool = False  # the FFN's GELU inside the down-projection's activation quantization; slower (H200)
    fuse_norm_quant: bool = False  # the norms hand their linears FP8 rows (`kernels.norm_quant`); not measured
    text_encoder: str = "keep"
    vae_tiling: bool = False
    vae_channels_last: bool = False  # the VAE's conv weights NDHWC (cuDNN's tensor-core layout); < 2 % a clip
    vae_compile: bool = False  # torch.compile of the VAE's decoder: 1.08-1.11x a 4-step clip, ~60 s compile a size: off
    vae_conv_pad: bool = False  # the decoder's 96-filter convs padded to 128 (cuDNN's wide tile); Hopper
    vae_fused_norm: bool = False  # the decoder's RMS norm + SiLU as one Triton pass (eager); Hopper
    expert_offload: bool = False  # one A14B expert on the GPU at a time (`expert_offload`); cards < 28 GiB
    parallel: str = "none"  # none | ring:N | ulysses:N (`parallel.Parallel`)
    sparse_keep: float = SPARSE_KEEP  # attention=sparse-flex: fraction of key blocks kept, in (0, 1]
    sparse_block_q: int = SPARSE_BLOCK_Q  # attention=sparse-flex: query-block tokens (64: LightX2V's; 128)
    step_cache: str = "none"  # none | fbc:THRESHOLD | mag:THRESHOLD[:K[:RETENTION]] (`step_cache.StepCache`)
    notes: str = ""  # why a lever differs from the architecture's table ("; "-joined; not a lever)

    def __post_init__(self) -> None:
        from gpubake.provisioning.parallel import Parallel, ParallelError

        try:
            par = Parallel.parse(self.parallel)
        except ParallelError as exc:
            raise RuntimePlanError(f"runtime plan {self.arch}: {exc}") from None
        if par.on and self.attention in NOT_CONTEXT_PARALLEL:
            raise RuntimePlanError(
                f"runtime plan {self.arch}: attention={self.attention} cannot run with parallel={par}: the 8-bit "
                "and sparse kernels are not context-parallel backends (use attention=default, cudnn or flash)")
        keep = self.sparse_keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise RuntimePlanError(f"runtime plan {self.arch}: sparse_keep={self.sparse_keep!r} is not a number in (0, 1]")
        if self.sparse_keep != SPARSE_KEEP and self.attention != "sparse-flex":
            raise RuntimePlanError(f"runtime plan {self.arch}: sparse_keep={self.sparse_keep} needs "
                                   f"attention=sparse-flex (attention={self.attention})")
        from gpubake.kernels.attention_sparse import BLOCKS_Q

        bq = self.sparse_block_q
        if isinstance(bq, bool) or bq not in BLOCKS_Q:
            raise RuntimePlanError(f"runtime plan {self.arch}: sparse_block_q={bq!r} is not one of "
                                   f"{', '.join(map(str, BLOCKS_Q))}")
        if bq != SPARSE_BLOCK_Q and self.attention != "sparse-flex":
            raise RuntimePlanError(f"runtime plan {self.arch}: sparse_block_q={bq} needs "
                                   f"attention=sparse-flex (attention={self.attention})")
        if self.attention not in ATTENTION_CHOICES:
            raise RuntimePlanError(
                f"runtime plan {self.arch}: attention={self.attention!r} (one of {', '.join(ATTENTION_CHOICES)})")
        if self.text_encoder not in TEXT_ENCODER_CHOICES:
            raise RuntimePlanError(f"runtime plan {self.arch}: text_encoder={self.text_encoder!r} "
                                   f"(one of {', '.join(TEXT_ENCODER_CHOICES)})")
        self._check_step_cache(par.on)

    def _check_step_cache(self, parallel: bool) -> None:
        from gpubake.provisioning.step_cache import StepCache, StepCacheError

        try:
            cache = StepCache.parse(self.step_cache)
        except StepCacheError as exc:
            raise RuntimePlanError(f"runtime plan {self.arch}: {exc}") from None
        if cache.on and parallel:
            why = ("the skip decision is per rank" if cache.kind == "fbc"  # each decides from its own shard
                   else "a skipped forward bypasses the split at the first block")
            raise RuntimePlanError(f"runtime plan {self.arch}: step_cache={cache} cannot run with "
                                   f"parallel={self.parallel} ({why})")

    def with_(self, **changes) -> "RuntimePlan":
        return replace(self, **changes)


# Levers that won when measured (docs/benchmarks.md, issue 7; a lever wins at >= 2 %
# faster with the same output), by architecture family (`kernels.archs`). Families
# without a measurement get the plain plan:
# the GEMM backend and nothing else. Hopper, H100, 480x832x81: regional compile 1.22x
# over plain NVFP4 (27 s compile once per process and shape); torch's default SDPA is
# already cuDNN there; CFG batching, cached FP8 K/V weights and inductor-fused activation
# quantization each changed the step by < 1 %. Session 9: cuDNN's FP8 SDPA for the
# self-attention, 1.21x on top of compile (4.91 -> 4.07 s a CFG step, error vs BF16
# unchanged at 0.049); SageAttention-1 (Triton) is slower than cuDNN BF16 on Hopper.
# Session 10: FlashAttention-3's FP8 forward (the fa3-fwd wheel), 1.14x over cuDNN FP8
# per call: 3.87 s a CFG step at 480p, 14.92 s at 720p (cuDNN FP8: 4.07 / 16.19).
# The attention kernels by preference are a column of the architecture table
# (`archs.Arch.attention`): the first whose wheel imports and that passes its boot check on
# this GPU (`attention_check`) is used.
# 2026-12-01 (H200): the VAE decoder's 96-filter convolutions padded to 128 filters, 10.3 % off
# the eager decode at 480p and 720p (0.19 / 0.43 s: 2.9 / 2.5 % of a 4-step clip).
# 2026-12-03 (H200): the decoder's RMS norm + SiLU as one Triton pass on top of the padding,
# 11 % / 9.5 % off the eager decode (0.18 / 0.36 s), 1.4 % of a 4-step 480p clip; kept with
# the padding as one decode plan. Q/K/V as one GEMM (`fuse_qkv`): 1.848 against 1.843 s a
# step, no gain: off.
# 2026-12-03 (H200, `bench/profile_forward.py`, 4 full-size blocks): the Q/K norm + RoPE as one
# Triton pass (`fuse_qk_rope`), a forward 1.9 % faster at 720p (sparse 128-token blocks), 2.4 %
# at 480p (sparse 64), 2.0 % at 480p (dense FA3 FP8): on, and closer to diffusers' eager
# arithmetic than inductor's kernel it replaces (99.999 % of the values bit-equal against 71 %).
_MEASURED: dict[str, dict] = {
    "hopper": {"compile_blocks": True, "vae_conv_pad": True, "vae_fused_norm": True, "fuse_qk_rope": True},
}
# Memory levers, by the card's memory rather than its architecture (they change where
# weights live, not kernels). Measured on the H100 at 480x832x81 (docs/benchmarks.md):
# both NVFP4 experts + the encoder as loaded + VAE = 28.2 GiB resident, ~40 GiB at the
# VAE decode; shrunk encoder + tiled decode: 23.5 GiB peak. They cost fidelity (the
# encoder's FP8 weights) and decode time (tiles), so cards with room keep the full model.
SMALL_CARD_GIB = 44
_SMALL_CARD = {"text_encoder": "shrink", "vae_tiling": True}
# Under 28 GiB (a 24 GB card) that is not enough: one expert on the GPU at a time as well.
# Measured on an H200 capped to 23.5 GiB (2026-12-01): 16.5 GiB reserved + context at 480p,
# 20.3 at 720p, against an out-of-memory without it.
OFFLOAD_CARD_GIB = 28
_OFFLOAD_CARD = {"expert_offload": True}


def _cp_note(attention: tuple[str, ...], par: str) -> str:
    kind = "sparse" if attention == ("sparse-flex",) else "8-bit"
    return (f"{kind} attention ({', '.join(attention)}) off: parallel={par} runs self-attention through "
            f"diffusers' context-parallel attention, which the {kind} kernels are not (BF16 instead)")


def plan_for(device: torch.device | str | None = None, *, gemm_backend: str | None = None,
             world_size: int | None = None, heads: int | None = None, clip_tokens: int | None = None) -> RuntimePlan:
    """The runtime plan for `device`, by compute capability (the `archs` table, as the kernels).

    `gemm_backend` None: the backend this device runs, ``$GPUBAKE_NVFP4_BACKEND`` or the
    architecture's default (`backends.backend_name_for`; a KernelError if it cannot run here).
    `world_size` (default: the torch.distributed group's, 1 without one), `heads` and
    `clip_tokens` choose the ``parallel`` lever (`parallel.parallel_for`)."""
    from gpubake.provisioning.parallel import parallel_for
    from gpubake.provisioning.parallel import world_size as group_size

    dev = resolve_device(device)
    cap = capability(dev)
    arch = archs.arch_for(cap)
    memory = torch.cuda.get_device_properties(dev).total_memory if cap is not None else None
    small = memory is not None and memory < SMALL_CARD_GIB * 2**30
    offload = memory is not None and memory < OFFLOAD_CARD_GIB * 2**30
    levers = {**(_SMALL_CARD if small else {}), **(_OFFLOAD_CARD if offload else {}), **_MEASURED.get(arch.family, {})}
    par, _ = parallel_for(group_size() if world_size is None else world_size, heads=heads, tokens=clip_tokens)
    if par.on:
        levers["parallel"] = str(par)
        if arch.attention:
            levers["notes"] = _cp_note(arch.attention, str(par))
    elif arch.attention:
        # a kernel whose wheel is missing or that disagrees with its reference on this GPU:
        # the next one, then BF16 attention; the report shows the checks (`attention_checks`)
        levers["attention"] = next((k for k in arch.attention if attention_check(k, dev)["ok"]), "default")
    for lever, (_, what, _) in FUSED_KERNELS.items():  # Triton passes this GPU may compile differently
        if levers.get(lever) and cap is not None and not (check := fused_check(lever, dev))["ok"]:
            levers[lever] = False
            levers["notes"] = "; ".join(filter(None, (levers.get("notes", ""), f"{lever} off: {what} disagrees with "
                                                      f"its reference on this GPU ({check.get('reason')})")))
    backend = gemm_backend if gemm_backend is not None else backend_name_for(cap, dev)
    return RuntimePlan(arch=arch.family, gemm_backend=backend, **levers)


# fusion levers that run a Triton pass of gpubake's: the plan checks each on the GPU before it takes
# the lever: lever -> (the check's kernel name in the report, what the pass is, its check in
# `kernels.selfcheck`)
FUSED_KERNELS = {
    "fuse_qk_rope": ("qk-norm-rope", "the fused Q/K norm + RoPE", "qk_norm_rope_selfcheck"),
    "vae_fused_norm": ("vae-rms-norm-silu", "the VAE's fused RMS norm + SiLU", "vae_norm_selfcheck"),
    "fuse_ffn_gelu": ("ffn-gelu-fp8-quant", "the FFN's GELU inside the FP8 quantization", "ffn_gelu_quant_selfcheck"),
    "fuse_norm_quant": ("layer-norm-fp8", "the norms' fused FP8 quantization", "norm_quant_selfcheck"),
}


def fused_selfcheck(lever: str, dev: torch.device | str) -> dict:
    """Run the GPU check of fusion `lever`'s Triton pass (JSON-ready, never raises)."""
    from gpubake.kernels import selfcheck

    return getattr(selfcheck, FUSED_KERNELS[lever][2])(dev)


def fused_check(lever: str, dev: torch.device) -> dict:
    """Whether the Triton pass of fusion `lever` may run on `dev`, once per process and device;
    kept with the attention checks (`attention_checks`), so the report shows it."""
    kernel = FUSED_KERNELS[lever][0]
    key = (kernel, str(dev))
    if key not in _ATTENTION_CHECKS:
        _ATTENTION_CHECKS[key] = {**fused_selfcheck(lever, dev), "kernel": kernel, "device": str(dev),
                                  "installed": True, "lever": lever}
    return _ATTENTION_CHECKS[key]


_ATTENTION_CHECKS: dict[tuple[str, str], dict] = {}


def _attention_selfcheck(kernel: str, dev: torch.device) -> dict:
    from gpubake.kernels.selfcheck import attention_selfcheck

    return attention_selfcheck(kernel, dev)


def attention_check(kernel: str, dev: torch.device) -> dict:
    """Whether 8-bit attention `kernel` may run on `dev`: its wheel imports and, on a GPU, its
    error against exact attention is within 2x its torch reference's there
    (`kernels.selfcheck.attention_selfcheck`). Once per process and device."""
    key = (kernel, str(dev))
    if key not in _ATTENTION_CHECKS:
        from gpubake.kernels.attention import kernel_available

        base = {"kernel": kernel, "device": str(dev), "installed": kernel_available(kernel)}
        if not base["installed"]:
            _ATTENTION_CHECKS[key] = {**base, "ok": False, "reason": "wheel not installed"}
        elif dev.type != "cuda":  # the CPU runs the reference itself: nothing to compare
            _ATTENTION_CHECKS[key] = {**base, "ok": True}
        else:
            _ATTENTION_CHECKS[key] = {**_attention_selfcheck(kernel, dev), **base}
    return _ATTENTION_CHECKS[key]


def attention_checks(device: torch.device | str) -> list[dict]:
    """The attention checks `plan_for` ran for `device`, in the order it tried them."""
    return [c for (_, d), c in _ATTENTION_CHECKS.items() if d == str(torch.device(device))]


ENV_VAR = "GPUBAKE_RUNTIME"
_BOOL = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


def plan_from_env(device: torch.device | str | None = None, value: str | None = None, *,
                  gemm_backend: str | None = None, world_size: int | None = None,
                  model_levers: dict[str, str] | None = None, model_id: str | None = None) -> RuntimePlan:
    """The plan the serving image runs: `plan_for(device)`, changed by the model's own levers
    for this architecture family (`model_levers`: family -> levers, the registry's ``runtime``
    of `model_id`), then by ``$GPUBAKE_RUNTIME``.

    ``auto`` (or unset): the measured plan of this architecture with the model's levers;
    ``plain``: no lever, only the kernels' GEMM backend; else comma-separated overrides such
    as ``compile_blocks=0,attention=cudnn`` (booleans 1/0/true/false/on/off). A bad value is a
    one-line error naming the variable, before any weight is loaded. `gemm_backend`,
    `world_size`: as `plan_for`'s."""
    from gpubake import envs

    raw = (envs.GPUBAKE_RUNTIME if value is None else value).strip()
    base = plan_for(device, gemm_backend=gemm_backend, world_size=world_size)
    if raw == "plain":
        return RuntimePlan(arch=base.arch, gemm_backend=base.gemm_backend)
    levers = (model_levers or {}).get(base.arch, "")
    if levers.strip():
        base = _model_plan(base, levers, model_id, device)
    if raw in ("", "auto"):
        return base
    return _changed(base, raw, ENV_VAR, device)


def _model_plan(base: RuntimePlan, levers: str, model_id: str | None, device) -> RuntimePlan:
    """`base` with a model's own levers, except an attention kernel that cannot run inside the
    plan's context parallelism: that one stays the plan's, and the notes say why."""
    where = f"model {model_id or '?'} runtime"
    changes = parse_levers(levers, base, where)
    if base.parallel != "none" and changes.get("attention") in NOT_CONTEXT_PARALLEL:
        dropped = changes.pop("attention")
        changes.pop("sparse_keep", None)
        changes.pop("sparse_block_q", None)
        changes["notes"] = "; ".join(filter(None, (base.notes, f"{where}: {_cp_note((dropped,), base.parallel)}")))
    return _with_changes(base, changes, f"{where}={levers!r}", device)


def parse_levers(raw: str, base: RuntimePlan, where: str) -> dict:
    """``LEVER=VALUE,...`` as changes to `base`'s fields (values typed as the field is); a bad
    item is a one-line `RuntimePlanError` naming `where`."""
    fields = {f for f in RuntimePlan.__dataclass_fields__ if f not in ("arch", "gemm_backend", "notes")}
    changes: dict = {}
    for item in raw.split(","):
        key, sep, val = (x.strip() for x in item.partition("="))
        if not sep or key not in fields:
            raise RuntimePlanError(f"{where}={raw!r}: {item.strip()!r} is not LEVER=VALUE with LEVER one of "
                                   f"{', '.join(sorted(fields))} (or use auto / plain)")
        if isinstance(getattr(base, key), str):  # attention, text_encoder, parallel: the plan checks the value
            changes[key] = val
        elif isinstance(getattr(base, key), float):  # sparse_keep: the plan checks the range
            try:
                changes[key] = float(val)
            except ValueError:
                raise RuntimePlanError(f"{where}={raw!r}: {key}={val!r} is not a number") from None
        elif type(getattr(base, key)) is int:  # sparse_block_q: the plan checks the value
            try:
                changes[key] = int(val)
            except ValueError:
                raise RuntimePlanError(f"{where}={raw!r}: {key}={val!r} is not a whole number") from None
        elif val.lower() in _BOOL:
            changes[key] = _BOOL[val.lower()]
        else:
            raise RuntimePlanError(f"{where}={raw!r}: {key}={val!r} is not a boolean (1/0/true/false/on/off)")
    return changes


def _changed(base: RuntimePlan, raw: str, where: str, device) -> RuntimePlan:
    """`base` changed by ``$GPUBAKE_RUNTIME``-style overrides `raw`."""
    changes = parse_levers(raw, base, where)
    if (changes.get("parallel", "none") != "none" and "attention" not in changes
            and base.attention in NOT_CONTEXT_PARALLEL):
        # asked for one clip across GPUs, not for an attention kernel: the plan's 8-bit one (or
        # a model's sparse one) cannot run inside it, so BF16, and the report says why
        changes["attention"] = "default"
        changes["notes"] = "; ".join(filter(None, (base.notes, _cp_note((base.attention,), changes["parallel"]))))
    return _with_changes(base, changes, f"{where}={raw!r}", device)


def _with_changes(base: RuntimePlan, changes: dict, where: str, device) -> RuntimePlan:
    """`base.with_(**changes)`, checked; an 8-bit attention kernel asked for by name gets its
    boot check on a GPU."""
    from gpubake.kernels.attention import LOWP_KERNELS

    if changes.get("attention", "sparse-flex") != "sparse-flex":  # another kernel replaces a model's sparse one
        changes.setdefault("sparse_keep", SPARSE_KEEP)
        changes.setdefault("sparse_block_q", SPARSE_BLOCK_Q)
    try:
        plan = base.with_(**changes)
    except RuntimePlanError as exc:
        raise RuntimePlanError(f"{where}: {exc}") from None
    dev = resolve_device(device)
    if "attention" in changes and plan.attention in LOWP_KERNELS and dev.type == "cuda":
        # an 8-bit kernel asked for by name gets the same boot check as the plan's own choice:
        # a missing wheel or a kernel built for another GPU is bad input, not a crash mid-render
        check = attention_check(plan.attention, dev)
        if not check["ok"]:
            raise RuntimePlanError(f"{where}: attention={plan.attention} cannot run on "
                                   f"{dev}: {check.get('reason', 'failed its check')}")
    return plan


def small_m_layers(model: nn.Module) -> list[str]:
    """Names of the NVFP4 linears that only ever see the text context."""
    from gpubake.kernels.linear import NVFP4Linear

    return [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear) and SMALL_M_LAYERS.search(n)]


def apply_plan(model: nn.Module, plan: RuntimePlan) -> dict:
    """Apply the model-side levers of `plan` in place; returns what was done."""
    names = small_m_layers(model)
    for n in names:
        model.get_submodule(n).set_keep_runtime_weight(plan.cache_small_m)
    done = {"cached_small_m_layers": len(names) if plan.cache_small_m else 0, "compiled_blocks": 0,
            **apply_attention(model, plan)}
    if plan.gemm_backend in BACKENDS:  # (a BF16 model's plan may name none)
        from gpubake.kernels.linear import bind_backends

        backend = get_backend(plan.gemm_backend)
        bind_backends(model, backend)  # once, here: the layers' forwards choose nothing
        if hasattr(backend, "fuse_act_quant_when_compiling"):
            backend.fuse_act_quant_when_compiling = plan.fuse_act_quant
    done["fused_qkv_modules"] = set_fused_qkv(model, plan.fuse_qkv)
    done["fused_qk_rope_modules"] = set_fused_qk_rope(model, plan.fuse_qk_rope)
    done["fused_ffn_gelu_modules"] = set_fused_ffn_gelu(model, plan.fuse_ffn_gelu)
    done["fused_norm_quant_blocks"] = set_fused_norm_quant(model, plan.fuse_norm_quant)  # after the bindings
    blocks = [m for m in model.modules() if type(m).__name__ in getattr(model, "_repeated_blocks", ())]
    if plan.compile_blocks:
        if not blocks:
            raise RuntimePlanError(f"compile_blocks: {type(model).__name__} declares no _repeated_blocks")
        import torch._dynamo

        # one static graph per clip shape, shared by the blocks: a service sees several
        # (resolution x frames); past the default limit of 8 dynamo would run them eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for b in blocks:
            # regional: dynamo compiles the shared forward once per guard set. dynamic=False:
            # a second resolution gets its own static graph instead of torch's automatic
            # switch to dynamic shapes, whose kernels were slower at 720p (docs/benchmarks.md)
            b.compile(dynamic=False)
        done["compiled_blocks"] = len(blocks)
    else:
        for b in blocks:
            b._compiled_call_impl = None  # what nn.Module.compile set: back to eager
    return done


def bind_fp8(experts: dict[str, nn.Module], device: torch.device | str,
             fuse_act_quant: bool = False) -> dict[str, int]:
    """Bind the FP8-weight path `device` runs (``$GPUBAKE_FP8_BACKEND``, else the arch table's
    `fp8_backend`), chosen once here, to every `FP8Linear` of the experts; {expert: layers},
    only for experts that have any (an NVFP4 or BF16 checkpoint: {} and nothing chosen).
    `fuse_act_quant`: the plan's lever, for a path that quantizes activations."""
    from gpubake.kernels.fp8_linear import FP8Linear, bind_fp8_backends, get_fp8_backend, select_fp8_backend

    if not any(isinstance(m, FP8Linear) for e in experts.values() for m in e.modules()):
        return {}
    backend = get_fp8_backend(select_fp8_backend(device))
    if hasattr(backend, "fuse_act_quant_when_compiling"):
        backend.fuse_act_quant_when_compiling = fuse_act_quant
    return {n: bind_fp8_backends(m, backend) for n, m in experts.items()}


def set_fused_qkv(model: nn.Module, on: bool) -> int:
    """Each self-attention whose to_q, to_k and to_v are NVFP4 gets them as one projection
    (`kernels.linear.FusedNVFP4Projection`, diffusers' ``to_qkv`` with ``fused_projections``,
    which its Wan attention processor reads); off: back to three. The weights and the state
    dict stay the parts'. Returns how many attention modules are fused. FP8-weight
    projections (`kernels.fp8_linear.FP8Linear`) are not fused yet: such an attention is left
    as three GEMMs and not counted (fusing them is one scaled-mm over the rows side by side,
    the per-row scales concatenated; not built in this slice)."""
    from gpubake.kernels.linear import FusedNVFP4Projection, NVFP4Linear

    n = 0
    for attn in model.modules():
        parts = [getattr(attn, a, None) for a in ("to_q", "to_k", "to_v")]
        if getattr(attn, "is_cross_attention", True) or not all(isinstance(p, NVFP4Linear) for p in parts):
            continue
        fused = isinstance(getattr(attn, "to_qkv", None), FusedNVFP4Projection)
        if on and not getattr(attn, "fused_projections", False):
            attn.to_qkv = FusedNVFP4Projection(parts)
            attn.fused_projections = True
        elif not on and fused:
            del attn.to_qkv
            attn.fused_projections = False
        n += int(on)
    return n


def _skip_gelu(gate: torch.Tensor) -> torch.Tensor:
    return gate


def set_fused_ffn_gelu(model: nn.Module, on: bool) -> int:
    """Each diffusers FFN whose activation is the tanh GELU (Wan's ``gelu-approximate``) and
    whose down-projection is a quantized layer gets the GELU moved into that layer (on: its
    ``input_activation``, computed inside the activation quantization by a backend that
    `fuses_input_gelu`, else just before its GEMM), or back in the FFN (off). The weights and
    state dict do not change; returns how many FFNs run it moved."""
    from diffusers.models.activations import GELU

    from gpubake.kernels.fp8_linear import FP8Linear
    from gpubake.kernels.linear import NVFP4Linear

    n = 0
    for ff in model.modules():
        net = getattr(ff, "net", None)
        if type(ff).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) < 3:
            continue
        act, down = net[0], net[2]
        if type(act) is not GELU or act.approximate != "tanh" or not isinstance(down, (NVFP4Linear, FP8Linear)):
            continue
        if on:
            act.gelu = _skip_gelu  # an instance attribute over GELU.gelu: the module projects only
            down.input_activation = "gelu_tanh"
        else:
            act.__dict__.pop("gelu", None)
            down.input_activation = None
        n += int(on)
    return n


def _check_triton_device(model: nn.Module, lever: str) -> None:
    """A fusion lever whose pass is a Triton kernel, asked for on a model Triton cannot run on:
    a one-line `RuntimePlanError`, before any forward."""
    from gpubake.kernels.quantize_triton import interpreting

    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cuda" and not interpreting():
        raise RuntimePlanError(f"{lever}=1: the fused pass is a Triton kernel, which needs a CUDA device "
                               f"(the model is on {param.device}; TRITON_INTERPRET=1 runs it on the CPU)")


def set_fused_norm_quant(model: nn.Module, on: bool) -> int:
    """Each Wan block's norms quantizing for their linears (on: where every reader takes
    quantized rows) or diffusers' forward (off); returns how many blocks run fused. On needs a
    device Triton runs on (`_check_triton_device`)."""
    from gpubake.kernels.norm_quant import set_fused_norm_quant as set_blocks

    if on:
        _check_triton_device(model, "fuse_norm_quant")
    return set_blocks(model, on)


def set_fused_qk_rope(model: nn.Module, on: bool) -> int:
    """The self-attentions' Q/K norm and rotary embedding as one Triton pass (on) or diffusers'
    processor (off); returns how many run fused. On needs a device Triton runs on
    (`_check_triton_device`)."""
    from gpubake.kernels.qk_norm_rope import set_fused_qk_norm_rope

    if on:
        _check_triton_device(model, "fuse_qk_rope")
    return set_fused_qk_norm_rope(model, on)


def apply_attention(model: nn.Module, plan: RuntimePlan) -> dict:
    """The self-attention kernel of `plan` on every block of `model` (torch SDPA for the
    plan's dense choices); returns what was done."""
    from gpubake.kernels.attention import LOWP_KERNELS, set_self_attention_kernel

    lowp = plan.attention if plan.attention in LOWP_KERNELS else None
    n = set_self_attention_kernel(model, lowp)  # None: back to torch SDPA
    done = {"lowp_attention_modules": n if lowp else 0}
    if plan.attention == "sparse-flex":
        from gpubake.kernels.attention_sparse import set_sparse_self_attention

        done["sparse_attention_modules"] = set_sparse_self_attention(model, plan.sparse_keep, plan.sparse_block_q)
    return done


@contextlib.contextmanager
def attention_context(plan: RuntimePlan) -> Iterator[None]:
    """SDPA kernel choice of `plan` for the code inside (diffusers calls torch SDPA)."""
    if plan.attention not in ("cudnn", "flash"):  # the 8-bit kernels are set on the model (apply_plan)
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[plan.attention]
    with sdpa_kernel([backend]):
        yield


def cfg_forward(model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise predictions (conditional, unconditional) of one guided step.

    Batched: one forward of batch 2 (latents repeated, the two text contexts stacked),
    which halves the launches and feeds the GEMMs twice the rows; needs the two text
    contexts padded to the same length (Wan pads to 512) and twice the activations."""
    if cond.shape != uncond.shape:
        raise RuntimePlanError(
            f"cfg_forward: text contexts differ in shape {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    kw = {"return_dict": False}
    if batched:
        n = latents.shape[0]
        out = model(hidden_states=torch.cat([latents, latents]), timestep=torch.cat([timestep, timestep]),
                    encoder_hidden_states=torch.cat([cond, uncond]), **kw)[0]
        return out[:n], out[n:]
    c = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond, **kw)[0]
    u = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=uncond, **kw)[0]
    return c, u


def apply_runtime(pipe, plan: RuntimePlan | None = None, *, clip_tokens: int | None = None,
                  device: torch.device | str | None = None) -> dict:
    """Apply `plan` (default: `plan_for` the pipeline's device) to every expert of a
    loaded Wan pipeline (`transformer`, and `transformer_2` for A14B); returns, per expert,
    what was done. Meant for the serving image right after `load_pipeline`: diffusers'
    pipeline loop runs the two CFG passes itself, so only the model-side levers apply.
    With ``parallel`` on, each expert is split across the process group
    (`parallel.enable_context_parallel`; `clip_tokens`: the one clip size it will render,
    None for any) and ``done["parallel"]`` says how, with the plan's notes. `device`: where
    the pipeline runs (default: its first expert's device; give it when the experts wait in
    host memory for ``expert_offload``)."""
    experts = experts_of(pipe)
    if not experts:
        raise RuntimePlanError(f"apply_runtime: {type(pipe).__name__} has no transformer")
    device = torch.device(device) if device is not None else next(next(iter(experts.values())).parameters()).device
    if plan is None:
        plan = plan_for(device)
    done = {n: apply_plan(m, plan) for n, m in experts.items()}
    for n, count in bind_fp8(experts, device, plan.fuse_act_quant).items():
        done[n]["fp8_layers"] = count
        if plan.fuse_norm_quant:  # its readers' path is bound only now
            done[n]["fused_norm_quant_blocks"] = set_fused_norm_quant(experts[n], True)
    from gpubake.provisioning.step_cache import apply_step_caches

    for n, what in apply_step_caches(pipe, plan.step_cache).items():
        done[n].update(what)
    if plan.parallel != "none":
        from gpubake.provisioning.parallel import Parallel, enable_context_parallel

        par = Parallel.parse(plan.parallel)
        split: dict[str, dict] = {}
        for n, m in experts.items():  # a module in both slots is split once
            same = next((k for k, o in experts.items() if o is m and k in split), None)
            split[n] = split[same] if same else enable_context_parallel(m, par, tokens=clip_tokens)
        first = next(iter(split.values()))
        done["parallel"] = {**first, "experts": sorted(split), "notes": [*filter(None, [plan.notes]), *first["notes"]]}
    te = getattr(pipe, "text_encoder", None)
    if plan.text_encoder == "shrink" and te is not None:
        from gpubake.provisioning.text_encoder import shrink_text_encoder

        done["text_encoder"] = shrink_text_encoder(te, device)
    elif te is not None and next(te.parameters()).device != device:
        te.to(device)  # a loader that left it on the host for shrinking
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling() if plan.vae_tiling else vae.disable_tiling()
        set_vae_layout(vae, plan.vae_channels_last)  # layouts first: a compiled graph asserts its weights' strides
        padded = set_vae_conv_padding(vae, plan.vae_conv_pad)
        fused = set_vae_fused_norm(vae, plan.vae_fused_norm)
        done["vae"] = {"tiling": int(plan.vae_tiling), "channels_last": int(plan.vae_channels_last),
                       "conv_pad": int(plan.vae_conv_pad and padded > 0),
                       "fused_norm": int(plan.vae_fused_norm and fused > 0),
                       "compiled_decoder": int(set_vae_compile(vae, plan.vae_compile))}
    from gpubake.provisioning.expert_offload import apply_expert_offload

    offload = apply_expert_offload(pipe, plan.expert_offload, device)
    if offload:
        done["experts"] = offload
    return done

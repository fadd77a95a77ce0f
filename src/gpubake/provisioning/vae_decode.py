"""The Wan VAE decoder's speed levers: its convolutions' layout and a compiled decoder.

The decode is a third of a sparse 4-step 480p clip (docs/benchmarks.md), and diffusers runs
it as 21 calls of the decoder, one a latent frame, each reading and refilling a causal cache
(`feat_cache`, a list of the last frames each causal convolution saw). Two things stop
`torch.compile` from keeping that decoder in a few graphs, and this module works around both:

* diffusers' ``WanResample.forward`` (the two temporal upsamplers) marks a first chunk with the
  string ``"Rep"`` in the cache and compares each entry with it: ``tensor == "Rep"``. torch 2.10
  and 2.11 (the GPU images') cannot trace that comparison, break the graph inside the frame loop,
  and fall back to compiling each convolution on its own, shape by shape, past dynamo's cache
  limit (an H200 decode compiled 18 frames, then 15 more in the next decode). The compiled
  decoder's upsamplers run `traceable_upsample3d_forward` instead: the same arithmetic, with the
  marker tested by its type (the CPU test checks the two forwards give bit-identical videos).
* a compiled graph may leave views or another layout in the cache, and a cache entry's strides
  are guarded, so the cache is made dense before each call (`_dense_cache`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

CACHE_T = 2  # frames each causal convolution keeps (diffusers' CACHE_T)
REP = "Rep"  # diffusers' marker of an upsampler that saw only the first chunk


def set_vae_layout(vae: nn.Module, channels_last: bool) -> int:
    """The VAE's 3-D convolution weights in ``channels_last_3d`` (or back to contiguous); its
    Conv2d weights are 4-D and stay. Returns how many weights. Set it before `set_vae_compile`:
    a compiled graph asserts its weights' strides."""
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    convs = [m for m in vae.modules() if isinstance(m, nn.Conv3d)]
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    return len(convs)


def set_vae_compile(vae: nn.Module, on: bool) -> bool:
    """The VAE's decoder compiled (its module, keys and weights stay as they are) or back to
    eager; returns whether it is compiled. `dynamic=False`: a clip size decodes in a few fixed
    shapes (the first latent frame, the second, the rest), each its own graph, rather than
    dynamic-shape code; dynamo's cache limit is raised so that several sizes stay compiled."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        return False
    upsamplers = [m for m in decoder.modules() if getattr(m, "mode", None) == "upsample3d" and hasattr(m, "time_conv")]
    if on and getattr(decoder, "_compiled_call_impl", None) is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for m in upsamplers:
            m.forward = types.MethodType(traceable_upsample3d_forward, m)
        decoder._compiled_call_impl = _dense_cache(torch.compile(decoder._call_impl, dynamic=False))
    elif not on:
        decoder._compiled_call_impl = None  # nn.Module's hook for a compiled call: eager again
        for m in upsamplers:
            m.__dict__.pop("forward", None)  # the class's (diffusers') forward again
    return on


PAD_TO = 128  # cuDNN's wide tile on sm_90: 96-filter convolutions take a narrow-tile kernel
PAD_MIN_FILTERS = 96  # pad only where the extra work is at most a third (not the 3-filter output conv)


def set_vae_conv_padding(vae: nn.Module, on: bool) -> int:
    """The decoder's causal Conv3d with 96 to 127 filters (the Wan VAE's 96-filter convolutions
    at full resolution, the decode's largest cost) run with zero filters added up to 128, in
    ``channels_last_3d``, and the real filters sliced back out: the same outputs (the added
    filters are never read) from cuDNN's wide-tile kernel (H200: 2.36 against 3.90 ms a call,
    bench/bench_vae_conv.py). diffusers' causal padding and cache stay its own: only the
    convolution (`nn.Conv3d._conv_forward`) is replaced. The padded weight is a non-persistent
    buffer (the state dict is unchanged). Returns how many convs."""
    decoder = getattr(vae, "decoder", None)
    n = 0
    for m in (decoder.modules() if decoder is not None else ()):
        if not (isinstance(m, nn.Conv3d) and hasattr(m, "_padding")) or m.groups != 1 \
                or not PAD_MIN_FILTERS <= m.out_channels < PAD_TO:
            continue
        if on:
            extra = PAD_TO - m.out_channels
            w = m.weight.detach()
            wpad = torch.cat([w, w.new_zeros(extra, *w.shape[1:])]).contiguous(memory_format=torch.channels_last_3d)
            bpad = None if m.bias is None else torch.cat([m.bias.detach(), m.bias.new_zeros(extra)])
            m.register_buffer("_gpubake_padded_weight", wpad, persistent=False)
            m.register_buffer("_gpubake_padded_bias", bpad, persistent=False)
            m._conv_forward = types.MethodType(padded_conv_forward, m)
        else:
            m.__dict__.pop("_conv_forward", None)
            for name in ("_gpubake_padded_weight", "_gpubake_padded_bias"):
                m._buffers.pop(name, None)
        n += 1
    return n


def padded_conv_forward(self: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``nn.Conv3d._conv_forward`` with the padded filters of `set_vae_conv_padding` (diffusers'
    causal conv has padded `x` itself: its own padding is 0), the real filters sliced out."""
    import torch.nn.functional as F

    w, b = self._gpubake_padded_weight, self._gpubake_padded_bias
    return F.conv3d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), self.stride, self.padding,
                    self.dilation, self.groups)[:, :self.out_channels]


def set_vae_fused_norm(vae: nn.Module, on: bool) -> int:
    """Each residual block of the decoder runs its two RMS norms with the SiLU after them as one
    Triton pass (`kernels.vae_norm`): the norms' forward does both, the block's SiLU becomes an
    identity (no weights change; the state dict is the same). Eager only: under torch.compile
    the norms run diffusers' arithmetic for inductor to fuse. Returns how many blocks."""
    decoder = getattr(vae, "decoder", None)
    blocks = [m for m in (decoder.modules() if decoder is not None else ())
              if all(hasattr(m, a) for a in ("norm1", "norm2", "nonlinearity", "conv1", "conv2"))
              and all(_plain_norm(n) for n in (m.norm1, m.norm2))
              and (isinstance(m.nonlinearity, nn.SiLU) or _fused(m.norm1))]
    for block in blocks:
        if on and not _fused(block.norm1):
            for norm in (block.norm1, block.norm2):
                norm.forward = types.MethodType(fused_norm_silu_forward, norm)
            block.nonlinearity = nn.Identity()
        elif not on and _fused(block.norm1):
            block.nonlinearity = nn.SiLU()  # what diffusers' get_activation("silu") builds (no state)
            for norm in (block.norm1, block.norm2):
                norm.__dict__.pop("forward", None)
    return len(blocks)


def _fused(norm: Any) -> bool:
    """Whether `set_vae_fused_norm` put its forward on `norm`."""
    return getattr(norm.__dict__.get("forward"), "__func__", None) is fused_norm_silu_forward


def _plain_norm(norm: Any) -> bool:
    """A ``WanRMS_norm`` the kernel computes: channels first, no bias (the residual blocks')."""
    return getattr(norm, "channel_first", False) and isinstance(getattr(norm, "bias", None), float) \
        and norm.bias == 0.0 and isinstance(getattr(norm, "gamma", None), torch.Tensor)


def fused_norm_silu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """A residual block's ``WanRMS_norm`` (channels first, no bias) and the SiLU after it."""
    from gpubake.kernels import vae_norm
    from gpubake.kernels.quantize_triton import interpreting

    if torch.compiler.is_compiling() or not (x.is_cuda or interpreting()) \
            or x.dtype not in (torch.bfloat16, torch.float32):
        return torch.nn.functional.silu(vae_norm.rms_norm_silu_reference(x, self.gamma, self.scale, silu=False))
    return vae_norm.rms_norm_silu(x, self.gamma, self.scale)


def _dense_cache(call):
    """`call` with its ``feat_cache`` entries made contiguous first (in place in the list)."""

    def dense_cache_call(*args, **kwargs):
        cache = kwargs.get("feat_cache")
        for i, entry in enumerate(cache or ()):
            if isinstance(entry, torch.Tensor) and not entry.is_contiguous():
                cache[i] = entry.contiguous()
        return call(*args, **kwargs)

    return dense_cache_call


def traceable_upsample3d_forward(self: Any, x: torch.Tensor, feat_cache: list | None = None,
                                 feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006 (diffusers' signature)
    """diffusers 0.42's ``WanResample.forward`` for ``mode == "upsample3d"``, the ``"Rep"``
    marker tested by type (``isinstance(entry, str)``) instead of ``tensor == "Rep"``, which
    dynamo in torch 2.10/2.11 cannot trace. Same operations in the same order otherwise."""
    b, c, t, h, w = x.size()
    if feat_cache is not None:
        idx = feat_idx[0]
        entry = feat_cache[idx]
        if entry is None:
            feat_cache[idx] = REP
            feat_idx[0] += 1
        else:
            rep = isinstance(entry, str)
            cache_x = x[:, :, -CACHE_T:, :, :].clone()
            if cache_x.shape[2] < 2 and not rep:  # cache the last frame of the last two chunks
                cache_x = torch.cat([entry[:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
            if cache_x.shape[2] < 2 and rep:
                cache_x = torch.cat([torch.zeros_like(cache_x).to(cache_x.device), cache_x], dim=2)
            x = self.time_conv(x) if rep else self.time_conv(x, entry)
            feat_cache[idx] = cache_x
            feat_idx[0] += 1
            x = x.reshape(b, 2, c, t, h, w)
            x = torch.stack((x[:, 0, :, :, :, :], x[:, 1, :, :, :, :]), 3)
            x = x.reshape(b, c, t * 2, h, w)
    t = x.shape[2]
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    x = self.resample(x)
    return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)

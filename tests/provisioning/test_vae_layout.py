"""The runtime plan's VAE levers: vae_channels_last (the 3-D conv weights in NDHWC) and
vae_compile (the decoder under torch.compile): the decode the same (up to the summation
order) and back to the default when off."""

from __future__ import annotations

import torch

from gpubake.provisioning.runtime import apply_runtime, plan_from_env


def _conv_weights(vae):
    return [m.weight for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]


def test_channels_last_vae_decodes_the_same_latents(pipe):
    vae = pipe.vae
    z = torch.randn(1, vae.config.z_dim, 2, 8, 8, generator=torch.Generator().manual_seed(3)).to(vae.dtype)
    with torch.inference_mode():
        base = vae.decode(z).sample.float()
    try:
        done = apply_runtime(pipe, plan_from_env("cpu", "vae_channels_last=1"))
        assert done["vae"] == {"tiling": 0, "channels_last": 1, "conv_pad": 0, "fused_norm": 0, "compiled_decoder": 0}
        weights = _conv_weights(vae)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
                               for w in weights if w.shape[2:] != (1, 1, 1))
        with torch.inference_mode():
            got = vae.decode(z).sample.float()
        assert got.shape == base.shape
        assert float((got - base).norm() / base.norm()) < 2e-2  # bf16 convolutions, another summation order
    finally:
        done = apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert done["vae"]["channels_last"] == 0 and all(w.is_contiguous() for w in _conv_weights(vae))


def test_compiled_decoder_decodes_the_same_and_goes_back_to_eager(pipe):
    import torch._dynamo

    import copy

    vae = pipe.vae
    z = torch.randn(1, vae.config.z_dim, 6, 8, 8, generator=torch.Generator().manual_seed(4)).to(vae.dtype)
    with torch.inference_mode():
        base = vae.decode(z).sample.float()
        fp32 = copy.deepcopy(vae).float().decode(z.float()).sample  # what both bf16 decodes approximate

    def err(x):
        return float((x - fp32).norm() / fp32.norm())

    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        done = apply_runtime(pipe, plan_from_env("cpu", "vae_compile=1"))
        assert done["vae"] == {"tiling": 0, "channels_last": 0, "conv_pad": 0, "fused_norm": 0, "compiled_decoder": 1}
        assert vae.decoder._compiled_call_impl is not None
        keys = set(vae.state_dict())
        with torch.inference_mode():
            got = vae.decode(z).sample.float()
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
            again = vae.decode(z).sample.float()
        # the first latent frame, the second, the rest: no graph for a cache entry's strides
        # (4 without the dense cache), and none more for the next clip
        assert graphs == 3 and torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 3
        # inductor's fused ops round otherwise than eager's op-by-op bf16: no further from fp32
        assert err(got) <= 1.25 * err(base) and float((got - base).norm() / base.norm()) < 5e-2
        assert torch.equal(got, again) and set(vae.state_dict()) == keys  # the module's keys unchanged
    finally:
        done = apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert done["vae"]["compiled_decoder"] == 0 and vae.decoder._compiled_call_impl is None


def _upsamplers(vae):
    return [m for m in vae.decoder.modules() if getattr(m, "mode", None) == "upsample3d"]


def test_traceable_upsampler_forward_is_diffusers_own(pipe):
    """The compiled decoder's upsamplers run gpubake's copy of diffusers' forward (its "Rep"
    marker tested by type, which torch 2.10/2.11's dynamo can trace): the video bit for bit
    the same at 1, 2 and 5 latent frames (the first chunk alone, then the cache in use)."""
    import types

    from gpubake.provisioning.vae_decode import traceable_upsample3d_forward

    vae = pipe.vae
    ups = _upsamplers(vae)
    assert ups, "the Wan VAE's decoder has temporal upsamplers"
    for frames in (1, 2, 5):
        z = torch.randn(1, vae.config.z_dim, frames, 8, 8, generator=torch.Generator().manual_seed(frames)).to(vae.dtype)
        with torch.inference_mode():
            base = vae.decode(z).sample
        try:
            for m in ups:
                m.forward = types.MethodType(traceable_upsample3d_forward, m)
            with torch.inference_mode():
                got = vae.decode(z).sample
        finally:
            for m in ups:
                m.__dict__.pop("forward", None)
        assert got.shape == base.shape and torch.equal(got, base), frames


def test_compiled_decoder_has_no_graph_break_and_restores_the_upsamplers(pipe):
    import torch._dynamo

    vae = pipe.vae
    z = torch.randn(1, vae.config.z_dim, 4, 8, 8, generator=torch.Generator().manual_seed(5)).to(vae.dtype)
    torch._dynamo.reset()
    try:
        apply_runtime(pipe, plan_from_env("cpu", "vae_compile=1"))
        assert all("forward" in m.__dict__ for m in _upsamplers(vae))
        with torch.inference_mode():
            vae.decode(z)
        assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    finally:
        apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert not any("forward" in m.__dict__ for m in _upsamplers(vae))


def test_padded_convolutions_decode_the_same_and_leave_the_state_dict():
    """vae_conv_pad on the Wan 2.1 VAE's real config (the tiny one has no 96-filter conv): the
    six full-resolution 96-filter convolutions padded, the video the same (the zero filters
    are sliced off unread), the state dict's keys and tensors untouched, and off again."""
    from diffusers import AutoencoderKLWan

    from gpubake.provisioning.vae_decode import set_vae_conv_padding

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()  # defaults: the Wan 2.1 VAE
    z = torch.randn(1, 16, 2, 3, 4, generator=torch.Generator().manual_seed(6))
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.inference_mode():
        base = vae.decode(z).sample
        assert set_vae_conv_padding(vae, True) == 6
        got = vae.decode(z).sample
        padded = next(m for m in vae.modules() if "_gpubake_padded_weight" in m._buffers)
        padded._gpubake_padded_weight[0].add_(1.0)  # a real filter of the padded copy: the decode must see it
        assert not torch.equal(vae.decode(z).sample, got)
        set_vae_conv_padding(vae, True)  # rebuilt from the module's own weights
        assert torch.equal(vae.decode(z).sample, got)
        assert set_vae_conv_padding(vae, False) == 6
        again = vae.decode(z).sample
    assert float((got - base).norm() / base.norm()) < 1e-5  # fp32 on the CPU: another blocking at most
    assert torch.equal(again, base)
    after = vae.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert not any("_gpubake" in n for n, _ in vae.named_buffers())


def test_fused_norm_decodes_as_diffusers_and_goes_back(pipe, monkeypatch):
    """vae_fused_norm (Triton's interpreter here): every residual block's norms fused with
    their SiLU, the bf16 video diffusers' up to the norms' summation order (no further from an
    fp32 decode than diffusers' bf16 one), the state dict the same, then off."""
    import copy

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vae = pipe.vae
    z = torch.randn(1, vae.config.z_dim, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    keys = set(vae.state_dict())
    dtype = vae.dtype
    vae.to(torch.bfloat16)
    try:
        with torch.inference_mode():
            fp32 = copy.deepcopy(vae).float().decode(z).sample
            base = vae.decode(z.to(torch.bfloat16)).sample.float()
            done = apply_runtime(pipe, plan_from_env("cpu", "vae_fused_norm=1"))
            assert done["vae"]["fused_norm"] == 1
            blocks = [m for m in vae.decoder.modules() if hasattr(m, "norm1") and hasattr(m, "conv2")]
            assert blocks and all(isinstance(b.nonlinearity, torch.nn.Identity) for b in blocks)
            got = vae.decode(z.to(torch.bfloat16)).sample.float()
        err = lambda x: float((x - fp32).norm() / fp32.norm())  # noqa: E731
        assert float((got - base).norm() / base.norm()) < 1e-2 and err(got) <= 1.25 * err(base)
        assert set(vae.state_dict()) == keys
    finally:
        done = apply_runtime(pipe, plan_from_env("cpu", "plain"))
        vae.to(dtype)
    assert done["vae"]["fused_norm"] == 0
    assert all(isinstance(b.nonlinearity, torch.nn.SiLU) and "forward" not in b.norm1.__dict__ for b in blocks)


def test_compiled_decoder_is_the_same_with_the_fused_norm_on(pipe, monkeypatch):
    """Under torch.compile the fused norm's forward is diffusers' arithmetic (the kernel is for
    the eager decode), so inductor gets the same graph: the same video bit for bit, the same
    number of graphs. (A compiled decode drifting slower since the lever went into the Hopper
    plan, docs/benchmarks.md 2026-12-04, is then not this lever's doing.)"""
    import torch._dynamo

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    vae = pipe.vae
    z = torch.randn(1, vae.config.z_dim, 3, 8, 8, generator=torch.Generator().manual_seed(8)).to(vae.dtype)
    videos, graphs = {}, {}
    try:
        for runtime in ("vae_compile=1", "vae_compile=1,vae_fused_norm=1"):
            apply_runtime(pipe, plan_from_env("cpu", "plain"))
            torch._dynamo.reset()
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            done = apply_runtime(pipe, plan_from_env("cpu", runtime))
            assert done["vae"]["compiled_decoder"] == 1 and done["vae"]["fused_norm"] == int("fused" in runtime)
            with torch.inference_mode():
                videos[runtime] = vae.decode(z).sample
            graphs[runtime] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    finally:
        apply_runtime(pipe, plan_from_env("cpu", "plain"))
        torch._dynamo.reset()
    plain, fused = videos.values()
    assert torch.equal(plain, fused) and len(set(graphs.values())) == 1, graphs

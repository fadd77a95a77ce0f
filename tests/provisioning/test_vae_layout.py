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
        assert done["vae"] == {"tiling": 0, "channels_last": 1, "compiled_decoder": 0}
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
        assert done["vae"] == {"tiling": 0, "channels_last": 0, "compiled_decoder": 1}
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

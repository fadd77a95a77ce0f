"""The runtime plan's vae_channels_last: the VAE's 3-D conv weights in NDHWC, the decode the
same (up to the convolutions' summation order) and back to the default layout when off."""

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
        assert done["vae"] == {"tiling": 0, "channels_last": 1}
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

"""render's last conversion: the pipeline's float frames -> uint8 frames on the host. The
tensor path (frames converted where they were decoded) is the array path bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpubake.provisioning.render import RenderError, _to_uint8


def _frames(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(21, 3, 6, 7, generator=g)  # more frames than one copy (FRAMES_PER_COPY)
    x[0, 0, 0, :] = (torch.arange(7) + 0.5) / 255.0  # rounding ties
    x[0, 1, 0, :4] = torch.tensor([0.0, 1.0, 1.0 - 1e-7, 1e-7])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tensor_frames_convert_as_diffusers_arrays_do(dtype):
    pt = _frames(dtype)
    as_np = pt.permute(0, 2, 3, 1).float().numpy()  # diffusers' pt_to_numpy, output_type="np"
    got, want = _to_uint8(pt), _to_uint8(as_np)
    assert got.dtype == np.uint8 and got.shape == (21, 6, 7, 3) and got.flags.c_contiguous
    assert np.array_equal(got, want)


def test_non_finite_or_misshapen_tensor_frames_are_refused():
    bad = _frames(torch.float32)
    bad[18, 1, 3, 3] = float("nan")  # in the second copy
    with pytest.raises(RenderError, match="NaN"):
        _to_uint8(bad)
    with pytest.raises(RenderError, match="shape"):
        _to_uint8(torch.zeros(5, 6, 7, 3))


def test_mp4_preset_is_checked_and_used(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    from gpubake.provisioning.render import write_mp4

    clip = (np.random.default_rng(0).random((4, 32, 48, 3)) * 255).astype(np.uint8)
    with pytest.raises(RenderError, match="x264 preset 'quick'"):
        write_mp4(clip, tmp_path / "a.mp4", preset="quick")
    assert not list(tmp_path.iterdir())  # nothing half-written
    fast, slow = tmp_path / "fast.mp4", tmp_path / "slow.mp4"
    write_mp4(clip, fast, preset="ultrafast")
    write_mp4(clip, slow, preset="medium")
    assert len(imageio.mimread(fast)) == 4 and fast.read_bytes() != slow.read_bytes()  # the preset reached x264

"""The loader and the optional static activation scale of published W4A4 checkpoints.

`P.input_global_scale` (`format.INPUT_GLOBAL_SCALE_KEY`, float32 [], amax / 2688) is optional
per quantized linear: the loader builds the layers that have it with the buffer (so the key
check stays exact both ways), assigns it, and names the key of a bad one in one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpubake.kernels.format import INPUT_GLOBAL_SCALE_KEY
from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.loader import load_expert, load_pipeline

W = "diffusion_pytorch_model.safetensors"
STATIC = ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2")
KW = dict(negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=4.0,
          guidance_scale_2=3.0, output_type="np", max_sequence_length=16)


def _with_static(tiny_nvfp4_checkpoint, tmp_path, values, modules=STATIC):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_nvfp4_checkpoint, ck)
    for expert in ("transformer", "transformer_2"):
        sd = load_file(str(ck / expert / W))
        for name, v in zip(modules, values):
            sd[f"{name}.{INPUT_GLOBAL_SCALE_KEY}"] = v
        save_file(sd, str(ck / expert / W))
    return ck


def test_static_scales_load_where_present(tiny_nvfp4_checkpoint, tmp_path):
    ck = _with_static(tiny_nvfp4_checkpoint, tmp_path, [torch.tensor(0.01), torch.tensor(0.25)])
    tr = load_expert(ck / "transformer_2")
    assert tr.get_submodule(STATIC[0]).input_global_scale.item() == pytest.approx(0.01)
    assert tr.get_submodule(STATIC[1]).input_global_scale.item() == pytest.approx(0.25)
    others = [m for n, m in tr.named_modules() if isinstance(m, NVFP4Linear) and n not in STATIC]
    assert others and all(m.input_global_scale is None for m in others)
    assert tr.get_submodule(STATIC[0]).input_global_scale.dtype == torch.float32


def test_static_scales_leave_a_cpu_pipeline_unchanged(tiny_nvfp4_checkpoint, tmp_path):
    """On the CPU (cpu-reference: W4A16) the static scales are not used: same frames."""
    ck = _with_static(tiny_nvfp4_checkpoint, tmp_path, [torch.tensor(1e-4), torch.tensor(1e-4)])

    def frames(path):
        pipe = load_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red cat", generator=torch.Generator().manual_seed(0), **KW).frames[0]

    assert np.array_equal(frames(ck), frames(tiny_nvfp4_checkpoint))


@pytest.mark.parametrize(("values", "modules", "pattern"), [
    ([torch.tensor(0.0)], STATIC[:1],
     r"transformer\w*: blocks\.0\.attn1\.to_q\.input_global_scale: 0\.0 must be finite"),
    ([torch.tensor(0.01, dtype=torch.float16)], STATIC[:1],
     r"blocks\.0\.attn1\.to_q\.input_global_scale: expected a float32 scalar"),
    ([torch.tensor([0.01])], STATIC[:1],
     r"tensor 'blocks\.0\.attn1\.to_q\.input_global_scale' has shape \[1\], expected \[\]"),
    ([torch.tensor(0.01)], ("proj_out",),  # not a quantized linear: no static scale there
     r"unexpected tensor 'proj_out\.input_global_scale'"),
])
def test_bad_static_scale_names_the_key(tiny_nvfp4_checkpoint, tmp_path, values, modules, pattern):
    ck = _with_static(tiny_nvfp4_checkpoint, tmp_path, values, modules)
    with pytest.raises(CheckpointError, match=pattern) as exc:
        load_pipeline(ck)
    assert "\n" not in str(exc.value)

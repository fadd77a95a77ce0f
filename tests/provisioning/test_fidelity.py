"""fidelity on the tiny model: JSON report and contact sheet."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gpubake.errors import GpubakeError
from gpubake.provisioning.fidelity import run_fidelity


def test_report_and_contact_sheet(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path):
    out = tmp_path / "fid"
    rep = run_fidelity(tiny_checkpoint, tiny_nvfp4_checkpoint, out, prompts=["a red cat"], seeds=[0, 1],
                       steps=3, progress=False)
    on_disk = json.loads((out / "fidelity.json").read_text())
    assert on_disk["summary"] == rep["summary"] and len(on_disk["runs"]) == 2
    s = rep["settings"]
    assert (s["height"], s["width"], s["num_frames"], s["steps"]) == (64, 64, 5, 3)  # registry + override
    for run in rep["runs"]:
        lat = run["latent_rel_err_per_step"]
        assert len(lat) == 3 and all(0 < e < 0.2 for e in lat)
        assert len(run["psnr_db_per_frame"]) == 5 and len(run["ssim_per_frame"]) == 5
        assert 25 < run["psnr_db_mean"] < 100 and 0.9 < run["ssim_mean"] < 1.0
    assert rep["runs"][0]["latent_rel_err_per_step"] != rep["runs"][1]["latent_rel_err_per_step"]
    assert len(rep["layer_sqnr_db"]) == 60 and 15 < rep["summary"]["layer_sqnr_db_min"] < 25
    img = Image.open(out / "contact_sheet.png")
    assert img.width >= 3 * 128 and img.height > 2 * 4 * 128  # 2 runs x 4 frames, 3 columns, 2x upscaled


def test_arguments_in_the_wrong_order(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path):
    with pytest.raises(GpubakeError, match="not an NVFP4 or FP8 checkpoint"):
        run_fidelity(tiny_nvfp4_checkpoint, tiny_checkpoint, tmp_path, prompts=["x"], seeds=[0], progress=False)
    assert not (tmp_path / "fidelity.json").exists()


def test_a_step_cache_on_the_nvfp4_run_is_reported_with_its_skips(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path,
                                                                  monkeypatch):
    """`--step-cache`: the NVFP4 run with MagCache (a calibration for the tiny recipe's schedule
    standing in for the authors'), its cost on top of the quantization's, its skips counted."""
    from gpubake.provisioning import mag_cache
    from gpubake.provisioning.mag_cache import MagTable

    plain = run_fidelity(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path / "plain", prompts=["a red cat"],
                         seeds=[0], steps=4, progress=False)
    tiny = MagTable("tiny-4", "unipc", 3.0, 0.875, 4, (1.0, .99, .99, .99), (1.0, .99, .99, .99))
    monkeypatch.setattr(mag_cache, "tables", lambda: (tiny,))
    cached = run_fidelity(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path / "mag", prompts=["a red cat"],
                          seeds=[0], steps=4, progress=False, step_cache="mag:0.5:2:0")
    assert (plain["recipe"], plain["step_cache"], cached["step_cache"]) == ("tiny-4step", "none", "mag:0.5:2:0")
    assert "forwards_skipped" not in plain["runs"][0] and cached["runs"][0]["forwards_skipped"] > 0
    err = [r["latent_rel_err_per_step"][-1] for r in (plain["runs"][0], cached["runs"][0])]
    assert err[1] > err[0] > 0  # the skips cost something on top of NVFP4's rounding


def test_a_fixed_schedule_recipe_refuses_another_step_count(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path,
                                                            monkeypatch):
    from gpubake.provisioning import fidelity
    from gpubake.provisioning.models import get_recipe

    monkeypatch.setattr(fidelity, "_recipe_of", lambda model_id: get_recipe("lightx2v-4step-t2v"))
    with pytest.raises(GpubakeError, match=r"^--steps: steps=3: recipe lightx2v-4step-t2v is a fixed 4-step"):
        run_fidelity(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path / "x", prompts=["x"], seeds=[0], steps=3,
                     progress=False)
    assert not (tmp_path / "x").exists()

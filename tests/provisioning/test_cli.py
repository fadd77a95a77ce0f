"""The commands end to end through the real CLI entry point (in-process)."""

from __future__ import annotations

import json

import torch

from gpubake.cli import _run
from gpubake.provisioning.loader import load_pipeline


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_make_tiny_quantize_load_generate(tmp_path, capsys):
    """Done-when of issue 4: make-tiny -> quantize -> load -> a few frames on CPU from NVFP4."""
    assert _run(["make-tiny", str(tmp_path / "bf16"), "--json"]) == 0
    made = _json(capsys)
    assert len(made["manifest_sha256"]) == 64
    assert _run(["quantize", str(tmp_path / "bf16"), str(tmp_path / "q"), "--policy", "keep-first-last", "--json"]) == 0
    q = _json(capsys)
    assert q["policy"] == "keep-first-last" and q["quantized_layers"] == 20 and q["compression"] > 1
    pipe = load_pipeline(tmp_path / "q")
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a dog", negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(3), output_type="np", max_sequence_length=16).frames[0]
    assert frames.shape == (5, 64, 64, 3)


def test_fidelity_cli(tiny_checkpoint, tiny_nvfp4_checkpoint, tmp_path, capsys):
    rc = _run(["fidelity", str(tiny_checkpoint), str(tiny_nvfp4_checkpoint), "--out", str(tmp_path / "f"),
               "--steps", "2", "--frames", "5", "--json"])
    assert rc == 0
    rep = _json(capsys)
    assert rep["summary"]["psnr_db_mean"] > 25 and (tmp_path / "f" / "contact_sheet.png").is_file()


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    cases = [
        (["fetch", "wan9-x", str(tmp_path / "a")], "unknown model id 'wan9-x'"),
        (["fetch", "ftp://x/y", str(tmp_path / "a")], "unsupported source"),
        (["fetch", "tiny-wan2.2", str(tmp_path / "a")], "make-tiny"),
        (["make-tiny", str(tmp_path / "full")], "already exists"),
        (["quantize", str(tmp_path), str(tmp_path / "q")], "model_index.json: missing"),
        (["quantize", str(tmp_path), str(tmp_path / "q"), "--policy", "int3"], "unknown policy 'int3'"),
        (["quantize", str(tmp_path), str(tmp_path / "q"), "--model-id", "nope"], "unknown model id 'nope'"),
    ]
    for argv, msg in cases:
        assert _run(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "q").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]


def test_fetch_dry_run_json(capsys, tmp_path):
    assert _run(["fetch", "wan2.2-t2v-a14b", str(tmp_path / "w"), "--dry-run", "--json"]) == 0
    assert _json(capsys)["source"] == "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert not (tmp_path / "w").exists()


def test_every_command_has_help(capsys):
    for cmd in ("fetch", "make-tiny", "quantize", "fidelity"):
        assert _run([cmd, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out

"""bench/bench_clip.py (issue 18) in its --small mode: the tiny model on the CPU through the
same code paths as the H200 run (checkpoint writer, BF16 baseline, the peer pipeline, the
service's pipeline and plan, the small-card plan under --mem-cap), so the one GPU run does
not fail on a path nobody ran. GPU-only levers are skipped there and must say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_clip  # noqa: E402


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One --small run with both sizes, 2 steps (the tiny recipe has 4: extrapolated) and the cap case."""
    tmp = tmp_path_factory.mktemp("bench_clip")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("GPUBAKE_RUNTIME", None)
    cmd = [sys.executable, str(BENCH / "bench_clip.py"), "--small", "--out", str(tmp / "out"),
           "--root", str(tmp / "root"), "--720p", "--steps", "2", "--mem-cap", "23.5", "--cases", "peer,gpubake,fp8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp / "out" / "bench_clip.json").read_text())
    return {"data": data, "stdout": proc.stdout, "root": tmp / "root"}


@pytest.mark.slow
def test_small_run_measures_every_case_once_per_size(small_run):
    data, stdout = small_run["data"], small_run["stdout"]
    names = [c["case"] for c in data["cases"]]
    assert names == ["peer@480p", "peer@720p", "gpubake@480p", "gpubake@720p", "fp8@480p", "fp8@720p",
                     "cap@480p", "cap@720p"]
    assert not data["skipped"] and all("error" not in c for c in data["cases"]), data["cases"]
    lines = stdout.splitlines()  # one summary line per case, nothing else on stdout
    assert [ln.split("]")[0] + "]" for ln in lines] == [f"[{n}]" for n in names]
    assert data["sizes"] == {"480p": [32, 48], "720p": [32, 64]} and data["frames"] == 5
    assert data["checkpoint"]["reused"] is False and data["checkpoint_fp8"]["reused"] is False
    assert data["checkpoint_fp8"]["path"].endswith("model-fp8")
    assert all(r["finite"] for r in data["bf16_reference"].values())
    for case in data["cases"]:
        t = case["timed"]
        assert (t["height"], t["width"]) == tuple(data["sizes"][case["size"]]) and t["frames"] == 5
        assert Path(t["video"]).stat().st_size > 0
        assert t["steps"] == 2 and len(t["step_seconds"]) == 1 and t["seconds_per_step"] > 0
        assert t["clip_s"] == pytest.approx(t["text_encoder_s"] + t["denoise_s"] + t["decode_s"], abs=2e-3)
        # 2 steps measured, the tiny recipe has 4: the clip at 4 is extrapolated and says so
        assert t["recipe_steps"] == 4 and t["clip_at_recipe_steps_extrapolated"] is True
        assert t["clip_at_recipe_steps_s"] == pytest.approx(
            t["text_encoder_s"] + t["decode_s"] + 4 * t["seconds_per_step"], abs=2e-3)
        assert t["text_encoder_s"] > 0
        assert ("warmup" in case) == (not case["case"].startswith("cap"))  # the cap case reuses the compile


@pytest.mark.slow
def test_small_run_errors_against_the_bf16_baseline(small_run):
    cases = {c["case"]: c for c in small_run["data"]["cases"]}
    for size in ("480p", "720p"):
        # the peer on the CPU is plain diffusers BF16 on the baseline's own weights: exactly it
        assert cases[f"peer@{size}"]["rel_err_vs_bf16"] == 0.0
        # gpubake's NVFP4 checkpoint of the same weights: close to it, not equal
        assert 0.0 < cases[f"gpubake@{size}"]["rel_err_vs_bf16"] < 0.2
        assert cases[f"gpubake@{size}"]["finite"] and cases[f"peer@{size}"]["finite"]
        # the FP8-weight checkpoint of the same weights: closer to BF16 than NVFP4 (8 bits, not 4)
        fp8 = cases[f"fp8@{size}"]
        assert fp8["finite"] and 0.0 < fp8["rel_err_vs_bf16"] < cases[f"gpubake@{size}"]["rel_err_vs_bf16"]


@pytest.mark.slow
def test_small_run_says_what_it_skipped_and_which_plan_ran(small_run):
    cases = {c["case"]: c for c in small_run["data"]["cases"]}
    levers = cases["peer@480p"]["levers"]
    assert set(levers) == {"fp8", "fa3", "compile"} and all(v.startswith("skipped: CPU") for v in levers.values())
    plan = cases["gpubake@480p"]["runtime"]["plan"]
    assert plan["gemm_backend"] == "cpu-reference" and plan["text_encoder"] == "keep"
    assert cases["gpubake@480p"]["runtime"]["gemm_backends"]["transformer_2"]["cpu-reference"] > 0
    # the fp8 case: the same plan, its FP8 layers bound to the CPU's FP8 path (no NVFP4 layer)
    assert cases["fp8@480p"]["runtime"]["gemm_backends"] == {e: {"fp8:reference": 30}
                                                             for e in ("transformer", "transformer_2")}
    cap = cases["cap@480p"]
    assert cap["runtime"]["plan"]["text_encoder"] == "shrink" and cap["runtime"]["plan"]["vae_tiling"] is True
    assert cap["runtime"]["plan"]["expert_offload"] is True  # the 24 GB card's plan (runtime.OFFLOAD_CARD_GIB)
    assert cap["runtime"]["applied"]["text_encoder"]["fp8_linears"] > 0
    assert cap["cap"]["fraction"].startswith("skipped: CPU")


def test_clip_numbers_split_and_extrapolate():
    from gpubake.provisioning.render import RenderResult

    res = RenderResult(video=Path("v.mp4"), first_frame=Path("f.png"), seconds_per_step=1.0, total_seconds=10.0,
                       step_seconds=[1.0, 1.0, 1.0], encode_and_first_step_seconds=3.0, decode_seconds=2.0,
                       frames=81, height=480, width=832, steps=4)
    out = bench_clip.clip_numbers(res, text_encoder_s=2.0, recipe_steps=40)
    assert out["denoise_s"] == 4.0  # first step (3.0 - 2.0 of encoder) + three more
    assert out["clip_s"] == 8.0 and out["video_write_s"] == 2.0 and out["total_with_write_s"] == 10.0
    assert out["clip_at_recipe_steps_s"] == 44.0 and out["clip_at_recipe_steps_extrapolated"] is True
    assert "40 x seconds_per_step" in out["extrapolation"]
    same = bench_clip.clip_numbers(res, text_encoder_s=2.0, recipe_steps=4)
    assert same["clip_at_recipe_steps_s"] == 8.0 and same["clip_at_recipe_steps_extrapolated"] is False
    assert "extrapolation" not in same


def test_the_summary_line_gives_the_mean_step_where_a_step_cache_skips_most():
    from gpubake.provisioning.render import RenderResult

    res = RenderResult(video=Path("v.mp4"), first_frame=Path("f.png"), seconds_per_step=0.01, total_seconds=10.0,
                       step_seconds=[4.0, 0.01, 0.01, 4.0, 0.01], encode_and_first_step_seconds=4.0,
                       decode_seconds=1.0, frames=81, height=480, width=832, steps=6)
    t = bench_clip.clip_numbers(res, text_encoder_s=0.1, recipe_steps=6)
    assert t["mean_step_s"] == 1.606
    line = bench_clip.summary_line({"case": "gpubake+step_cache=mag:0.04@480p", "timed": t})
    assert "0.010 s/step (median; mean 1.606" in line
    plain = dict(t, mean_step_s=0.0102)  # within 5 % of the median: one number
    assert "mean" not in bench_clip.summary_line({"case": "gpubake@480p", "timed": plain})


def test_sampling_defaults_are_the_models_and_flags_override(tmp_path):
    from gpubake.provisioning.models import get_model

    args = bench_clip.parse_args(["--out", str(tmp_path), "--root", str(tmp_path)])
    smp = bench_clip.resolve_sampling(args, "wan2.2-t2v-a14b")
    m = get_model("wan2.2-t2v-a14b")
    assert (smp.steps, smp.recipe_steps) == (m.num_inference_steps, m.num_inference_steps)
    assert (smp.guidance_scale, smp.guidance_scale_2) == (m.guidance_scale, m.guidance_scale_2)
    assert smp.negative_prompt == m.negative_prompt and smp.forwards_per_step() == [2, 2]
    args = bench_clip.parse_args(["--out", str(tmp_path), "--root", str(tmp_path), "--steps", "4", "--guidance", "1"])
    smp = bench_clip.resolve_sampling(args, "wan2.2-t2v-a14b")
    assert (smp.steps, smp.recipe_steps) == (4, m.num_inference_steps)
    assert smp.forwards_per_step() == [1, 2]  # no CFG on the high-noise expert: one forward a step


@pytest.mark.parametrize("argv, flag", [
    (["--sizes", "1080p"], "--sizes: unknown '1080p'"),
    (["--steps", "1"], "--steps: 1"),
    (["--cases", "cap"], "--cases cap: needs --mem-cap"),
    (["--mem-cap", "0.5"], "--mem-cap: 0.5 GiB"),
    (["--frames", "6"], "--frames: 6"),
    (["--peer-levers", "fp8,int4"], "--peer-levers: unknown 'int4'"),
    (["--guidance", "0.5"], "--guidance: 0.5"),
    (["--variant", "cfg_until=1.5"], "--variant: cfg_until: must be a number in [0, 1]"),
    (["--variant", "step_cache=fbc:2"], "--variant: step_cache='fbc:2': one of none | fbc:THRESHOLD"),
    (["--variant", "step_cache=none"], "--variant: 'step_cache=none': the gpubake case itself"),
    (["--variant", "attention=cudnn"], "--variant: 'attention=cudnn' is not LEVER=VALUE"),
    (["--variant", "vae_channels_last=0"], "--variant: 'vae_channels_last=0': vae_channels_last=1"),
    (["--variant", "cudnn_benchmark=on"], "--variant: 'cudnn_benchmark=on': cudnn_benchmark=1"),
    (["--variant", "vae_conv_pad=yes"], "--variant: 'vae_conv_pad=yes': vae_conv_pad=0 or vae_conv_pad=1"),
    (["--variant", "sparse_block_q=96"], "--variant: 'sparse_block_q=96': sparse attention: query block 96"),
    (["--variant", "cfg_until=0.5", "--cases", "peer"], "--variant: a variant changes the gpubake case"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, flag):
    rc = bench_clip.main(["--out", str(tmp_path / "o"), "--root", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()  # nothing written


def test_no_out_and_no_env_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert bench_clip.main(["--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --out: not given and $OUT is not set\n"


def test_unknown_recipe_is_one_line_exit_2(tmp_path, capsys):
    rc = bench_clip.main(["--small", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "r"),
                          "--recipe", "no-such-recipe"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "recipe" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_checkpoint_is_reused_only_for_the_same_weights(tmp_path):
    cfg = bench_clip.expert_config(small=True)
    expert = bench_clip.build_expert(cfg, "cpu", seed=0)
    ckpt, reused = bench_clip.ensure_checkpoint(tmp_path, True, "cpu", 0, expert, {})
    assert not reused and (ckpt / "gpubake-manifest.json").is_file()
    again = bench_clip.build_expert(cfg, "cpu", seed=0)
    assert bench_clip.ensure_checkpoint(tmp_path, True, "cpu", 0, again, {}) == (ckpt, True)
    other = bench_clip.build_expert(cfg, "cpu", seed=1)
    with pytest.raises(bench_clip.BenchError, match=r"--root: .* holds other weights than --seed 1 builds"):
        bench_clip.ensure_checkpoint(tmp_path, True, "cpu", 1, other, {})


def test_budget_skips_a_case_that_would_overrun_it(tmp_path):
    from types import SimpleNamespace

    args = bench_clip.parse_args(["--out", str(tmp_path), "--root", str(tmp_path), "--budget-s", "300", "--steps", "4"])
    run = bench_clip.Run(args, SimpleNamespace(cuda=True), {"sampling": {"steps": 4}, "skipped": []})
    # nothing measured: the first 480p case is guessed (compile + two clips of 4 steps), and fits
    assert run.guess("480p", 2, 4) < 300 and run.fits("peer@480p", "480p")
    run.cost[("gpubake", "480p")], run.clip_cost["480p"] = 200.0, 40.0
    run.t0 -= 150  # 150 s spent: 150 left
    assert not run.fits("gpubake@480p", "480p")  # a 200 s case
    assert run.fits("cap@480p", "480p")  # the cap case is one clip and a load: 40 s
    assert run.result["skipped"] == ["gpubake@480p: expected ~200 s > 150 s left of --budget-s"]
    # another stack is not costed as this one (the peer's 210 s compile skipped fp8 on 2026-12-03):
    # the guessed compile (90 s) and two of the clips measured so far
    run.timed_clip["480p"] = 25.0
    assert run.fits("fp8@480p", "480p")  # 90 + 2 x 25 = 140 s
    run.timed_clip["480p"] = 35.0
    assert not run.fits("fp8@480p", "480p")  # 160 s
    assert run.result["skipped"][-1] == "fp8@480p: expected ~160 s > 150 s left of --budget-s"
    assert json.loads((tmp_path / "bench_clip.json").read_text())["skipped"] == run.result["skipped"]
    # a variant renders on the loaded pipeline: its timed clip, plus a warm-up clip if it has one
    run.timed_clip["480p"], run.warmup_clip["480p"] = 25.0, 130.0
    assert run.fits("gpubake+cfg_until=0.25@480p", "480p", warms_up=False)  # 25 s, not the 200 s case
    assert not run.fits("gpubake+sparse_keep=0.1@480p", "480p", warms_up=True)  # 155 s
    assert run.result["skipped"][-1] == "gpubake+sparse_keep=0.1@480p: expected ~155 s > 150 s left of --budget-s"


def test_a_truncated_clip_is_extrapolated_from_its_own_guided_and_unguided_steps():
    from clip_variants import cfg_clip_at_recipe_steps

    # 4 steps, cfg_until 0.5: steps 1 (the encoder's) and 2 guided, 3 and 4 not
    timed = {"steps": 4, "step_seconds": [3.0, 1.5, 1.4], "text_encoder_s": 0.5, "decode_s": 2.0}
    out = cfg_clip_at_recipe_steps(timed, 2, 0.5, 40, base_step_s=2.9)
    assert (out["guided_step_s"], out["unguided_step_s"], out["cfg_steps_at_recipe_steps"]) == (3.0, 1.45, 20)
    assert out["clip_at_recipe_steps_s"] == pytest.approx(0.5 + 2.0 + 20 * 3.0 + 20 * 1.45)
    # one guided step only (the encoder's): the gpubake case's guided median stands in
    out = cfg_clip_at_recipe_steps(timed, 1, 0.25, 40, base_step_s=2.9)
    assert out["guided_step_s"] == 2.9 and out["unguided_step_s"] == pytest.approx(1.5)
    # every measured step guided: no unguided step to extrapolate from
    out = cfg_clip_at_recipe_steps(timed, 4, 0.5, 40, base_step_s=2.9)
    assert out["clip_at_recipe_steps_s"] is None and out["extrapolation"].startswith("none")


def test_a_mag_cache_clip_is_extrapolated_from_the_forwards_it_computes_at_the_recipes_steps():
    """MagCache's skips at 40 steps are known from a shorter run: the authors' T2V-A14B example
    (mag:0.06:2:0.4) computes 52 of 80 forwards, so 26 guided steps' worth of work."""
    from clip_variants import mag_clip_at_recipe_steps
    from diffusers import UniPCMultistepScheduler

    from gpubake.provisioning.step_cache import StepCache

    class Pipe:  # the A14B recipe's scheduler and boundary, as sampling.apply_recipe leaves them
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
        transformer_2 = object()

        class config:
            boundary_ratio = 0.875

    Pipe.scheduler.set_timesteps(8)  # the short run's schedule: left as it is
    timed = {"recipe_steps": 40, "text_encoder_s": 0.1, "decode_s": 2.0}
    out = mag_clip_at_recipe_steps(timed, Pipe(), StepCache.parse("mag:0.06:2:0.4"), base_step_s=3.7)
    assert out["mag_forwards_at_recipe_steps"] == {"computed": 52, "skipped": 28}
    assert out["clip_at_recipe_steps_s"] == pytest.approx(0.1 + 2.0 + 26 * 3.7)
    assert len(Pipe.scheduler.timesteps) == 8
    out = mag_clip_at_recipe_steps(timed, Pipe(), StepCache.parse("mag:0.06"), base_step_s=None)
    assert out["clip_at_recipe_steps_s"] is None and out["extrapolation"].startswith("none")
    Pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    out = mag_clip_at_recipe_steps(timed, Pipe(), StepCache.parse("mag:0.06"), base_step_s=3.7)
    assert out["extrapolation"] == "none: no ratio table for the schedule"


@pytest.mark.slow
def test_cap_case_alone_warms_up_before_its_timed_clip(tmp_path):
    """With no gpubake case compiled before it in the process, the cap case renders a warm-up
    clip of its own, so its timed clip is a speed measure (none compiled in it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(BENCH / "bench_clip.py"), "--small", "--out", str(tmp_path / "out"), "--root",
           str(tmp_path / "root"), "--cases", "cap", "--steps", "2", "--mem-cap", "23.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cap,) = json.loads((tmp_path / "out" / "bench_clip.json").read_text())["cases"]
    assert cap["case"] == "cap@480p" and cap["compiled_by_an_earlier_case"] is False
    assert "warmup" in cap and cap["timed"]["dynamo_frames_compiled"] == 0


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """--small, the gpubake case at the tiny recipe's 4 steps and four variants after it."""
    tmp = tmp_path_factory.mktemp("bench_clip_variants")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("GPUBAKE_RUNTIME", None)
    cmd = [sys.executable, str(BENCH / "bench_clip.py"), "--small", "--out", str(tmp / "out"), "--root",
           str(tmp / "root"), "--cases", "gpubake", "--steps", "4", "--variant", "cfg_until=0.5",
           "--variant", "step_cache=fbc:0.2", "--variant", "sparse_keep=0.5", "--variant", "vae_channels_last=1", "--variant",
           "cudnn_benchmark=1", "--variant", "vae_compile=1", "--variant", "fuse_qkv=1", "--variant", "vae_fused_norm=1",
           "--variant", "step_cache=mag:0.06", "--variant", "cfg_until=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"data": json.loads((tmp / "out" / "bench_clip.json").read_text()), "stdout": proc.stdout}


@pytest.mark.slow
def test_variants_run_after_their_gpubake_case_and_report_counts_and_quality(variant_run):
    data = variant_run["data"]
    cases = {c["case"]: c for c in data["cases"]}
    assert list(cases) == ["gpubake@480p", "gpubake+cfg_until=0.5@480p", "gpubake+step_cache=fbc:0.2@480p",
                           "gpubake+sparse_keep=0.5@480p", "gpubake+vae_channels_last=1@480p",
                           "gpubake+cudnn_benchmark=1@480p", "gpubake+vae_compile=1@480p", "gpubake+fuse_qkv=1@480p",
                           "gpubake+vae_fused_norm=1@480p", "gpubake+step_cache=mag:0.06:2:0.2@480p",
                           "gpubake+cfg_until=1@480p"]
    assert all("error" not in c for c in data["cases"]) and len(variant_run["stdout"].splitlines()) == 11
    cut = cases["gpubake+cfg_until=0.5@480p"]
    # 4 steps, 2 guided: 2 x 2 + 2 forwards; blocks all evaluated
    assert cut["timed"]["cfg_steps"] == 2 and sum(cut["counts"]["transformer_forwards"].values()) == 6
    assert cut["counts"]["blocks_skipped_fraction"] == 0.0 and "warmup" not in cut
    assert 0.0 < cut["quality_vs_gpubake"]["latent_rel_err"] < 0.1
    fbc = cases["gpubake+step_cache=fbc:0.2@480p"]
    assert fbc["applied"]["transformer"]["step_cache"] == "fbc:0.2" and "warmup" in fbc
    assert sum(fbc["counts"]["transformer_forwards"].values()) == 8 and fbc["counts"]["blocks_skipped_fraction"] > 0
    assert 0.0 < fbc["quality_vs_gpubake"]["latent_rel_err"] < 0.03
    assert fbc["timed"]["clip_at_recipe_steps_s"] == pytest.approx(fbc["timed"]["clip_s"], abs=1e-3)  # 4 steps: measured
    sparse = cases["gpubake+sparse_keep=0.5@480p"]
    assert sparse["applied"] == {"transformer": {"sparse_attention_modules": 3},
                                 "transformer_2": {"sparse_attention_modules": 3}} and "warmup" in sparse
    assert sum(sparse["counts"]["transformer_forwards"].values()) == 8
    # the tiny clip's 32 tokens are below attention_sparse.MIN_TOKENS: dense, so the same clip
    assert sparse["quality_vs_gpubake"]["latent_rel_err"] < 1e-5
    nhwc = cases["gpubake+vae_channels_last=1@480p"]
    assert nhwc["applied"]["vae"]["channels_last_conv3d"] > 0 and "warmup" not in nhwc
    assert nhwc["quality_vs_gpubake"]["latent_rel_err"] == 0.0  # the same latents; only the decode's layout
    bench = cases["gpubake+cudnn_benchmark=1@480p"]
    assert bench["applied"] == {"cudnn": {"benchmark": True}} and "warmup" in bench
    assert bench["quality_vs_gpubake"]["latent_rel_err"] < 1e-3  # the CPU has no cuDNN: the same kernels
    compiled = cases["gpubake+vae_compile=1@480p"]
    assert compiled["applied"] == {"vae": {"compiled_decoder": 1}} and "warmup" in compiled
    assert compiled["quality_vs_gpubake"]["latent_rel_err"] == 0.0  # the same latents; only the decode compiled
    qkv = cases["gpubake+fuse_qkv=1@480p"]
    assert qkv["applied"] == {"transformer": {"fused_qkv_modules": 3}, "transformer_2": {"fused_qkv_modules": 3}}
    assert "warmup" in qkv and qkv["quality_vs_gpubake"]["latent_rel_err"] == 0.0  # cpu-reference: the parts in turn
    norm = cases["gpubake+vae_fused_norm=1@480p"]
    assert norm["applied"]["vae"]["fused_blocks"] > 0 and norm["quality_vs_gpubake"]["latent_rel_err"] == 0.0
    mag = cases["gpubake+step_cache=mag:0.06:2:0.2@480p"]  # no shipped table is the tiny schedule's: no skip
    assert mag["applied"]["transformer"]["mag_tables"] == ["wan22-t2v-a14b-40step", "wan22-ti2v-5b-50step",
                                                           "wan22-i2v-a14b-40step"]
    assert "warmup" in mag
    assert mag["mag_forwards"] == {"computed": {"transformer": 4, "transformer_2": 4}, "skipped": {}}  # 2 + 2 steps
    assert mag["quality_vs_gpubake"]["latent_rel_err"] == 0.0
    # after the step caches, the sparse kernel, the VAE layout, cuDNN's setting, the compiled decoder, the fused
    # projections and the fused norms were put back, cfg_until=1 is the gpubake clip exactly
    full = cases["gpubake+cfg_until=1@480p"]
    assert full["quality_vs_gpubake"] == {"latent_rel_err": 0.0, "video_psnr_db": "inf", "video_max_abs": 0.0}
    assert full["counts"]["blocks_skipped_fraction"] == 0.0 and full["timed"]["cfg_steps"] == 4


@pytest.mark.slow
def test_peer_against_fp8_writes_the_fp8_checkpoint_only(tmp_path):
    """`--cases peer,fp8` (the FP8 variant against the peer, one device call): the NVFP4
    checkpoint is not written (~40 s of a call on the device), the peer takes its encoder and
    VAE from the FP8 one, and both cases run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("GPUBAKE_RUNTIME", None)
    cmd = [sys.executable, str(BENCH / "bench_clip.py"), "--small", "--out", str(tmp_path / "out"),
           "--root", str(tmp_path / "root"), "--steps", "2", "--cases", "peer,fp8", "--no-time-bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "bench_clip.json").read_text())
    assert "checkpoint" not in data and data["checkpoint_fp8"]["path"] == str(tmp_path / "root" / "model-fp8")
    assert not (tmp_path / "root" / "model").exists()
    assert [c["case"] for c in data["cases"]] == ["peer@480p", "fp8@480p"]
    assert all("error" not in c for c in data["cases"]), data["cases"]

"""The runtime plan's block-sparse self-attention (`attention=sparse-flex`, `sparse_keep`):
parsed and refused as bad input in one line, in no default plan, and rendered end to end by
the self-test on the CPU (eager FlexAttention over the tiny model's video tokens)."""

from __future__ import annotations

import dataclasses

import pytest

from gpubake.kernels import attention_sparse as S
from gpubake.provisioning.runtime import SPARSE_KEEP, RuntimePlan, RuntimePlanError, plan_for, plan_from_env



def test_sparse_flex_and_its_keep_ratio_parse():
    plan = plan_from_env("cpu", "attention=sparse-flex")
    assert plan.attention == "sparse-flex" and plan.sparse_keep == SPARSE_KEEP == S.DEFAULT_KEEP == 0.1
    plan = plan_from_env("cpu", "attention=sparse-flex,sparse_keep=0.2")
    assert plan.sparse_keep == 0.2 and dataclasses.asdict(plan)["sparse_keep"] == 0.2
    assert plan_from_env("cpu", "attention=sparse-flex, sparse_keep = 1").sparse_keep == 1.0


def test_the_query_block_is_a_lever_of_the_sparse_kernel(monkeypatch):
    plan = plan_from_env("cpu", "attention=sparse-flex,sparse_block_q=128")
    assert plan.sparse_block_q == 128 and plan_from_env("cpu", "attention=sparse-flex").sparse_block_q == 64
    for value, message in (("attention=sparse-flex,sparse_block_q=96", "sparse_block_q=96 is not one of 64, 128"),
                           ("attention=sparse-flex,sparse_block_q=big", "sparse_block_q='big' is not a whole number"),
                           ("sparse_block_q=128", "sparse_block_q=128 needs attention=sparse-flex")):
        with pytest.raises(RuntimePlanError) as exc:
            plan_from_env("cpu", value)
        assert message in str(exc.value) and "\n" not in str(exc.value)
    # the plan's block reaches the kernel: each self-attention call routes 128-token query blocks
    seen = []
    monkeypatch.setattr(S, "MIN_TOKENS", 16)
    real = S.flex_sparse_attention
    monkeypatch.setattr(S, "flex_sparse_attention", lambda q, k, v, keep, scale=None, block_q=64, block_k=128:
                        seen.append((keep, block_q)) or real(q, k, v, keep, scale, block_q, block_k))
    import torch

    q = torch.randn(1, 2, 300, 16)
    fn = S.backend_fn(0.2, 128)
    assert fn is S.backend_fn(0.2, 128) and fn is not S.backend_fn(0.2)
    fn(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
    assert seen == [(0.2, 128)]


def test_no_default_plan_runs_sparse_attention():
    for arch in ("hopper", "blackwell", "ada", "cpu"):
        assert RuntimePlan(arch=arch, gemm_backend="dequant-bf16").attention == "default"
    assert plan_for("cpu").attention == "default" and plan_from_env("cpu", "auto").attention == "default"


@pytest.mark.parametrize(("value", "message"), [
    ("attention=sparse-flex,sparse_keep=0", "sparse_keep=0.0 is not a number in (0, 1]"),
    ("attention=sparse-flex,sparse_keep=1.5", "sparse_keep=1.5 is not a number in (0, 1]"),
    ("attention=sparse-flex,sparse_keep=nan", "sparse_keep=nan is not a number in (0, 1]"),
    ("attention=sparse-flex,sparse_keep=much", "sparse_keep='much' is not a number"),
    ("sparse_keep=0.2", "sparse_keep=0.2 needs attention=sparse-flex (attention=default)"),
    ("attention=sparse-flex,parallel=ulysses:2",
     "attention=sparse-flex cannot run with parallel=ulysses:2: the 8-bit and sparse kernels are not context-parallel"),
    ("attention=sparse", "attention='sparse' (one of default, cudnn, flash, sage-int8, cudnn-fp8, fa3-fp8, sparse-flex)"),
])
def test_bad_sparse_levers_are_one_line(value, message):
    with pytest.raises(RuntimePlanError) as exc:
        plan_from_env("cpu", value)
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"GPUBAKE_RUNTIME={value!r}: ") and message in text


def test_render_with_sparse_flex_runs_the_sparse_kernel(run_selftest, demo_spec, no_gpu, monkeypatch):
    """GPUBAKE_RUNTIME=attention=sparse-flex through the self-test: both experts' self-attention
    modules are switched, the render passes, and every self-attention call of the clip ran
    block-sparse (the tiny clip is shorter than MIN_TOKENS, so the test lowers it)."""
    monkeypatch.setenv("GPUBAKE_RUNTIME", "attention=sparse-flex,sparse_keep=0.5")
    monkeypatch.setattr(S, "MIN_TOKENS", 16)
    calls: list[tuple[int, int, float]] = []
    real = S.flex_sparse_attention

    def counting(q, k, v, keep, scale=None, **kw):
        calls.append((q.shape[-2], k.shape[-2], keep))
        return real(q, k, v, keep, scale, **kw)

    monkeypatch.setattr(S, "flex_sparse_attention", counting)
    report = run_selftest(demo_spec, no_gpu)
    assert report.verdict == "pass", report.summary()
    runtime = report.stage("render").values["runtime"]
    assert runtime["plan"]["attention"] == "sparse-flex" and runtime["plan"]["sparse_keep"] == 0.5
    for name in ("transformer", "transformer_2"):
        blocks = len(getattr(report.pipeline, name).blocks)
        assert runtime["applied"][name]["sparse_attention_modules"] == blocks > 0
        assert runtime["applied"][name]["lowp_attention_modules"] == 0
    assert calls and all(q == k >= 16 and keep == 0.5 for q, k, keep in calls)  # self-attention only


LX = "wan2.2-t2v-a14b-lightx2v-4step"


def test_the_lightx2v_model_declares_sparse_attention_and_the_environment_still_wins():
    """LightX2V's checkpoint was distilled with 90 % sparse attention: its registry entry says so
    (`runtime`) for the families where it ran (Hopper, the CPU), over the architecture's plan;
    $GPUBAKE_RUNTIME overrides it, `plain` drops it, other families stay dense."""
    from gpubake.provisioning.models import get_model

    levers = dict(get_model(LX).runtime)
    assert levers == {"cpu": "attention=sparse-flex,sparse_keep=0.1", "hopper": "attention=sparse-flex,sparse_keep=0.1"}
    assert get_model(LX).runtime_for("ada") == "" and get_model("wan2.2-t2v-a14b").runtime == ()
    plan = plan_from_env("cpu", "auto", model_levers=levers, model_id=LX)
    assert plan.attention == "sparse-flex" and plan.sparse_keep == 0.1
    assert plan_from_env("cpu", "auto", model_levers={"hopper": levers["hopper"]}).attention == "default"
    assert plan_from_env("cpu", "vae_tiling=1", model_levers=levers).attention == "sparse-flex"
    dense = plan_from_env("cpu", "attention=default", model_levers=levers)
    assert dense.attention == "default" and dense.sparse_keep == SPARSE_KEEP
    assert plan_from_env("cpu", "plain", model_levers=levers).attention == "default"
    # one clip across GPUs: the sparse kernel is no context-parallel backend, so dense, and said
    par = plan_from_env("cpu", "auto", model_levers=levers, model_id=LX, world_size=2)
    assert par.parallel != "none" and par.attention == "default"
    assert f"model {LX} runtime: sparse attention (sparse-flex) off: parallel=" in par.notes
    par = plan_from_env("cpu", "parallel=ulysses:2", model_levers=levers)
    assert par.attention == "default" and "sparse-flex" in par.notes


def test_every_models_own_levers_make_a_plan_and_a_bad_one_is_one_line():
    from gpubake.provisioning.models import list_models

    for m in list_models():
        for family, levers in m.runtime:
            plan_from_env("cpu", "auto", model_levers={"cpu": levers}, model_id=m.id)
    with pytest.raises(RuntimePlanError) as exc:
        plan_from_env("cpu", "auto", model_levers={"cpu": "attention=sparse"}, model_id="x")
    assert str(exc.value).startswith("model x runtime='attention=sparse': ") and "\n" not in str(exc.value)


def test_a_runtime_table_naming_no_family_is_one_line(monkeypatch):
    from gpubake.provisioning import models

    with pytest.raises(models.ModelError, match=r"entry 'm': runtime.volta = 'x': a family \(ada, ampere, blackwell, cpu, hopper, other\) = a lever"):
        models._parse_runtime("m", {"volta": "x"})
    with pytest.raises(models.ModelError, match="runtime must be a table"):
        models._parse_runtime("m", "attention=sparse-flex")


def test_the_serving_loader_reads_the_model_from_the_checkpoints_manifest(tmp_path):
    from gpubake.provisioning.manifest import build_manifest, write_manifest
    from gpubake.provisioning.pipeline import model_runtime

    assert model_runtime(tmp_path) == (None, {})
    (tmp_path / "model_index.json").write_text("{}")
    write_manifest(tmp_path, build_manifest(tmp_path, fmt="nvfp4", model_id=LX))
    mid, levers = model_runtime(tmp_path)
    assert mid == LX and levers["hopper"] == "attention=sparse-flex,sparse_keep=0.1" and "ada" not in levers
    write_manifest(tmp_path, build_manifest(tmp_path, fmt="nvfp4", model_id="someone-elses"))
    assert model_runtime(tmp_path) == ("someone-elses", {})


def test_the_kernels_refused_under_context_parallelism_are_the_8bit_ones_and_the_sparse_one():
    from gpubake.kernels.attention import LOWP_KERNELS
    from gpubake.provisioning.runtime import NOT_CONTEXT_PARALLEL

    assert NOT_CONTEXT_PARALLEL == (*LOWP_KERNELS, "sparse-flex")

"""Runtime levers of the denoising step (gpubake.provisioning.runtime), on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpubake.kernels.backends import get_backend
from gpubake.kernels.format import quantize_ref
from gpubake.kernels.fp8_ref import nvfp4_to_fp8_ref
from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning import runtime
from gpubake.provisioning.runtime import (RuntimePlan, RuntimePlanError, apply_plan, apply_runtime, attention_context,
                                          cfg_forward, plan_for, small_m_layers)
from gpubake.provisioning.tiny import TRANSFORMER_CONFIG


@pytest.fixture(scope="module")
def tiny_nvfp4_model():
    """The tiny Wan expert (float32) with every block linear swapped for NVFP4Linear."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith("blocks."):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NVFP4Linear.from_linear(mod))
    return model


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 16, 2, 8, 8, generator=g)
    cond = torch.randn(1, 8, TRANSFORMER_CONFIG["text_dim"], generator=g)
    uncond = torch.randn(1, 8, TRANSFORMER_CONFIG["text_dim"], generator=g)
    return lat, torch.tensor([900]), cond, uncond


@pytest.fixture
def hopper_backend():
    b = get_backend("hopper-fp8")
    before = b.fuse_act_quant_when_compiling
    yield b
    b.fuse_act_quant_when_compiling = before


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make `plan_for` see a GPU of capability `cap` with `gib` GiB (None: the CPU), the
    cuDNN frontend wheel present or not and the FA3 wheel present or not (this venv has neither)."""
    from types import SimpleNamespace

    from gpubake.kernels import attention_fa3, attention_fp8

    def fake(cap: tuple[int, int] | None, gib: float = 80, wheel: bool = False, fa3: bool = False) -> None:
        monkeypatch.setattr(runtime, "capability", lambda dev: cap)
        monkeypatch.setattr(runtime.torch.cuda, "get_device_properties",
                            lambda dev: SimpleNamespace(total_memory=int(gib * 2**30)))
        monkeypatch.setattr(attention_fp8, "cudnn_frontend_available", lambda: wheel)
        monkeypatch.setattr(attention_fa3, "fa3_available", lambda: fa3)
        monkeypatch.setattr(runtime, "_ATTENTION_CHECKS", {})  # checks are cached per process
        # no GPU here to run the kernel: the check of an installed kernel passes unless a test says not
        monkeypatch.setattr(runtime, "_attention_selfcheck", lambda kernel, dev: {"kernel": kernel, "ok": True})
        monkeypatch.setattr(runtime, "fused_selfcheck", lambda lever, dev: {"ok": True})

    return fake


@pytest.mark.parametrize("cap, arch, backend, compiled", [
    (None, "cpu", "cpu-reference", False),
    ((9, 0), "hopper", "hopper-fp8", True),
    ((8, 9), "ada", "hopper-fp8", False),
    ((8, 6), "ampere", "dequant-bf16", False),
    ((12, 0), "blackwell", "blackwell-native", False),
])
def test_plan_follows_the_kernels_dispatch(fake_gpu, cap, arch, backend, compiled):
    fake_gpu(cap)
    plan = plan_for("cpu" if cap is None else "cuda")
    assert (plan.arch, plan.gemm_backend, plan.compile_blocks) == (arch, backend, compiled)
    assert plan.vae_conv_pad is compiled  # measured on Hopper only (cuDNN's kernel choice is per architecture)
    assert plan.vae_fused_norm is compiled  # measured on Hopper only (10 % of the eager decode)
    assert not plan.fuse_qkv  # measured on Hopper: no gain
    assert plan.fuse_qk_rope is compiled  # measured on Hopper only (2 % a forward)
    assert not plan.vae_compile  # its compile per clip size is not worth a clip's second by default
    # levers measured as no gain on Hopper stay off everywhere
    assert not plan.cfg_batch and not plan.cache_small_m and not plan.fuse_act_quant
    assert plan.attention == "default"  # no cuDNN frontend wheel
    assert (plan.text_encoder, plan.vae_tiling) == ("keep", False)  # 80 GiB: room for the full model


@pytest.mark.parametrize("fa3, wheel, attention", [
    (True, True, "fa3-fp8"), (True, False, "fa3-fp8"), (False, True, "cudnn-fp8"), (False, False, "default")])
def test_hopper_plan_takes_the_fastest_fp8_attention_whose_wheel_imports(fake_gpu, fa3, wheel, attention):
    fake_gpu((9, 0), wheel=wheel, fa3=fa3)
    plan = plan_for("cuda")
    assert (plan.arch, plan.compile_blocks, plan.attention) == ("hopper", True, attention)
    fake_gpu((12, 0), wheel=wheel, fa3=fa3)  # not measured there (and FA3 is sm_90 code): no FP8 attention
    assert plan_for("cuda").attention == "default"


def test_hopper_plan_skips_a_kernel_that_fails_its_check_on_this_gpu(fake_gpu, monkeypatch):
    fake_gpu((9, 0), wheel=True, fa3=True)
    calls = []

    def check(kernel, dev):
        calls.append((kernel, str(dev)))
        ok = kernel != "fa3-fp8"  # e.g. a wheel built for another GPU: loads, computes garbage
        return {"kernel": kernel, "ok": ok, **({} if ok else {"reason": "relative error 1.41 against its reference > 0.05"})}

    monkeypatch.setattr(runtime, "_attention_selfcheck", check)
    assert plan_for("cuda").attention == "cudnn-fp8"
    assert plan_for("cuda").attention == "cudnn-fp8"
    assert calls == [("fa3-fp8", "cuda"), ("cudnn-fp8", "cuda")]  # once per process and device
    checks = runtime.attention_checks("cuda")  # the attention kernels', then the fused passes'
    assert [(c["kernel"], c["ok"]) for c in checks] == [("fa3-fp8", False), ("cudnn-fp8", True),
                                                        ("qk-norm-rope", True), ("vae-rms-norm-silu", True)]
    assert runtime.attention_checks("cpu") == []


def test_attention_check_without_the_wheel_runs_nothing(fake_gpu, monkeypatch):
    fake_gpu((9, 0), wheel=False, fa3=False)
    monkeypatch.setattr(runtime, "_attention_selfcheck", lambda k, d: pytest.fail("ran a kernel with no wheel"))
    assert plan_for("cuda").attention == "default"
    assert [c.get("reason") for c in runtime.attention_checks("cuda")] == ["wheel not installed"] * 2 + [None] * 2


@pytest.mark.parametrize("cap", [(9, 0), (8, 9), (12, 0)])
def test_small_cards_shrink_the_text_encoder_and_tile_the_vae(fake_gpu, cap):
    fake_gpu(cap, gib=23.6, wheel=True)  # a 24 GB card as torch reports it
    plan = plan_for("cuda")
    assert (plan.text_encoder, plan.vae_tiling, plan.expert_offload) == ("shrink", True, True)
    assert plan.compile_blocks == (cap == (9, 0))  # the architecture's levers still apply
    fake_gpu(cap, gib=31.4, wheel=True)  # a 32 GB card: both experts fit beside the shrunk encoder
    plan = plan_for("cuda")
    assert (plan.text_encoder, plan.vae_tiling, plan.expert_offload) == ("shrink", True, False)
    fake_gpu(cap, gib=runtime.SMALL_CARD_GIB)
    plan = plan_for("cuda")
    assert (plan.text_encoder, plan.expert_offload) == ("keep", False)


def test_bad_attention_choice_is_a_one_line_error():
    with pytest.raises(RuntimePlanError,
                       match=r"^runtime plan hopper: attention='sage' \(one of default, cudnn, flash, sage-int8, cudnn-fp8, fa3-fp8, sparse-flex\)$"):
        RuntimePlan(arch="hopper", gemm_backend="hopper-fp8", attention="sage")


def test_bad_text_encoder_choice_is_a_one_line_error():
    with pytest.raises(RuntimePlanError, match=r"^runtime plan cpu: text_encoder='big' \(one of keep, shrink\)$"):
        plan_for("cpu").with_(text_encoder="big")


def test_env_naming_an_8bit_kernel_on_a_gpu_runs_its_check(fake_gpu, monkeypatch):
    fake_gpu((8, 9), wheel=True, fa3=True)  # e.g. an L40S: FA3's wheel imports, its sm_90 code cannot run
    monkeypatch.setattr(runtime, "_attention_selfcheck", lambda kernel, dev: {
        "kernel": kernel, "ok": kernel != "fa3-fp8",
        "reason": "RuntimeError: no kernel image is available for execution on the device"})
    with pytest.raises(RuntimePlanError, match=r"^GPUBAKE_RUNTIME='attention=fa3-fp8': attention=fa3-fp8 cannot run on "
                                               r"cuda: RuntimeError: no kernel image is available"):
        runtime.plan_from_env("cuda", "attention=fa3-fp8")
    assert runtime.plan_from_env("cuda", "attention=cudnn-fp8").attention == "cudnn-fp8"
    fake_gpu((8, 9), wheel=False, fa3=False)
    with pytest.raises(RuntimePlanError, match=r"attention=cudnn-fp8 cannot run on cuda: wheel not installed$"):
        runtime.plan_from_env("cuda", "attention=cudnn-fp8")
    assert runtime.plan_from_env("cpu", "attention=cudnn-fp8").attention == "cudnn-fp8"  # the CPU runs references


def test_env_sets_the_text_encoder_and_fp8_attention():
    assert plan_for("cpu").text_encoder == "keep"
    plan = runtime.plan_from_env("cpu", "text_encoder=shrink,attention=cudnn-fp8")
    assert (plan.arch, plan.text_encoder, plan.attention) == ("cpu", "shrink", "cudnn-fp8")
    with pytest.raises(RuntimePlanError, match=r"^GPUBAKE_RUNTIME='text_encoder=big': .*text_encoder='big' "
                                               r"\(one of keep, shrink\)$"):
        runtime.plan_from_env("cpu", "text_encoder=big")


def test_sage_int8_is_a_plan_value():
    plan = RuntimePlan(arch="x", gemm_backend="bf16", attention="sage-int8")
    assert plan.attention == "sage-int8"
    q = torch.randn(1, 2, 4, 8)
    with attention_context(plan):  # set on the model by apply_plan: SDPA stays unrestricted
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_cfg_batched_equals_two_passes(tiny_nvfp4_model, inputs):
    with torch.inference_mode():
        c1, u1 = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
        c2, u2 = cfg_forward(tiny_nvfp4_model, *inputs, batched=True)
    assert c1.shape == (1, 16, 2, 8, 8)
    assert not torch.allclose(c1, u1)  # the two text contexts really differ
    torch.testing.assert_close(c2, c1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u2, u1, rtol=1e-4, atol=1e-5)


def test_cfg_rejects_text_contexts_of_different_shape(tiny_nvfp4_model, inputs):
    lat, t, cond, _ = inputs
    with pytest.raises(RuntimePlanError, match=r"text contexts differ in shape \(1, 8, 32\) vs \(1, 5, 32\)"):
        cfg_forward(tiny_nvfp4_model, lat, t, cond, cond[:, :5], batched=True)


def test_small_m_layers_are_the_cross_attention_kv(tiny_nvfp4_model):
    n = TRANSFORMER_CONFIG["num_layers"]
    assert small_m_layers(tiny_nvfp4_model) == [f"blocks.{i}.attn2.{p}" for i in range(n) for p in ("to_k", "to_v")]


def test_cache_small_m_marks_only_those_and_keeps_the_output(tiny_nvfp4_model, inputs):
    plain = plan_for("cpu")
    with torch.inference_mode():
        ref = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
        done = apply_plan(tiny_nvfp4_model, plain.with_(cache_small_m=True))
        kept = {n for n, m in tiny_nvfp4_model.named_modules()
                if isinstance(m, NVFP4Linear) and m.keep_runtime_weight}
        out = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
        apply_plan(tiny_nvfp4_model, plain)
    assert done["cached_small_m_layers"] == 2 * TRANSFORMER_CONFIG["num_layers"]
    assert kept == set(small_m_layers(tiny_nvfp4_model))
    assert not any(m.keep_runtime_weight for m in tiny_nvfp4_model.modules() if isinstance(m, NVFP4Linear))
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_hopper_cached_fp8_weight_is_the_reference_reexpression(hopper_backend):
    w = quantize_ref(torch.randn(48, 64, generator=torch.Generator().manual_seed(2)))
    pw = hopper_backend.prepare(w)
    assert "fp8_weight" not in pw.extras
    hopper_backend.cache_weight(pw)
    wq, ws = pw.extras["fp8_weight"]
    rq, rs = nvfp4_to_fp8_ref(w)
    assert torch.equal(wq.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(ws, rs)


def test_compile_blocks_is_regional_and_reversible(tiny_nvfp4_model, hopper_backend):
    plain = plan_for("cpu")
    hop = RuntimePlan(arch="hopper", gemm_backend="hopper-fp8", compile_blocks=True, fuse_act_quant=True)
    done = apply_plan(tiny_nvfp4_model, hop)  # torch.compile is lazy: nothing compiles here
    blocks = list(tiny_nvfp4_model.blocks)
    assert done["compiled_blocks"] == len(blocks) == TRANSFORMER_CONFIG["num_layers"]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert tiny_nvfp4_model._compiled_call_impl is None  # the blocks, not the whole model
    assert hopper_backend.fuse_act_quant_when_compiling
    apply_plan(tiny_nvfp4_model, plain.with_(gemm_backend="hopper-fp8"))
    assert all(b._compiled_call_impl is None for b in blocks)
    assert not hopper_backend.fuse_act_quant_when_compiling
    apply_plan(tiny_nvfp4_model, plain)  # the module's other tests run it on the CPU: bind its backend again


def test_compile_blocks_needs_repeated_blocks():
    with pytest.raises(RuntimePlanError, match="compile_blocks: Sequential declares no _repeated_blocks"):
        apply_plan(nn.Sequential(nn.Linear(4, 4)), plan_for("cpu").with_(compile_blocks=True))


def test_attention_context_restricts_sdpa():
    q = torch.randn(1, 2, 4, 8)
    with attention_context(plan_for("cpu")):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # default: the CPU math path
    with attention_context(plan_for("cpu").with_(attention="cudnn")), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # cuDNN only: none on the CPU


def test_apply_runtime_covers_both_experts(tiny_nvfp4_checkpoint):
    from gpubake.provisioning.loader import load_pipeline

    pipe = load_pipeline(tiny_nvfp4_checkpoint, device="cpu")
    nothing = {"cached_small_m_layers": 0, "compiled_blocks": 0, "lowp_attention_modules": 0, "fused_qkv_modules": 0,
               "fused_qk_rope_modules": 0, "fused_ffn_gelu_modules": 0,
               "fused_norm_quant_blocks": 0}
    experts = ("transformer", "transformer_2")
    done = apply_runtime(pipe)  # CPU plan
    assert {e: done[e] for e in experts} == {e: nothing for e in experts} and "text_encoder" not in done
    hop = RuntimePlan(arch="hopper", gemm_backend="hopper-fp8", compile_blocks=True)
    done = apply_runtime(pipe, hop)
    n = TRANSFORMER_CONFIG["num_layers"]
    assert {e: done[e] for e in experts} == {e: {**nothing, "compiled_blocks": n} for e in experts}
    assert all(b._compiled_call_impl is not None for b in pipe.transformer_2.blocks)


def _moved(monkeypatch) -> list[str]:
    """Class names of the modules `.to()` is called on from now on."""
    moved: list[str] = []
    to = nn.Module.to

    def spy(self, *args, **kwargs):
        moved.append(type(self).__name__)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    return moved


def test_load_pipeline_leaves_host_components_alone(tiny_checkpoint, monkeypatch):
    from gpubake.provisioning.loader import load_pipeline

    moved = _moved(monkeypatch)
    load_pipeline(tiny_checkpoint, "cpu")
    assert "UMT5EncoderModel" in moved and "AutoencoderKLWan" in moved
    moved.clear()
    pipe = load_pipeline(tiny_checkpoint, "cpu", host_components=("text_encoder",))
    assert "UMT5EncoderModel" not in moved and "AutoencoderKLWan" in moved  # the rest still goes to the device
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"


def test_apply_runtime_shrinks_the_text_encoder(tiny_nvfp4_checkpoint):
    from gpubake.provisioning.loader import load_pipeline

    pipe = load_pipeline(tiny_nvfp4_checkpoint, "cpu", host_components=("text_encoder",))
    assert "text_encoder" not in apply_runtime(pipe, plan_for("cpu"))  # keep: untouched
    assert any(isinstance(m, nn.Linear) for m in pipe.text_encoder.modules())
    done = apply_runtime(pipe, plan_for("cpu").with_(text_encoder="shrink"))
    layers = pipe.text_encoder.config.num_layers  # q, k, v, o, wi_0, wi_1, wo -> FP8 weights
    assert done["text_encoder"] == {"fp8_linears": 7 * layers, "host_embeddings": 0,
                                    "gpu_bytes": 0}  # the tiny vocabulary is under the host-table size
    assert not any(isinstance(m, nn.Linear) for m in pipe.text_encoder.modules())
    assert {"transformer", "transformer_2", "text_encoder"} <= set(done)
    emb = pipe.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.isfinite(emb).all() and emb.abs().sum() > 0


def test_serving_pipeline_leaves_the_encoder_on_the_host_only_to_shrink_it(tiny_nvfp4_checkpoint, monkeypatch):
    from gpubake.provisioning import loader
    from gpubake.provisioning.pipeline import load_serving_pipeline

    calls: list[dict] = []
    real = loader.load_pipeline

    def spy(path, device, **kwargs):
        calls.append(kwargs)
        return real(path, device, **kwargs)

    monkeypatch.setattr(loader, "load_pipeline", spy)
    monkeypatch.setenv(runtime.ENV_VAR, "text_encoder=shrink")
    served = load_serving_pipeline(tiny_nvfp4_checkpoint, "cpu")
    assert calls == [{"host_components": ("text_encoder",), "require_manifest": True}]  # served: manifest or nothing
    assert served.plan.text_encoder == "shrink" and served.applied["text_encoder"]["fp8_linears"] > 0
    monkeypatch.setenv(runtime.ENV_VAR, "auto")  # the CPU plan keeps it
    assert "text_encoder" not in load_serving_pipeline(tiny_nvfp4_checkpoint, "cpu").applied
    assert calls[1] == {"host_components": (), "require_manifest": True}


def test_apply_runtime_needs_a_transformer():
    with pytest.raises(RuntimePlanError, match="apply_runtime: object has no transformer"):
        apply_runtime(object())


@pytest.fixture(scope="module")
def tiny_wan_head64():
    """A tiny bf16 Wan expert with 8-bit-eligible self-attention (2 heads of 64, 1152 video
    tokens) and its forward on fixed inputs (TRANSFORMER_CONFIG's head dim 32 is not eligible)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TRANSFORMER_CONFIG, "attention_head_dim": 64, "ffn_dim": 64,
                                     "num_layers": 2}).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 16, 2, 48, 48, generator=g).bfloat16()
    ctx = torch.randn(1, 8, TRANSFORMER_CONFIG["text_dim"], generator=g).bfloat16()

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(hidden_states=lat, timestep=torch.tensor([900]), encoder_hidden_states=ctx,
                         return_dict=False)[0]

    yield model, forward
    apply_plan(model, plan_for("cpu"))


def test_apply_plan_sage_int8_and_back(tiny_wan_head64):
    model, forward = tiny_wan_head64
    plain = plan_for("cpu")
    ref = forward()
    done = apply_plan(model, plain.with_(attention="sage-int8"))
    assert done["lowp_attention_modules"] == len(model.blocks) == 2
    int8 = forward()
    assert not torch.equal(int8, ref)  # the self-attention really changed kernel
    assert ((int8.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2  # ... to 8-bit error
    assert apply_plan(model, plain)["lowp_attention_modules"] == 0
    assert torch.equal(forward(), ref)


def test_plan_records_and_binds_the_backend_the_environment_names(fake_gpu, monkeypatch, tiny_nvfp4_model):
    """$GPUBAKE_NVFP4_BACKEND is resolved once, for the plan's device; applying the plan binds
    it to every NVFP4 layer (what the layers then run, whatever the environment says later)."""
    from gpubake.errors import KernelError
    from gpubake.kernels import backends
    from gpubake.kernels.linear import bound_backends
    from gpubake.provisioning.pipeline import check_runtime_env

    fake_gpu((9, 0))
    monkeypatch.setenv(backends.ENV_VAR, "dequant-bf16")  # not the H100's default (hopper-fp8)
    plan = plan_for("cuda")
    assert (plan.arch, plan.gemm_backend) == ("hopper", "dequant-bf16")
    assert runtime.plan_from_env("cuda", "plain").gemm_backend == "dequant-bf16"
    monkeypatch.setenv(backends.ENV_VAR, "blackwell-native")
    with pytest.raises(KernelError, match=r"^GPUBAKE_NVFP4_BACKEND=blackwell-native: needs sm_100, .*is sm_90$"):
        plan_for("cuda")
    check_runtime_env()  # the startup check parses on the CPU: the GPU's verdict comes with its plan
    monkeypatch.setenv(backends.ENV_VAR, "fast-please")
    with pytest.raises(KernelError, match="unknown backend 'fast-please'"):
        check_runtime_env()
    monkeypatch.delenv(backends.ENV_VAR)
    n = sum(isinstance(m, NVFP4Linear) for m in tiny_nvfp4_model.modules())
    apply_plan(tiny_nvfp4_model, plan)
    assert bound_backends(tiny_nvfp4_model) == {"dequant-bf16": n}
    apply_plan(tiny_nvfp4_model, RuntimePlan(arch="cpu", gemm_backend="cpu-reference"))  # back, uncompiled
    assert bound_backends(tiny_nvfp4_model) == {"cpu-reference": n}


def test_fuse_qkv_gives_the_same_prediction_and_the_same_keys(tiny_nvfp4_model, inputs):
    """fuse_qkv on the tiny NVFP4 expert (cpu-reference: the parts one after another, so the
    same prediction bit for bit): every self-attention fused, no cross-attention, the state
    dict's keys unchanged, and back to three projections when off."""
    from gpubake.kernels.linear import FusedNVFP4Projection

    plain = plan_for("cpu")
    keys = set(tiny_nvfp4_model.state_dict())
    with torch.inference_mode():
        ref = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
        done = apply_plan(tiny_nvfp4_model, plain.with_(fuse_qkv=True))
        fused = [m for m in tiny_nvfp4_model.modules() if isinstance(getattr(m, "to_qkv", None), FusedNVFP4Projection)]
        assert set(tiny_nvfp4_model.state_dict()) == keys
        assert all(not m.is_cross_attention and m.fused_projections for m in fused)
        calls = []
        hooks = [m.to_qkv.register_forward_hook(lambda *_: calls.append(1)) for m in fused]
        out = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
        for h in hooks:
            h.remove()
        assert len(calls) == 2 * len(fused)  # diffusers' processor ran each fused projection (two CFG passes)
        again = apply_plan(tiny_nvfp4_model, plain)
    n = TRANSFORMER_CONFIG["num_layers"]
    assert done["fused_qkv_modules"] == n == len(fused) and again["fused_qkv_modules"] == 0
    assert not any(hasattr(m, "to_qkv") or getattr(m, "fused_projections", False) for m in fused)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_fuse_qk_rope_on_a_cpu_without_the_interpreter_is_one_line(tiny_nvfp4_model, monkeypatch):
    """The fused Q/K norm + RoPE is a Triton kernel: asked for where none runs, the plan says so
    when applied, before a forward, and leaves the processors as they were."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plain = RuntimePlan(arch="cpu", gemm_backend="cpu-reference")
    with pytest.raises(RuntimePlanError, match=r"^fuse_qk_rope=1: .* needs a CUDA device \(the model is on cpu;"):
        apply_plan(tiny_nvfp4_model, plain.with_(fuse_qk_rope=True))
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tiny_nvfp4_model.blocks)
    assert apply_plan(tiny_nvfp4_model, plain)["fused_qk_rope_modules"] == 0


def test_fuse_norm_quant_on_a_cpu_without_the_interpreter_is_one_line(tiny_nvfp4_model, monkeypatch):
    """The fused norm + FP8 quantization is a Triton kernel too: the same one line, the blocks'
    forwards left as they were."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plain = RuntimePlan(arch="cpu", gemm_backend="cpu-reference")
    with pytest.raises(RuntimePlanError, match=r"^fuse_norm_quant=1: .* needs a CUDA device \(the model is on cpu;"):
        apply_plan(tiny_nvfp4_model, plain.with_(fuse_norm_quant=True))
    assert all("forward" not in b.__dict__ for b in tiny_nvfp4_model.blocks)


def test_fuse_qk_rope_is_a_runtime_lever():
    assert runtime.plan_from_env("cpu", "fuse_qk_rope=1").fuse_qk_rope is True
    assert runtime.plan_from_env("cpu").fuse_qk_rope is False  # measured on Hopper only
    with pytest.raises(RuntimePlanError, match="fuse_qk_rope='2' is not a boolean"):
        runtime.plan_from_env("cpu", "fuse_qk_rope=2")


def test_a_gpu_where_a_fused_pass_disagrees_gets_diffusers_path(fake_gpu, monkeypatch):
    """The Hopper plan's fusion levers run Triton passes: each is checked on the GPU first (once),
    and off with the reason in the plan's notes where it disagrees with its reference."""
    fake_gpu((9, 0))
    calls = []

    def check(lever, dev):
        calls.append(lever)
        return {"ok": lever != "fuse_qk_rope", **({"reason": "12.5% of the values bit-equal (want >= 99%)"}
                                                   if lever == "fuse_qk_rope" else {})}

    monkeypatch.setattr(runtime, "fused_selfcheck", check)
    plan = plan_for("cuda")
    assert plan.fuse_qk_rope is False and plan.vae_fused_norm is True and plan.compile_blocks  # the rest stands
    assert "fuse_qk_rope off: the fused Q/K norm + RoPE disagrees with its reference on this GPU (12.5%" in plan.notes
    plan_for("cuda")
    assert sorted(calls) == ["fuse_qk_rope", "vae_fused_norm"]  # the levers the plan has, once per process
    checks = {c["kernel"]: c for c in runtime.attention_checks("cuda")}
    assert checks["qk-norm-rope"]["ok"] is False and checks["qk-norm-rope"]["lever"] == "fuse_qk_rope"
    assert checks["vae-rms-norm-silu"]["ok"] is True


def test_fuse_ffn_gelu_moves_the_gelu_and_keeps_the_prediction(tiny_nvfp4_model, inputs):
    """The FFN's GELU in the down-projection (here the CPU reference's: before its GEMM; a fusing
    backend's: tests/kernels/test_linear.py): the same prediction bit for bit, the same state dict;
    off puts the GELU back in the FFN."""
    plain = RuntimePlan(arch="cpu", gemm_backend="cpu-reference")
    apply_plan(tiny_nvfp4_model, plain)
    keys = list(tiny_nvfp4_model.state_dict())
    with torch.inference_mode():
        want = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
    done = apply_plan(tiny_nvfp4_model, plain.with_(fuse_ffn_gelu=True))
    blocks = tiny_nvfp4_model.blocks
    assert done["fused_ffn_gelu_modules"] == len(blocks)
    assert all(b.ffn.net[2].input_activation == "gelu_tanh" and "gelu" in b.ffn.net[0].__dict__ for b in blocks)
    with torch.inference_mode():
        got = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert list(tiny_nvfp4_model.state_dict()) == keys
    assert apply_plan(tiny_nvfp4_model, plain)["fused_ffn_gelu_modules"] == 0
    assert all(b.ffn.net[2].input_activation is None and "gelu" not in b.ffn.net[0].__dict__ for b in blocks)


def test_fuse_ffn_gelu_compiles_with_the_blocks(tiny_nvfp4_model, inputs):
    """Under regional compile dynamo traces the GELU module's instance attribute (the skipped
    GELU) and the layer's input activation: the compiled prediction is the eager one."""
    import torch._dynamo

    plain = RuntimePlan(arch="cpu", gemm_backend="cpu-reference")
    apply_plan(tiny_nvfp4_model, plain.with_(fuse_ffn_gelu=True))
    with torch.inference_mode():
        want = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
    try:
        apply_plan(tiny_nvfp4_model, plain.with_(fuse_ffn_gelu=True, compile_blocks=True))
        with torch.inference_mode():
            got = cfg_forward(tiny_nvfp4_model, *inputs, batched=False)
    finally:
        apply_plan(tiny_nvfp4_model, plain)
        torch._dynamo.reset()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

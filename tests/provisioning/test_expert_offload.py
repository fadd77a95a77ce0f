"""provisioning.expert_offload: one A14B expert on the device at a time. On the CPU the
"device" and the host are one memory, so these tests check the bookkeeping (which expert's
tensors are the host copies, when each is swapped in, the prepared NVFP4 weights dropped,
the same clip) and the plan and loader plumbing; the memory it saves is a GPU measurement."""

from __future__ import annotations

import pytest
import torch

from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning.expert_offload import ExpertOffload, apply_expert_offload
from gpubake.provisioning.runtime import apply_runtime, plan_from_env


def _clip(pipe):
    with torch.inference_mode():
        return pipe("a fox in the snow", height=64, width=64, num_frames=5, num_inference_steps=4,
                    guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator().manual_seed(1),
                    output_type="latent").frames.float()


def _ptrs(model):
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.fixture(scope="module")
def nvfp4_pipe(tiny_nvfp4_checkpoint):
    from gpubake.provisioning.loader import load_pipeline

    p = load_pipeline(tiny_nvfp4_checkpoint, "cpu")
    p.set_progress_bar_config(disable=True)
    return p


def test_one_expert_is_swapped_in_per_boundary_and_the_clip_is_unchanged(nvfp4_pipe):
    pipe = nvfp4_pipe
    base = _clip(pipe)
    done = apply_expert_offload(pipe, True, "cpu")
    off: ExpertOffload = pipe._gpubake_expert_offload
    try:
        assert done["expert_offload"] == "on" and done["expert_bytes"] > 0
        assert off.active is None and off.on_device() == []  # nothing fetched before a forward
        host = {id(m): {n: t.data_ptr() for n, t in off.host[id(m)].items()} for m in (pipe.transformer, pipe.transformer_2)}
        calls = []
        spies = [pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(("high", off.on_device()))),
                 pipe.transformer_2.register_forward_pre_hook(lambda m, a: calls.append(("low", off.on_device())))]
        assert torch.equal(_clip(pipe), base)  # same clip, bit for bit
        for h in spies:
            h.remove()
        # every forward found its own expert, and only it, on the device (hooks run in order:
        # the offload's first); one swap in for each expert of the clip
        assert calls and all(on == [("transformer" if who == "high" else "transformer_2")] for who, on in calls)
        assert off.swaps == 2
        assert _ptrs(pipe.transformer) == host[id(pipe.transformer)]  # let go: back on its host copies
        again = _clip(pipe)
        assert torch.equal(again, base) and off.swaps == 4  # the next clip swaps the high-noise one back in
        layers = [m for m in pipe.transformer.modules() if isinstance(m, NVFP4Linear)]
        assert layers and all(m._prepared is None for m in layers)  # the let-go expert holds no prepared weight
        active = [m for m in pipe.transformer_2.modules() if isinstance(m, NVFP4Linear)]
        assert any(m._prepared is not None for m in active)  # the one on the device ran and prepared its own
    finally:
        apply_expert_offload(pipe, False, "cpu")
    assert pipe._gpubake_expert_offload is None and torch.equal(_clip(pipe), base)


def test_the_plan_lever_reaches_the_pipeline_and_one_expert_stored_twice_is_not_swapped(pipe):
    plan = plan_from_env("cpu", "expert_offload=1")
    assert plan.expert_offload and not plan_from_env("cpu", "auto").expert_offload
    try:
        done = apply_runtime(pipe, plan)
        assert done["experts"]["expert_offload"] == "on"
    finally:
        done = apply_runtime(pipe, plan_from_env("cpu", "plain"))
    assert "experts" not in done and pipe._gpubake_expert_offload is None

    class Twice:
        transformer = transformer_2 = pipe.transformer

    assert apply_expert_offload(Twice(), True, "cpu") == {"expert_offload": "off: one expert, nothing to swap"}


def test_the_serving_loader_keeps_the_experts_on_the_host_for_the_offload(tiny_nvfp4_checkpoint, monkeypatch):
    """expert_offload=1: the loader leaves the experts in host memory (no moment with both on the
    device) and the plan is applied on the serving device, not the experts' device."""
    from gpubake.provisioning import pipeline as P

    from gpubake.provisioning import loader, runtime

    seen = {}

    real_load, real_apply = loader.load_pipeline, runtime.apply_runtime

    def load(path, dev, **kw):
        seen["host_components"] = kw.get("host_components")
        return real_load(path, dev, **kw)

    def apply(pipe, plan, **kw):
        seen["device"] = kw.get("device")
        return real_apply(pipe, plan, **kw)

    monkeypatch.setattr(loader, "load_pipeline", load)
    monkeypatch.setattr(runtime, "apply_runtime", apply)
    monkeypatch.setenv("GPUBAKE_RUNTIME", "expert_offload=1")
    sp = P.load_serving_pipeline(tiny_nvfp4_checkpoint, "cpu")
    assert seen == {"host_components": ("transformer", "transformer_2"), "device": "cpu"}
    assert sp.applied["experts"]["expert_offload"] == "on" and sp.plan.expert_offload

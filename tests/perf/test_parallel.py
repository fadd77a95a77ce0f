"""One clip across processes: diffusers' context parallelism as gpubake plans and applies
it (`provisioning.parallel`, the runtime plan's ``parallel`` lever), on the CPU: 2
processes over gloo against one process, on the tiny model.

Bounds, and why:
* Ulysses is bit-exact (float32 and BF16, the transformer and a 2-step clip): after its
  all-to-all each rank runs plain attention over every token for half the heads, and
  every other op of the block works token by token, so each output element is computed
  by the same arithmetic as in one process.
* Ring is not: each rank merges the attention of its queries over the two halves of the
  keys with their log-sum-exp (an online softmax, summed in another order than one
  kernel over all keys) and in float32 (`convert_to_fp32`). The bound: 1e-5 of the
  output's magnitude in float32 (measured: 2e-7), one BF16 step at that magnitude
  (2**-7 relative) in BF16 (measured: 0.012 at 2.5), and for the BF16 clip, whose
  frames pass two steps of both experts and the VAE, 2**-4 at most and 5e-3 on average
  on frames in [0, 1] (measured: 0.031, i.e. 8/255, and 0.0026).
"""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import parallel_ranks as pr  # noqa: E402

from gpubake.provisioning.parallel import (  # noqa: E402
    Parallel,
    ParallelError,
    clip_tokens,
    enable_context_parallel,
    parallel_for,
)
from gpubake.provisioning.runtime import RuntimePlanError, plan_for, plan_from_env  # noqa: E402

WORLD = 2
RING_BOUND = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tiny_nvfp4_checkpoint: Path) -> list[dict]:
    """What both ranks computed (one spawn for the whole module: startup is the cost)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=pr.rank_main, args=(r, WORLD, port, str(tiny_nvfp4_checkpoint), q)) for r in
             range(WORLD)]
    for p in procs:
        p.start()
    got = [torch.load(io.BytesIO(q.get(timeout=240)), weights_only=False) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [g["error"] for g in got if "error" in g]
    assert not errors, errors[0]
    return sorted(got, key=lambda g: g["rank"])


@pytest.fixture(scope="module")
def single(tiny_nvfp4_checkpoint: Path) -> dict:
    """The same computations in this one process."""
    out = {str(dt): pr.forward(pr.transformer(dt), dt) for dt in (torch.float32, torch.bfloat16)}
    out["clip"], _ = pr.clip(tiny_nvfp4_checkpoint, "none")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ulysses_forward_is_bit_exact(ranks, single, dtype):
    for r in ranks:
        assert torch.equal(r[f"ulysses/{dtype}"], single[str(dtype)])  # every rank holds the gathered output
    assert ranks[0]["ulysses/info"]["self_attention_backend"] == "native"
    assert ranks[0]["ulysses/info"]["self_attention_modules"] == 3  # attn1 of the 3 blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_forward_within_its_bound(ranks, single, dtype):
    ref = single[str(dtype)].float()
    for r in ranks:
        got = r[f"ring/{dtype}"].float()
        diff = (got - ref).abs().max().item()
        assert diff <= RING_BOUND[dtype] * ref.abs().max().item(), diff
    assert torch.equal(ranks[0][f"ring/{dtype}"], ranks[1][f"ring/{dtype}"])  # gathered: the same on both ranks
    assert ranks[0]["ring/info"]["self_attention_backend"] == "_native_flash"  # an LSE-returning backend


def test_the_fused_qk_norm_rope_splits_as_diffusers_own(ranks, single):
    """The fused pass works token by token, on each rank's shard of tokens and rotary rows:
    Ulysses gives the one-process fused forward bit for bit, ring within its bound; and the
    fused forward is diffusers' own up to the sum of squares' order."""
    for r in ranks:
        assert torch.equal(r["ulysses/fused"], r["fused"])
        ref = r["fused"].float()
        assert (r["ring/fused"].float() - ref).abs().max().item() <= RING_BOUND[torch.bfloat16] * ref.abs().max().item()
    plain = single[str(torch.bfloat16)].float()
    assert ((ranks[0]["fused"].float() - plain).norm() / plain.norm()).item() < 1e-2


def test_ulysses_clip_is_bit_exact(ranks, single):
    assert single["clip"].shape == (9, 32, 32, 3)
    assert torch.equal(ranks[0]["ulysses/clip"], single["clip"]) and torch.equal(ranks[1]["ulysses/clip"],
                                                                                 single["clip"])
    done = ranks[0]["ulysses/clip_done"]["parallel"]
    assert done["parallel"] == "ulysses:2" and done["experts"] == ["transformer", "transformer_2"]
    assert done["anything"] is False  # the clip's 12 tokens divide by 2: diffusers' plain sharding


def test_ring_clip_within_its_bound(ranks, single):
    diff = (ranks[0]["ring/clip"] - single["clip"]).abs()
    assert diff.max().item() <= 2**-4 and diff.mean().item() <= 5e-3, (diff.max().item(), diff.mean().item())
    assert torch.equal(ranks[0]["ring/clip"], ranks[1]["ring/clip"])


# ---------------------------------------------------------------- the plan (no processes)


def test_parallel_values_parse_and_refuse():
    assert Parallel.parse("ulysses:8") == Parallel("ulysses", 8) and str(Parallel.parse("ring:2")) == "ring:2"
    assert not Parallel.parse("none").on
    for bad in ("ulysses", "ring:1", "ulysses:0", "tp:2", "ring:2x"):
        with pytest.raises(ParallelError, match="parallel="):
            Parallel.parse(bad)


def test_clip_tokens_of_wan_resolutions():
    assert clip_tokens(832, 480, 81) == 21 * 30 * 52 == 32760
    assert clip_tokens(1280, 720, 81) == 21 * 45 * 80 == 75600


@pytest.mark.parametrize(("world", "heads", "tokens", "want"), [
    (1, 40, 32760, "none"),
    (2, 40, 32760, "ulysses:2"),
    (8, 40, 75600, "ulysses:8"),
    (3, 40, 32760, "ring:3"),     # 40 heads do not divide by 3
    (8, 40, 4000, "none"),        # 500 tokens a rank: under MIN_TOKENS_PER_RANK
])
def test_parallel_for_the_group_and_the_clip(world, heads, tokens, want):
    par, why = parallel_for(world, heads=heads, tokens=tokens)
    assert str(par) == want and why


def test_plan_with_a_process_group_turns_fp8_attention_off_and_says_so(monkeypatch):
    """Hopper's plan takes an 8-bit attention kernel; with parallel on it runs BF16."""
    from gpubake.provisioning import runtime

    monkeypatch.setattr(runtime, "capability", lambda dev: (9, 0))
    monkeypatch.setattr(runtime.torch.cuda, "get_device_properties", lambda dev: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(runtime, "attention_check", lambda k, dev: {"kernel": k, "ok": True})
    monkeypatch.setattr(runtime, "fused_check", lambda lever, dev: {"ok": True})
    monkeypatch.setattr(runtime, "backend_name_for", lambda cap, dev: "hopper-fp8")
    alone = plan_for("cpu", world_size=1)
    assert alone.attention == "fa3-fp8" and alone.parallel == "none" and alone.notes == ""
    split = plan_for("cpu", world_size=2, heads=40, clip_tokens=32760)
    assert split.parallel == "ulysses:2" and split.attention == "default" and split.compile_blocks
    assert "fa3-fp8" in split.notes and "BF16" in split.notes
    # asked for through the environment: the same fallback, with the reason
    env = plan_from_env("cpu", "parallel=ring:2")
    assert env.parallel == "ring:2" and env.attention == "default" and "fa3-fp8" in env.notes


def test_an_8bit_kernel_and_parallel_together_is_a_one_line_error():
    with pytest.raises(RuntimePlanError, match="attention=cudnn-fp8 cannot run with parallel=ulysses:2"):
        plan_from_env("cpu", "parallel=ulysses:2,attention=cudnn-fp8")
    with pytest.raises(RuntimePlanError, match=r"GPUBAKE_RUNTIME='parallel=ulysses'.*none, ring:N or ulysses:N"):
        plan_from_env("cpu", "parallel=ulysses")


def test_enabling_without_a_process_group_names_torchrun():
    with pytest.raises(ParallelError, match="torch.distributed initialised .* torchrun"):
        enable_context_parallel(pr.transformer(torch.float32), Parallel("ulysses", 2))

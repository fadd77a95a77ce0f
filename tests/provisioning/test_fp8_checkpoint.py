"""FP8-weight checkpoints end to end on the CPU: make-tiny -> quantize --format fp8 -> the
manifest, the stored keys and dtypes, load_pipeline's FP8Linear layers, a forward close to
the BF16 model, the runtime's binding and report, refusals, and expert offload."""

from __future__ import annotations

import json

import pytest
import torch

from gpubake.cli import _run
from gpubake.kernels.fp8_linear import FP8Linear
from gpubake.kernels.linear import NVFP4Linear
from gpubake.provisioning import layout
from gpubake.provisioning.loader import checkpoint_format, load_pipeline
from gpubake.provisioning.manifest import read_manifest
from gpubake.provisioning.quantize import quantize_checkpoint
from testutil import tiny_forward


@pytest.fixture(scope="module")
def fp8_pipe(tiny_fp8_checkpoint):
    p = load_pipeline(tiny_fp8_checkpoint, "cpu")
    p.set_progress_bar_config(disable=True)
    return p


def test_manifest_and_stored_tensors(tiny_fp8_checkpoint, tiny_nvfp4_checkpoint):
    from safetensors import safe_open

    man = read_manifest(tiny_fp8_checkpoint)
    q = man["quantization"]
    assert man["format"] == q["format"] == "fp8" and q["scale_dtype"] == "float32"
    nvfp4 = read_manifest(tiny_nvfp4_checkpoint)["quantization"]
    assert set(q["layers"]) == set(nvfp4["layers"])  # the same policy picked the same linears
    assert all(v["sqnr_db"] > 28 for v in q["layers"].values())  # E4M3 per row: ~32 dB on Gaussian weights
    assert q["summary"]["sqnr_db_mean"] > nvfp4["summary"]["sqnr_db_mean"] + 8  # 8 bits beat 4
    shard = tiny_fp8_checkpoint / "transformer" / layout.SINGLE_FILE
    with safe_open(str(shard), framework="pt") as f:
        keys = set(f.keys())
        w, s = f.get_tensor("blocks.0.attn1.to_q.weight"), f.get_tensor("blocks.0.attn1.to_q.weight_scale")
        kept = f.get_tensor("proj_out.weight")
    assert (w.dtype, s.dtype, s.shape[1]) == (torch.float8_e4m3fn, torch.float32, 1) and s.shape[0] == w.shape[0]
    assert kept.dtype == torch.bfloat16 and "proj_out.weight_scale" not in keys  # outside the policy: BF16
    assert not any(k.endswith(".weight_packed") for k in keys)
    actual = layout.tensor_shapes([shard])
    assert layout.fp8_modules(actual) == {k.split("/", 1)[1] for k in q["layers"] if k.startswith("transformer/")}
    assert layout.quantized_modules(actual) == set()
    assert checkpoint_format(tiny_fp8_checkpoint) == "fp8"


def test_nvfp4_detection_does_not_take_fp8_and_back():
    """A [out, 1] weight_scale is an NVFP4 layer's block scales when in_features is 16."""
    nv = {"a.weight_packed": (8, 8), "a.weight_scale": (8, 1), "a.weight_global_scale": ()}
    f8 = {"b.weight": (8, 16), "b.weight_scale": (8, 1), "c.weight_scale": (8, 2)}
    assert layout.fp8_modules({**nv, **f8}) == {"b"}
    assert layout.quantized_modules({**nv, **f8}) == {"a"}


def test_load_pipeline_gives_fp8_layers_close_to_bf16(fp8_pipe, tiny_checkpoint):
    bf16 = load_pipeline(tiny_checkpoint, "cpu")
    for name in ("transformer", "transformer_2"):
        model = getattr(fp8_pipe, name)
        layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
        assert len(layers) == 30 and not any(isinstance(m, NVFP4Linear) for m in model.modules())
        q = model.blocks[0].attn1.to_q
        assert (q.weight.dtype, q.weight_scale.dtype, q.bias.dtype) == (torch.float8_e4m3fn, torch.float32,
                                                                         torch.bfloat16)
        assert model.proj_out.weight.dtype == torch.bfloat16
        y, ref = tiny_forward(model), tiny_forward(getattr(bf16, name))
        assert torch.isfinite(y).all()
        assert float((y - ref).norm() / ref.norm()) < 0.03  # measured 0.009


def test_runtime_binds_the_devices_fp8_path_and_reports_it(tiny_fp8_checkpoint, monkeypatch):
    from gpubake.provisioning.pipeline import gemm_backends
    from gpubake.provisioning.runtime import apply_runtime, plan_from_env

    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "scaled-mm")
    pipe = load_pipeline(tiny_fp8_checkpoint, "cpu")
    before = tiny_forward(pipe.transformer)
    done = apply_runtime(pipe, plan_from_env("cpu").with_(fuse_qkv=True), device="cpu")
    assert done["transformer"]["fp8_layers"] == 30 and done["transformer"]["fused_qkv_modules"] == 0
    assert gemm_backends(pipe) == {"transformer": {"fp8:scaled-mm": 30}, "transformer_2": {"fp8:scaled-mm": 30}}
    after = tiny_forward(pipe.transformer)
    assert not torch.equal(after, before)  # the W8A8 path ran, not the reference
    assert float((after - before).norm() / before.norm()) < 0.05


def test_refuses_a_quantized_source_in_any_format(tiny_fp8_checkpoint, tiny_nvfp4_checkpoint, tmp_path, capsys):
    for src, fmt in ((tiny_fp8_checkpoint, "fp8"), (tiny_nvfp4_checkpoint, "nvfp4")):
        for out_fmt in ("fp8", "nvfp4"):
            dest = tmp_path / f"{fmt}-{out_fmt}"
            assert _run(["quantize", str(src), str(dest), "--format", out_fmt]) == 2
            err = capsys.readouterr().err
            assert f"already quantized ({fmt})" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
            assert not dest.exists()


def test_refusal_by_manifest_alone(tiny_checkpoint, tmp_path, monkeypatch):
    """The manifest's format is refused even before the tensors say so."""
    from gpubake.provisioning import quantize as qmod
    from gpubake.provisioning.layout import CheckpointError

    monkeypatch.setattr(qmod, "read_manifest", lambda _src: {"format": "fp8"})
    with pytest.raises(CheckpointError, match=r"already quantized \(fp8\)"):
        qmod._refuse_quantized_source(tiny_checkpoint)


def test_bad_format_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    assert _run(["quantize", str(tiny_checkpoint), str(tmp_path / "q"), "--format", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--format: unknown format 'int4' (one of nvfp4, fp8)" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
    with pytest.raises(Exception, match="--format"):
        quantize_checkpoint(tiny_checkpoint, tmp_path / "q2", fmt="fp4")


def test_cli_json_names_the_format(tiny_checkpoint, tmp_path, capsys):
    assert _run(["quantize", str(tiny_checkpoint), str(tmp_path / "q"), "--format", "fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "fp8" and out["quantized_layers"] == 60 and out["compression"] > 1


def test_a_bad_stored_scale_shape_is_one_line_naming_the_key(tiny_fp8_checkpoint, tmp_path):
    """An FP8 layer whose scale is not [out, 1] is not an FP8 layer: its keys are then
    unexpected for the BF16 model, named in one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gpubake.provisioning.layout import CheckpointError
    from gpubake.provisioning.loader import load_expert

    exp = tmp_path / "transformer"
    shutil.copytree(tiny_fp8_checkpoint / "transformer", exp)
    sd = load_file(str(exp / layout.SINGLE_FILE))
    sd["blocks.0.attn1.to_q.weight_scale"] = sd["blocks.0.attn1.to_q.weight_scale"].reshape(-1)
    save_file(sd, str(exp / layout.SINGLE_FILE))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.0\.attn1\.to_q\.weight_scale'"):
        load_expert(exp)


def test_expert_offload_moves_fp8_buffers(fp8_pipe, monkeypatch):
    """Swapped in, the whole FP8 layer (float8 weight, float32 scale, bias) is copied to the
    device with the expert, in the format's dtypes; let go, it points at its host copies
    again. On the CPU the host is the device (`.to` is a no-op), so the copies are watched
    where the offload makes them (`_point_at`), and the clip must be the same."""
    from gpubake.provisioning import expert_offload
    from gpubake.provisioning.expert_offload import apply_expert_offload

    pipe = fp8_pipe
    base = tiny_forward(pipe.transformer_2)
    moves: list[tuple[int, dict[str, torch.dtype]]] = []
    real = expert_offload._point_at
    monkeypatch.setattr(expert_offload, "_point_at", lambda m, ts: (
        moves.append((id(m), {n: t.dtype for n, t in ts.items()})), real(m, ts))[1])
    apply_expert_offload(pipe, True, "cpu")
    try:
        off = pipe._gpubake_expert_offload
        host = off.host[id(pipe.transformer_2)]
        assert host["blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
        del moves[:]
        assert tiny_forward(pipe.transformer_2).equal(base)  # swapped in: the same output
        (who, moved), = moves
        assert who == id(pipe.transformer_2)
        fp8 = {n: m for n, m in pipe.transformer_2.named_modules() if isinstance(m, FP8Linear)}
        for name in fp8:
            assert (moved[f"{name}.weight"], moved[f"{name}.weight_scale"], moved[f"{name}.bias"]) == \
                (torch.float8_e4m3fn, torch.float32, torch.bfloat16)
        tiny_forward(pipe.transformer)  # the high-noise expert in, the low-noise one let go
        q = pipe.transformer_2.blocks[0].attn1.to_q
        assert q.weight is host["blocks.0.attn1.to_q.weight"] and q.weight_scale is host["blocks.0.attn1.to_q.weight_scale"]
    finally:
        apply_expert_offload(pipe, False, "cpu")


def test_fuse_act_quant_reaches_the_fp8_path_and_traces_into_the_block(tiny_fp8_checkpoint, monkeypatch):
    """The plan's `fuse_act_quant` is set on the bound FP8 path (as on hopper-fp8), and with it
    a compiled block holds the activation quantization in its graph (fullgraph: no break)."""
    from gpubake.kernels.fp8_linear import get_fp8_backend
    from gpubake.provisioning.runtime import apply_runtime, plan_from_env

    monkeypatch.delenv("GPUBAKE_RUNTIME", raising=False)
    monkeypatch.setenv("GPUBAKE_FP8_BACKEND", "scaled-mm")
    path = get_fp8_backend("scaled-mm")
    monkeypatch.setattr(path, "fuse_act_quant_when_compiling", False)
    pipe = load_pipeline(tiny_fp8_checkpoint, "cpu")
    apply_runtime(pipe, plan_from_env("cpu").with_(fuse_act_quant=True), device="cpu")
    assert path.fuse_act_quant_when_compiling
    layer = pipe.transformer.blocks[0].attn1.to_q
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.inference_mode():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)  # the same torch ops, traced
    apply_runtime(pipe, plan_from_env("cpu"), device="cpu")
    assert not path.fuse_act_quant_when_compiling

"""Device run (issue 5): `gpubake selftest` end to end against a full-size, random-weight
Wan 2.2 T2V-A14B NVFP4 checkpoint in the diffusers layout.

    python bench/selftest_a14b_device.py --root /tmp/a14b --out $OUT            # on the H100
    python bench/selftest_a14b_device.py --root /tmp/t --out /tmp/o --tiny      # smoke test (CPU)

The checkpoint is written FAST, never through a BF16 copy on disk (one 28.6 GB BF16 expert
would not leave room for the rest in 64 GiB): the expert is built on the GPU in BF16 from
a fixed seed, quantized in place with `quantize_model_inplace` (the same NVFP4 math and
policy as `quantize_checkpoint`), and its state dict written as sharded safetensors under
the key names `quantize_checkpoint` writes. The SAME random expert is stored as
`transformer` and as `transformer_2` (hard links; the self-test loads and hashes both).
The text encoder is UMT5-XXL at its real config (random, BF16), the VAE the Wan 2.1 VAE at
its real config (random, fp32), the tokenizer the offline one of `make-tiny` (the real
sentencepiece model cannot be fetched). Then `gpubake selftest --json` runs as a subprocess
with the catalog image's spec; phase timings go to $OUT/phases.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

SHARD_BYTES = 5 * 10**9
UMT5_XXL = {  # google/umt5-xxl encoder, as in Wan-AI/Wan2.2-T2V-A14B-Diffusers/text_encoder
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24,
    "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
    "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6,
}


def save_sharded(state: dict, dest: Path) -> int:
    """Write `state` as diffusers-style shards + index; returns bytes written."""
    from safetensors.torch import save_file

    from gpubake.provisioning.layout import INDEX_FILE

    groups: list[list[str]] = [[]]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    wmap, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k].detach().contiguous().cpu() for k in keys}, str(dest / name), metadata={"format": "pt"})
        total += (dest / name).stat().st_size
        wmap.update({k: name for k in keys})
    (dest / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}))
    return total


def build_checkpoint(root: Path, tiny: bool, model_id: str, dev: str, seed: int, phases: dict,
                     expert: Any = None, fmt: str = "nvfp4") -> None:
    """`expert`: a BF16 expert to store instead of building one (a copy is quantized; the
    caller keeps its BF16 weights: bench_clip.py's peer stack and baseline). `fmt`: nvfp4, or
    fp8 (E4M3 weights with a per-row scale, `gpubake quantize --format fp8`'s layout)."""
    import copy

    import torch
    from bench_quantize import expert_config
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from gpubake.provisioning import tiny as tinymod
    from gpubake.provisioning.manifest import (
        build_manifest,
        normalise_modes,
        write_manifest,
    )
    from gpubake.provisioning.policy import get_policy
    from gpubake.provisioning import layout
    from gpubake.provisioning.quantize import quantize_model_inplace

    def mark(name: str, t0: float) -> None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        phases[name] = round(time.perf_counter() - t0, 2)
        print(f"[phase] {name}: {phases[name]} s", flush=True)

    root.mkdir(parents=True)
    tok = tinymod._tokenizer()
    tok.save_pretrained(root / "tokenizer")

    t0 = time.perf_counter()
    if expert is None:
        cfg = dict(tinymod.TRANSFORMER_CONFIG) if tiny else {
            k: v for k, v in expert_config("wan2.2-t2v-a14b").items() if not k.startswith("_")}
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(dev):
            expert = WanTransformer3DModel(**cfg).eval()
        torch.set_default_dtype(torch.float32)
        mark("expert_build_bf16_on_gpu", t0)
    else:
        expert = copy.deepcopy(expert)
        mark("expert_copy_bf16", t0)
    phases["expert_parameters"] = sum(p.numel() for p in expert.parameters())

    t0 = time.perf_counter()
    sqnr = quantize_model_inplace(expert, "default", fmt=fmt)
    mark(f"expert_quantize_{fmt}", t0)

    t0 = time.perf_counter()
    first = root / "transformer"
    first.mkdir()
    expert.save_config(first)
    phases["expert_bytes"] = save_sharded(expert.state_dict(), first)
    del expert
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    second = root / "transformer_2"
    second.mkdir()
    for f in first.iterdir():
        os.link(f, second / f.name)  # the same random expert, stored twice
    mark("expert_write_and_link", t0)

    t0 = time.perf_counter()
    torch.manual_seed(seed + 1)
    te_cfg = dict(tinymod.TEXT_ENCODER_CONFIG, vocab_size=len(tok)) if tiny else UMT5_XXL
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        te = UMT5EncoderModel(UMT5Config(**te_cfg)).eval()
    torch.set_default_dtype(torch.float32)
    phases["text_encoder_parameters"] = sum(p.numel() for p in te.parameters())
    te.save_pretrained(root / "text_encoder", max_shard_size="5GB")
    del te
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()  # the self-test subprocess needs the GPU memory
    mark("text_encoder_build_and_write", t0)

    t0 = time.perf_counter()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(**tinymod.VAE_CONFIG) if tiny else AutoencoderKLWan()  # defaults = Wan 2.1 VAE
    phases["vae_parameters"] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(root / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=tinymod.FLOW_SHIFT,
                            num_train_timesteps=1000).save_pretrained(root / "scheduler")
    tinymod._write_model_index(root)
    normalise_modes(root)
    pol = get_policy("default")
    sq = [v for v in sqnr.values() if v is not None]
    quant = {
        "format": fmt, **layout.QUANT_RECORDS[fmt],
        "policy": pol.to_json(), "experts": ["transformer", "transformer_2"],
        "summary": {"quantized_layers": 2 * len(sqnr), "sqnr_db_min": min(sq) if sq else None,
                    "sqnr_db_mean": round(sum(sq) / len(sq), 4) if sq else None},
        "note": "random weights; one expert stored twice (bench/selftest_a14b_device.py)",
    }
    write_manifest(root, build_manifest(root, fmt=fmt, model_id=model_id, quantization=quant))
    mark("vae_scheduler_manifest", t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="where the checkpoint and spec are written")
    ap.add_argument("--out", type=Path, required=True, help="report, logs and phases.json")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test of this script)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="pass --quick to the self-test (sampled hashes)")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoint and phases.json, run no self-test")
    ap.add_argument("--format", dest="fmt", choices=("nvfp4", "fp8"), default="nvfp4",
                    help="checkpoint format (fp8: E4M3 weights, one scale per row; the spec's quantization follows)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_id = "tiny-wan2.2" if args.tiny else "wan2.2-t2v-a14b"
    dev = "cpu" if args.tiny else "cuda"
    phases: dict = {}
    t_all = time.perf_counter()
    ckpt = args.root / "model"
    build_checkpoint(ckpt, args.tiny, model_id, dev, args.seed, phases, fmt=args.fmt)
    phases["checkpoint_total"] = round(time.perf_counter() - t_all, 2)
    phases["checkpoint_disk_bytes"] = int(subprocess.run(["du", "-sb", str(ckpt)], capture_output=True, text=True,
                                                         check=True).stdout.split()[0])

    catalog = Path(__file__).resolve().parent.parent / "src/gpubake/images/catalog"
    spec_text = (catalog / "wan22-t2v-a14b-nvfp4-hopper.toml").read_text()
    if args.tiny:
        spec_text = spec_text.replace('id = "wan2.2-t2v-a14b"', 'id = "tiny-wan2.2"')
    if args.fmt != "nvfp4":  # the image's facts name the checkpoint's format (the model stage checks it)
        spec_text = spec_text.replace('quantization = "nvfp4"', f'quantization = "{args.fmt}"')
    (args.root / "spec").mkdir(exist_ok=True)
    (args.root / "spec" / "locks").mkdir(exist_ok=True)
    for lock in (catalog / "locks").iterdir():
        (args.root / "spec" / "locks" / lock.name).write_text(lock.read_text())
    spec = args.root / "spec" / "wan22-t2v-a14b-nvfp4-hopper.toml"  # a spec's name must equal its file stem
    spec.write_text(spec_text)
    where = ["--spec", str(spec)] if args.tiny else ["--image", "wan22-t2v-a14b-nvfp4-hopper"]

    if args.write_only:
        (args.out / "phases.json").write_text(json.dumps(phases, indent=2))
        print(json.dumps(phases, indent=2))
        return
    report = args.out / "selftest-a14b.json"
    cmd = [sys.executable, "-m", "gpubake", "selftest", *where, "--model-dir", str(ckpt),
           "--report", str(report), "--json"] + (["--quick"] if args.quick else [])
    phases["selftest_command"] = "python3 -m gpubake selftest " + " ".join(cmd[4:])
    print("[run]", phases["selftest_command"], flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its exit code is the verdict
    phases["selftest_wall"] = round(time.perf_counter() - t0, 2)
    phases["selftest_exit_code"] = proc.returncode
    (args.out / "selftest.stdout").write_text(proc.stdout)
    (args.out / "selftest.stderr").write_text(proc.stderr)
    (args.out / "phases.json").write_text(json.dumps(phases, indent=2))
    print(proc.stderr[-3000:])
    print(json.dumps(phases, indent=2))


if __name__ == "__main__":
    main()

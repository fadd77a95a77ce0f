"""Benchmark: quantize ONE full-size Wan 2.2 A14B expert (random BF16 weights) to NVFP4.

Measures wall time and peak memory of `gpubake.provisioning.quantize.quantize_checkpoint`
in a fresh child process, sampling /proc/self/status (VmRSS split into RssAnon, the
memory the process really needs, and RssFile, the memory-mapped shard pages that the
kernel may drop at will) and VmHWM.

    python bench/bench_quantize.py --work /tmp/qbench --device cuda --json-out result.json

The expert has the exact tensor names and shapes of Wan-AI/Wan2.2-T2V-A14B-Diffusers'
transformer (40 blocks, dim 5120, FFN 13824: built from the registry on the meta
device), written as BF16 safetensors shards of about --shard-gb GB with an index, like
the published checkpoint. Weights are random (N(0, 0.02)): timing and memory do not
depend on values; SQNR does, and is reported for Gaussian weights only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def expert_config(model_id: str, layers: int | None = None) -> dict:
    from gpubake.provisioning.models import get_model

    m = get_model(model_id)
    heads = m.hidden_dim // 128
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [1, 2, 2], "num_attention_heads": heads, "attention_head_dim": 128,
        "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": m.ffn_dim,
        "num_layers": layers or m.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
        "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
    }


def write_random_expert(root: Path, cfg: dict, shard_gb: float, gen_device: str) -> dict:
    """model_index.json + transformer/{config, shards, index}; returns sizes."""
    import torch
    from safetensors.torch import save_file

    from gpubake.provisioning import layout

    exp = root / "transformer"
    exp.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": None,
        "transformer": ["diffusers", "WanTransformer3DModel"],
    }))
    (exp / "config.json").write_text(json.dumps(cfg))
    shapes, _ = layout.expected_shapes(layout.empty_transformer(cfg))
    limit = int(shard_gb * 1e9)
    groups: list[list[str]] = [[]]
    size = 0
    for k, shp in shapes.items():
        n = 2 * max(1, int(torch.Size(shp).numel()))
        if size + n > limit and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    wmap = {}
    gen = torch.Generator(device=gen_device).manual_seed(0)
    params = 0
    for name, keys in zip(names, groups):
        out = {}
        for k in keys:
            t = torch.empty(shapes[k], dtype=torch.bfloat16, device=gen_device)
            t.normal_(0.0, 0.02, generator=gen)
            out[k] = t.cpu()
            params += t.numel()
            wmap[k] = name
        save_file(out, str(exp / name), metadata={"format": "pt"})
        del out
    (exp / layout.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return {"params": params, "shards": len(names), "bytes": sum((exp / n).stat().st_size for n in names)}


CHILD = r"""
import json, sys, threading, time
import torch, diffusers, safetensors.torch  # imported up front: the baseline counts them
from gpubake.provisioning.quantize import quantize_checkpoint
if sys.argv[3] == "cuda":
    torch.zeros(1, device="cuda")  # CUDA context before the baseline
peak = {"anon": 0, "file": 0, "rss": 0}
stop = False
def field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0
def sample():
    while not stop:
        peak["anon"] = max(peak["anon"], field("RssAnon")); peak["file"] = max(peak["file"], field("RssFile"))
        peak["rss"] = max(peak["rss"], field("VmRSS")); time.sleep(0.05)
base = field("RssAnon")
t = threading.Thread(target=sample, daemon=True); t.start()
res = quantize_checkpoint(sys.argv[1], sys.argv[2], "default", device=sys.argv[3], progress=False)
stop = True; t.join()
res.update(baseline_rss_anon_bytes=base, peak_rss_anon_bytes=peak["anon"], peak_rss_file_bytes=peak["file"], peak_rss_bytes=peak["rss"], vm_hwm_bytes=field("VmHWM"))
print("RESULT " + json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench"))
    ap.add_argument("--model", default="wan2.2-t2v-a14b")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--device", default="cuda", help="quantizer device (cuda: Triton; cpu: reference)")
    ap.add_argument("--layers", type=int, help="fewer blocks (a local smoke run); default: the model's")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    import torch

    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    src, dst = args.work / "src", args.work / "nvfp4"
    t0 = time.monotonic()
    info = write_random_expert(src, expert_config(args.model, args.layers), args.shard_gb, gen_device)
    info["write_seconds"] = round(time.monotonic() - t0, 1)
    print("source:", info, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), args.device], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    res["child_wall_seconds"] = round(time.monotonic() - t0, 1)
    shard_sizes = sorted((p.stat().st_size for p in (src / "transformer").glob("*.safetensors")), reverse=True)
    report = {
        "model": args.model, "device": args.device, "source": info, "largest_shard_bytes": shard_sizes[0],
        "result": res,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

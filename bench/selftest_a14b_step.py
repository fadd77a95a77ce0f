"""Benchmark: one denoising step of a full-size Wan 2.2 A14B expert (random weights) at the
boot self-test's clip size, BF16 and NVFP4, on the GPU (issue 5: the self-test's A14B
throughput reference).

    python bench/selftest_a14b_step.py --json-out result.json [--frames 17 --height 480 --width 832]

A pipeline step with classifier-free guidance is two transformer forwards (conditional
and unconditional), so seconds/step = 2 x the forward time; text encoding, the VAE
decode and the MP4 are not part of it (they are per clip, not per step). The expert is
built directly on the GPU in BF16 with the exact A14B shapes (bench_quantize.expert_config);
NVFP4 replaces every quantized block linear with `NVFP4Linear.from_linear` (Triton
quantizer), on the backend `select_backend` picks for this GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def torch_inference():
    import torch

    return torch.inference_mode()


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_forward(model, latents, timestep, text, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(latents.device)
        t0 = time.perf_counter()
        with torch_inference():
            model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        sync(latents.device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (a quick check of this script)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from diffusers import WanTransformer3DModel

    from bench_quantize import expert_config
    from gpubake.kernels.backends import select_backend
    from gpubake.kernels.linear import NVFP4Linear, bind_backends
    from gpubake.provisioning.policy import get_policy

    cfg = {k: v for k, v in expert_config("wan2.2-t2v-a14b", args.layers).items() if not k.startswith("_")}
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__, "layers": cfg["num_layers"],
                    "shape": {"frames": args.frames, "height": args.height, "width": args.width}}
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = WanTransformer3DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    sync(dev)
    result["build_seconds"] = round(time.perf_counter() - t0, 2)
    result["parameters"] = sum(p.numel() for p in model.parameters())

    lat_f, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    gen = torch.Generator(device=dev).manual_seed(0)
    peak = (lambda: round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)) if dev.type == "cuda" else (lambda: None)
    latents = torch.randn(1, 16, lat_f, lat_h, lat_w, device=dev, dtype=torch.bfloat16, generator=gen)
    text = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16, generator=gen)
    timestep = torch.tensor([900], device=dev)
    result["tokens"] = lat_f * (lat_h // 2) * (lat_w // 2)

    timed_forward(model, latents, timestep, text, 1)  # warm-up
    bf16 = timed_forward(model, latents, timestep, text, args.repeats)
    result["bf16"] = {"forward_seconds": [round(t, 4) for t in bf16], "peak_gib": peak()}

    policy = get_policy("default")
    t0 = time.perf_counter()
    swapped = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and policy.quantizes(name, cfg["num_layers"]):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NVFP4Linear.from_linear(mod))
            swapped += 1
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    backend = select_backend(dev)  # $GPUBAKE_NVFP4_BACKEND or this GPU's default
    bind_backends(model, backend)
    result["nvfp4"] = {"backend": backend.name, "linears": swapped,
                       "quantize_seconds": round(time.perf_counter() - t0, 2)}
    timed_forward(model, latents, timestep, text, 1)
    fp4 = timed_forward(model, latents, timestep, text, args.repeats)
    result["nvfp4"].update(forward_seconds=[round(t, 4) for t in fp4],
                           peak_gib=peak())
    for key, times in (("bf16", bf16), ("nvfp4", fp4)):
        fwd = sorted(times)[len(times) // 2]
        result[key]["seconds_per_step_cfg"] = round(2 * fwd, 4)
    args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark (issue 18): the Wan VAE decoder's costliest convolution, in other formulations.

    python bench/bench_vae_conv.py --json-out $OUT/vae_conv_h200.json     # one H200 run
    python bench/bench_vae_conv.py --small --json-out /tmp/vae_conv.json  # CPU smoke (tests)

`bench_vae_decode.py --conv-shapes` (H200) found the decoder's 96-channel causal Conv3d at full
resolution (input 1 x 96 x 6 x 482 x 834, padded, 4 output frames, 3x3x3) the largest cost of an
eager 480p decode: 120 calls, 0.47 s of 1.83, ~200 TFLOP/s where the 192-channel one runs at
~450. Its 96 output channels take cuDNN's narrow-tile kernel. Variants of that one call, each
timed with CUDA events (median of 20 after 3 warm-ups) and checked against the first:

* ``ncdhw``: `F.conv3d` on the layout diffusers hands it (what the decode runs);
* ``ndhwc``: input and weight in ``channels_last_3d``;
* ``pad128``: 32 zero filters more (128 output channels), the 96 sliced back out;
* ``pad128-ndhwc``: both;
* ``fold2d``: the three time taps folded into the input channels, one Conv2d (288 -> 96, 3x3)
  over the 4 output frames as a batch, NHWC; the stacking copy is timed with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PREDICTIONS = {
    "ncdhw": "3.9 ms (the decode profile's 0.47 s / 120 calls), ~200 TFLOP/s",
    "ndhwc": "10-20 % below ncdhw (no layout transforms around cuDNN's kernel)",
    "pad128": "cuDNN's 128-wide tile: 1.3-1.8x ncdhw despite a third more work",
    "pad128-ndhwc": "the fastest if padding wins",
    "fold2d": "within 20 % of the best: the same GEMM (K = 2592), its stacking copy ~0.3 ms",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-out", required=True)
    p.add_argument("--small", action="store_true", help="the CPU, a tiny shape (tests)")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    cuda = not args.small and torch.cuda.is_available()
    if not args.small and not cuda:
        print("bench_vae_conv: no CUDA device (use --small)", file=sys.stderr)
        return 2
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    c, t_in, h, w = (96, 6, 482, 834) if cuda else (8, 6, 12, 14)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, c, t_in, h, w, device=dev, dtype=dtype, generator=g)
    wt = torch.randn(c, c, 3, 3, 3, device=dev, dtype=dtype, generator=g) / (27 * c) ** 0.5
    b = torch.randn(c, device=dev, dtype=dtype, generator=g)
    pad = ((c + 127) // 128) * 128 - c or 32
    wt_pad = torch.cat([wt, wt.new_zeros(pad, *wt.shape[1:])])
    b_pad = torch.cat([b, b.new_zeros(pad)])
    x_cl, wt_cl, wt_pad_cl = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, wt, wt_pad))
    t_out = t_in - 2
    # fold2d: weight [O, I, kt, kh, kw] -> [O, kt * I, kh, kw] (tap-major, as the input is stacked)
    w2 = wt.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)

    def fold2d():
        frames = x_cl[0].permute(1, 0, 2, 3)  # [T, C, H, W] (NHWC strides per frame)
        stacked = torch.cat([frames[i:i + t_out] for i in range(3)], dim=1)  # [T_out, 3C, H, W]
        stacked = stacked.contiguous(memory_format=torch.channels_last)
        return F.conv2d(stacked, w2, b).permute(1, 0, 2, 3).unsqueeze(0)  # [1, O, T_out, H-2, W-2]

    variants = {
        "ncdhw": lambda: F.conv3d(x, wt, b),
        "ndhwc": lambda: F.conv3d(x_cl, wt_cl, b),
        "pad128": lambda: F.conv3d(x, wt_pad, b_pad)[:, :c],
        "pad128-ndhwc": lambda: F.conv3d(x_cl, wt_pad_cl, b_pad)[:, :c],
        "fold2d": fold2d,
    }
    flops = 2 * t_out * (h - 2) * (w - 2) * 27 * c * c
    rows: dict[str, dict] = {}
    ref = None
    with torch.inference_mode():
        for name, fn in variants.items():
            for _ in range(3):
                out = fn()
            times = []
            for _ in range(20 if cuda else 2):
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fn()
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            ref = out if ref is None else ref
            ms = statistics.median(times)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            rows[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "rel_err_vs_ncdhw": err,
                          "shape": list(out.shape)}
            print(f"{name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, err {err:.1e}", flush=True)
    Path(args.json_out).write_text(json.dumps({
        "bench": "vae_conv", "predictions": PREDICTIONS, "input": [1, c, t_in, h, w], "weight": list(wt.shape),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "variants": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

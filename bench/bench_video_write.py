"""Benchmark (issue 18): writing a clip's MP4 (H.264, libx264) at each x264 preset.

    python bench/bench_video_write.py --json-out /tmp/video_write.json            # this machine's CPU
    python bench/bench_video_write.py --small --json-out /tmp/video_write.json    # tests

A user waits for the MP4 after the decode: 1.2-1.4 s at 480p and 2.7-2.8 s at 720p in the H200
clip runs (bench_clip's ``video_write_s``, x264's default preset "medium"). This times
`render.write_mp4` on 81 synthetic frames per size at each preset (the same CRF: imageio's
quality 5, CRF 25), the file's size, and its fidelity: PSNR of the decoded MP4 against the
frames written. The frames: a smooth moving colour field, a textured disc crossing it and a
little noise (video-like: most of each frame predictable from the last, some detail).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ("medium", "fast", "veryfast", "superfast", "ultrafast")
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
PREDICTIONS = {
    "medium": "x264's default: the H200 runs' 1.2-1.4 s at 480p on a 16-core host; more on 2 cores",
    "veryfast": "2-3x faster than medium, the file 10-30 % larger, PSNR within 0.5 dB",
    "ultrafast": "5-8x faster than medium, the file 2-3x larger",
}


def frames(n: int, h: int, w: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    texture = rng.random((h, w), dtype=np.float32)
    for t in range(n):
        ph = t / n * 2 * math.pi
        field = np.stack([0.5 + 0.4 * np.sin(x / w * 4 + ph), 0.5 + 0.4 * np.cos(y / h * 3 - ph),
                          0.5 + 0.3 * np.sin((x + y) / (w + h) * 5 + 2 * ph)], -1)
        cx, cy, r = w * (0.2 + 0.6 * t / n), h * 0.5, h * 0.2
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None]
        field = np.where(disc, 0.3 + 0.5 * np.roll(texture, int(cx), axis=1)[..., None], field)
        field += rng.normal(0, 0.01, field.shape).astype(np.float32)
        out[t] = (np.clip(field, 0, 1) * 255).round().astype(np.uint8)
    return out


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json-out", required=True)
    p.add_argument("--small", action="store_true", help="10 frames of 64 x 96 (tests)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    import imageio.v2 as imageio

    from gpubake.provisioning.render import write_mp4

    sizes = {"tiny": (64, 96)} if args.small else SIZES
    n = 10 if args.small else 81
    result = {"bench": "video_write", "predictions": PREDICTIONS, "cpus": os.cpu_count(), "frames": n,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size, (h, w) in sizes.items():
            clip = frames(n, h, w)
            rows = result["sizes"][size] = {}
            for preset in PRESETS:
                dest = Path(tmp) / f"{size}-{preset}.mp4"
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    write_mp4(clip, dest, fps=16, preset=preset)
                    times.append(time.perf_counter() - t0)
                back = [f for f in imageio.mimread(dest, memtest=False)]
                rows[preset] = {"seconds": round(statistics.median(times), 3), "bytes": dest.stat().st_size,
                                "psnr_db": round(psnr(clip[:len(back)], __import__("numpy").stack(back)), 2),
                                "frames_read": len(back)}
                print(f"{size} {preset}: {rows[preset]}", flush=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

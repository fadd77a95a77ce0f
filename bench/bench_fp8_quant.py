"""Benchmark: the FP8 attention's quantization pieces, compiled as inside a block, at 480p and
720p (why does 720p cost ~11 ms a call against ~2 at 480p, 2.3x the data?).

    python bench/bench_fp8_quant.py --json-out $OUT/fp8_quant.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PREDICTION = ("each piece is one or two passes over a 0.33 / 0.77 GB bf16 tensor (~0.2 / 0.5 ms at "
              "~3 TB/s); the piece that scales worse than 2.3x from 480p to 720p is the culprit "
              "(suspect: K's mean over tokens, a strided reduction of length N)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    from bench_attention import time_ms, wan_like
    from gpubake.kernels import attention_fp8 as A8

    pieces = {
        "amax_q": lambda q, k, v: q.abs().amax(),
        "quant_q": lambda q, k, v: A8.quantize_per_tensor(q),
        "mean_k": lambda q, k, v: k.float().mean(dim=-2, keepdim=True),
        "mean_k_fp32_acc": lambda q, k, v: k.mean(dim=-2, keepdim=True, dtype=torch.float32),
        "smooth_k": lambda q, k, v: A8.smooth_keys(k),
        "smooth_quant_k": lambda q, k, v: A8.quantize_per_tensor(A8.smooth_keys(k)),
        "smooth_quant_k_contig": lambda q, k, v: A8.quantize_per_tensor(A8.smooth_keys(k.contiguous())),
        "all_three": lambda q, k, v: (A8.quantize_per_tensor(q), A8.quantize_per_tensor(A8.smooth_keys(k)),
                                      A8.quantize_per_tensor(v)),
    }
    result = {"device": torch.cuda.get_device_name(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "prediction": PREDICTION, "ms": {}}
    for n in (32760, 75600):
        q, k, v = wan_like(n, 40, 128, torch.device("cuda"), seed=n)
        row = {}
        for name, fn in pieces.items():
            torch._dynamo.reset()
            c = torch.compile(fn, dynamic=False)
            with torch.inference_mode():
                row[name] = round(time_ms(c, q, k, v), 3)
                row[name + "_eager"] = round(time_ms(fn, q, k, v), 3)
        result["ms"][str(n)] = row
        print(n, json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

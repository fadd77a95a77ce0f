"""Device check of the checkpoint pipeline on CUDA (run by hand on a GPU machine):
make-tiny, quantize on CPU (reference) and on CUDA (Triton) -> identical manifests,
then load the NVFP4 checkpoint on CUDA and render frames.

    python bench/device_checkpoint_check.py /tmp/ckcheck
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from gpubake.provisioning.loader import load_pipeline
from gpubake.provisioning.manifest import MANIFEST_NAME
from gpubake.provisioning.quantize import quantize_checkpoint
from gpubake.provisioning.tiny import make_tiny

root = Path(sys.argv[1])
src = make_tiny(root / "bf16")
quantize_checkpoint(src, root / "cpu", progress=False)
quantize_checkpoint(src, root / "cuda", device="cuda", progress=False)
same = (root / "cpu" / MANIFEST_NAME).read_bytes() == (root / "cuda" / MANIFEST_NAME).read_bytes()
pipe = load_pipeline(root / "cuda", device="cuda")
pipe.set_progress_bar_config(disable=True)
t0 = time.monotonic()
frames = pipe("a red cat", negative_prompt="", height=64, width=64, num_frames=5, num_inference_steps=4,
              generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).frames[0]
print(json.dumps({"cpu_and_cuda_quantize_identical": same, "frames": list(frames.shape),
                  "finite": bool(torch.isfinite(torch.from_numpy(frames)).all()),
                  "render_seconds": round(time.monotonic() - t0, 3),
                  "linear_type": type(pipe.transformer.blocks[0].attn1.to_q).__name__,
                  "weight_device": str(pipe.transformer.blocks[0].attn1.to_q.weight_packed.device)}))

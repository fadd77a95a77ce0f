"""What each rank of tests/perf/test_parallel.py runs (a module of its own: spawned
processes import their target by name). Everything goes through gpubake's own path:
`parallel.enable_context_parallel`, and for the clip the runtime plan's ``parallel``
lever through `runtime.apply_runtime`."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

# latents [1, 16, 3, 8, 8] -> 3 x 4 x 4 = 48 video tokens: divide by 2 ranks
LATENT_SHAPE = (1, 16, 3, 8, 8)
CLIP = {"prompt": "a red fox in the snow", "height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 2}
CLIP_TOKENS = 3 * 2 * 2  # (9 - 1) / 4 + 1 latent frames x (32 / 16)^2 patches


def transformer(dtype: torch.dtype) -> Any:
    from diffusers import WanTransformer3DModel

    from gpubake.provisioning.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return WanTransformer3DModel(**TRANSFORMER_CONFIG).to(dtype).eval()


def inputs(dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(*LATENT_SHAPE, generator=g).to(dtype), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 16, 32, generator=g).to(dtype), "return_dict": False}


def forward(model: Any, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs(dtype))[0]


def clip(ckpt: Path, parallel: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """A 2-step clip of the tiny NVFP4 checkpoint under the plan with ``parallel``."""
    from gpubake.provisioning.loader import load_pipeline
    from gpubake.provisioning.runtime import apply_runtime, plan_for

    pipe = load_pipeline(ckpt, "cpu")
    pipe.set_progress_bar_config(disable=True)
    done = apply_runtime(pipe, plan_for("cpu", world_size=1).with_(parallel=parallel), clip_tokens=CLIP_TOKENS)
    with torch.inference_mode():
        frames = pipe(**CLIP, generator=torch.Generator().manual_seed(3), output_type="np").frames[0]
    return torch.from_numpy(frames), done


def fused_forward(parallel: Any = None) -> torch.Tensor:
    """The BF16 forward with the self-attention's fused Q/K norm + RoPE (Triton's interpreter),
    in one process or (`parallel`) split across the group."""
    from gpubake.kernels.qk_norm_rope import set_fused_qk_norm_rope
    from gpubake.provisioning.parallel import enable_context_parallel

    model = transformer(torch.bfloat16)
    assert set_fused_qk_norm_rope(model, True) == 3
    if parallel is not None:
        enable_context_parallel(model, parallel, tokens=LATENT_SHAPE[2] * 16)
    return forward(model, torch.bfloat16)


def rank_main(rank: int, world: int, port: int, ckpt: str, results: Any) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined: the fused pass runs on the CPU
    import torch.distributed as dist

    from gpubake.provisioning.parallel import Parallel, enable_context_parallel

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out: dict[str, Any] = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for kind in ("ulysses", "ring"):
            for dtype in (torch.float32, torch.bfloat16):
                model = transformer(dtype)
                info = enable_context_parallel(model, Parallel(kind, world), tokens=LATENT_SHAPE[2] * 16)
                out[f"{kind}/{dtype}"] = forward(model, dtype)
                out[f"{kind}/info"] = info
            out[f"{kind}/fused"] = fused_forward(Parallel(kind, world))
            out[f"{kind}/clip"], out[f"{kind}/clip_done"] = clip(Path(ckpt), f"{kind}:{world}")
        out["fused"] = fused_forward()  # the same model in this one process
        dist.destroy_process_group()
    except Exception as exc:
        import traceback

        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
    buf = io.BytesIO()  # bytes, not tensors: a queued tensor is a shared fd this process takes with it
    torch.save(out, buf)
    results.put(buf.getvalue())

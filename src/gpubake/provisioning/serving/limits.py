"""What one request may ask of this machine: body size, and a clip that fits the card.

The memory ceiling is on pixel-frames (width x height x frames): the denoising step's
activations grow with the latent tokens and the VAE decode's with the pixels, while
steps add time, not memory. Steps get their own ceiling on pixel-frames x steps, so one
job cannot hold the single GPU worker for hours. A request over either gets a 422 naming
the limit instead of an out-of-memory error in the middle of a job.

The bytes a pixel-frame needs come from the memory bench on the H100 (docs/benchmarks.md,
"Memory: both experts, the text encoder and the VAE resident", 480x832x81 = 32.35 M
pixel-frames, 20.54 GiB resident): a CFG step peaked 2.96 GiB over resident (~98 B per
pixel-frame; the 720p step bench agrees: +4.0 GiB for 42,840 more tokens), the untiled VAE
decode 8.88 GiB over (~295 B), the tiled decode 2.0 GiB (~66 B, below the step's). The
budget is what this process can still allocate once the pipeline is resident on the card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

GIB = 2**30
BENCH_PIXEL_FRAMES = 480 * 832 * 81
STEP_BYTES_PER_PIXEL_FRAME = 2.96 * GIB / BENCH_PIXEL_FRAMES
DECODE_BYTES_PER_PIXEL_FRAME = {False: 8.88 * GIB / BENCH_PIXEL_FRAMES, True: 2.00 * GIB / BENCH_PIXEL_FRAMES}
HEADROOM_BYTES = GIB // 4  # allocator fragmentation beyond the measured peaks
# CPU (the tiny demo model): no memory to measure against; a 256x256x17 clip by default.
CPU_PIXEL_FRAMES = 256 * 256 * 17
MAX_STEPS = 100
STEPS_FACTOR = 2  # pixel-frames x steps ceiling = the largest clip at twice the model's default steps
MAX_BODY_BYTES = 64 * 1024  # two 2000-character prompts in 4-byte UTF-8 are 16 KB


@dataclass(frozen=True)
class Limits:
    max_pixel_frames: int
    max_pixel_frame_steps: int
    max_steps: int
    basis: str  # how max_pixel_frames was found, shown in /v1/info and in the 422

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pixel_frames_that_fit(available_bytes: int, vae_tiling: bool) -> int:
    """Pixel-frames whose step and decode peaks fit in `available_bytes` above the resident model."""
    per = max(STEP_BYTES_PER_PIXEL_FRAME, DECODE_BYTES_PER_PIXEL_FRAME[vae_tiling])
    return max(0, int((available_bytes - HEADROOM_BYTES) / per))


def _gpu_budget(pipeline: Any, device: str) -> tuple[int, str] | None:
    """(bytes this process can still allocate on `device`, description), or None off CUDA."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # ours, reusable
    resident = torch.cuda.memory_allocated(dev)
    tiling = bool(getattr(getattr(pipeline, "vae", None), "use_tiling", False))
    name = torch.cuda.get_device_name(dev)
    return free + cached, (f"{name}: {total / GIB:.1f} GiB, {resident / GIB:.1f} GiB resident, "
                           f"VAE decode {'tiled' if tiling else 'untiled'}")


def limits_for(pipeline: Any, device: str, model: Any, *, max_pixel_frames: int | None = None,
               max_pixel_frame_steps: int | None = None) -> Limits:
    """This card's limits for `model` once `pipeline` is loaded; explicit values win."""
    if max_pixel_frames is not None:
        pf, basis = max_pixel_frames, "configured (--max-pixel-frames)"
    else:
        budget = _gpu_budget(pipeline, device)
        if budget is None:
            pf = max(CPU_PIXEL_FRAMES, model.width * model.height * model.num_frames)
            basis = f"{device}: default ceiling (set --max-pixel-frames to change it)"
        else:
            tiling = bool(getattr(getattr(pipeline, "vae", None), "use_tiling", False))
            pf, basis = pixel_frames_that_fit(budget[0], tiling), f"GPU memory ({budget[1]})"
    work = max_pixel_frame_steps or pf * model.num_inference_steps * STEPS_FACTOR
    return Limits(max_pixel_frames=pf, max_pixel_frame_steps=work, max_steps=MAX_STEPS, basis=basis)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 `{"error"}`.

    A declared Content-Length is refused before anything runs; a chunked body is counted
    as the route reads it, and the overflow is an HTTPException the app's handler turns
    into the same JSON. (Starlette's own limiter answers plain text when the route never
    reads the body, e.g. a 401 or a 404.)"""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"body: larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"error": self._message()}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

"""FP8 attention through cuDNN's fused SDPA (Hopper and newer), for long self-attention.

cuDNN runs scaled-dot-product attention with E4M3 Q, K, V and an E4M3 softmax P on the
FP8 tensor cores (twice the BF16 rate on sm_90), reached from Python by NVIDIA's
`nvidia-cudnn-frontend` wheel against the cuDNN that torch already loads. Scaling is per
tensor, as cuDNN's FP8 graph takes it:

* Q and K: scaled by 448 / amax. K first loses its mean over tokens (softmax is invariant
  to adding one vector to every key; SageAttention's "smoothing"), which shrinks K's
  per-channel offsets and so its amax;
* V: scaled by 448 / amax(V);
* P (in [0, 1]): scale_s = 448, descale_s = 1/448;
* O: on Hopper cuDNN writes FP8 O (BF16 O needs Blackwell), and |O| <= max|V| because O is
  a convex combination of V's rows, so scale_o = 448 / amax(V) never overflows.

`fp8_attention_reference` computes the same quantized arithmetic in plain torch; it is
the oracle of the CPU tests (no cuDNN there).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from gpubake.errors import KernelError
from gpubake.kernels.attention_common import importable, smooth_keys
from gpubake.kernels.format import E4M3_MAX

FP8 = torch.float8_e4m3fn


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes of x * 448/amax(x) and the fp32 descale amax/448 (a [1,1,1,1] tensor)."""
    # abs().amax(): inductor fuses it into one reduction inside a compiled block; an
    # aminmax variant was faster eager but 2-3 % slower compiled (run 10, docs/benchmarks.md)
    amax = x.abs().amax().float().clamp_min(1e-12)
    q = (x * (E4M3_MAX / amax)).to(FP8)  # x's dtype times a 0-dim fp32: no fp32 copy of x
    return q, (amax / E4M3_MAX).reshape(1, 1, 1, 1)


def quantized_attention(q8: torch.Tensor, dq: torch.Tensor, k8: torch.Tensor, dk: torch.Tensor, v8: torch.Tensor,
                        dv: torch.Tensor, scale: float, p_scale: float, fp8_out: bool) -> torch.Tensor:
    """Attention on E4M3 codes with descales broadcastable to [B, H, 1, 1], in fp32.

    P (unnormalized, max 1) is rounded to E4M3 after scaling by `p_scale` and the row sums
    come from unrounded P, as both FP8 kernels do; `fp8_out` also rounds O through E4M3
    with the scale 1/dv (cuDNN's FP8 output on sm_90)."""
    s = torch.matmul(q8.float(), k8.float().transpose(-1, -2)) * (dq * dk * scale)
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    denom = p.sum(dim=-1, keepdim=True)
    p8 = (p * p_scale).to(FP8).float() / p_scale
    o = torch.matmul(p8, v8.float()) * dv / denom
    return (o / dv).to(FP8).float() * dv if fp8_out else o


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                            smooth: bool = True) -> torch.Tensor:
    """The FP8 arithmetic of `cudnn_fp8_attention` in plain torch ([B, H, N, D], q's dtype).

    Q, K, V and P are rounded through E4M3 with the same scales; products and sums are fp32
    (the tensor cores accumulate in fp32 too), O goes through E4M3 like cuDNN's FP8 output."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if smooth:
        k = smooth_keys(k)
    # cuDNN quantizes unnormalized P with scale_s = 448; scale_o = 448/amax(V) = 1/dv
    out = quantized_attention(*quantize_per_tensor(q), *quantize_per_tensor(k), *quantize_per_tensor(v),
                              scale, p_scale=E4M3_MAX, fp8_out=True)
    return out.to(q.dtype)


def cudnn_frontend_available() -> bool:
    """NVIDIA's cuDNN frontend wheel can be imported (it finds the cuDNN torch loaded)."""
    return importable("cudnn")


@dataclass
class _Plan:
    graph: Any
    tensors: dict[str, Any]
    workspace: torch.Tensor
    constants: dict[str, torch.Tensor]  # P's fixed scales and the amax outputs nobody reads


class _CudnnFp8Sdpa:
    """Builds one cuDNN FP8 SDPA graph per (shape, strides, device) and runs it."""

    def __init__(self) -> None:
        self._plans: dict[tuple, _Plan] = {}
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _handle(self, device: torch.device) -> Any:
        import cudnn

        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._handles:
            self._handles[idx] = cudnn.create_handle()
        return self._handles[idx]

    def _plan(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o8: torch.Tensor, scale: float) -> _Plan:
        import cudnn

        key = (q8.shape, q8.stride(), k8.shape, k8.stride(), v8.stride(), o8.stride(), q8.device, scale)
        with self._lock:
            if key in self._plans:
                return self._plans[key]
            f32 = cudnn.data_type.FLOAT
            graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=f32,
                                  compute_data_type=f32, handle=self._handle(q8.device))
            t = {n: graph.tensor_like(x) for n, x in (("q", q8), ("k", k8), ("v", v8))}
            for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                t[n] = graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
                descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                generate_stats=False, attn_scale=scale, use_causal_mask=False, name="gpubake_fp8_sdpa")
            o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(
                cudnn.data_type.FP8_E4M3)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            t.update(o=o, amax_s=amax_s, amax_o=amax_o)
            try:
                graph.validate()
                graph.build_operation_graph()
                graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
                graph.check_support()
                graph.build_plans()
            except Exception as exc:
                raise KernelError(f"cuDNN FP8 attention: no plan for q {tuple(q8.shape)} on "
                                  f"{torch.cuda.get_device_name(q8.device)} ({' '.join(str(exc).split())[:200]})") from None
            dev = q8.device
            ws = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=dev)
            constants = {"descale_s": torch.full((1, 1, 1, 1), 1.0 / E4M3_MAX, device=dev),
                         "scale_s": torch.full((1, 1, 1, 1), E4M3_MAX, device=dev),
                         "amax_s": torch.empty((1, 1, 1, 1), device=dev), "amax_o": torch.empty((1, 1, 1, 1), device=dev)}
            plan = self._plans[key] = _Plan(graph, t, ws, constants)
            return plan

    def __call__(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor, scale: float) -> torch.Tensor:
        import cudnn

        o8 = torch.empty_like(q8)  # q's strides: diffusers' permute back to [B, N, H, D] stays a view
        plan = self._plan(q8, k8, v8, o8, scale)
        dev = q8.device
        t = plan.tensors
        pack = {t["q"]: q8, t["k"]: k8, t["v"]: v8, t["descale_q"]: dq, t["descale_k"]: dk, t["descale_v"]: dv,
                t["scale_o"]: 1.0 / dv, t["o"]: o8, **{t[n]: c for n, c in plan.constants.items()}}
        handle = self._handle(dev)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(dev).cuda_stream)
        plan.graph.execute(pack, plan.workspace, handle=handle)
        return o8


_SDPA = _CudnnFp8Sdpa()


@torch.library.custom_op("gpubake::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                   dv: torch.Tensor, scale: float) -> torch.Tensor:
    """cuDNN's FP8 SDPA on E4M3 [B, H, N, D] q8/k8/v8 with [1,1,1,1] fp32 descales; E4M3 O
    scaled by 1/dv. Opaque to torch.compile: the quantization around it stays fusable."""
    if not cudnn_frontend_available():
        raise KernelError("fp8 attention: the nvidia-cudnn-frontend wheel is not installed (pip install 'gpubake[gpu]')")
    return _SDPA(q8, k8, v8, dq, dk, dv, scale)


@cudnn_fp8_sdpa.register_fake
def _(q8, k8, v8, dq, dk, dv, scale):
    return torch.empty_strided(q8.shape, q8.stride(), dtype=q8.dtype, device=q8.device)


def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-tensor FP8 attention on cuDNN ([B, H, N, D] CUDA bf16/fp16 in, q's dtype out).

    The amax reductions, K smoothing and casts are plain torch, so inside a compiled block
    inductor fuses them into the RoPE/norm that produce q and k."""
    q8, dq = quantize_per_tensor(q)
    k8, dk = quantize_per_tensor(smooth_keys(k))
    v8, dv = quantize_per_tensor(v)
    o8 = cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, scale)
    return o8.to(q.dtype) * dv.to(q.dtype)

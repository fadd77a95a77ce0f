"""A smaller UMT5 text encoder on the GPU (issue 7: both experts + text encoder in 24 GiB).

Wan 2.2's text encoder is UMT5-XXL's encoder: 5.7 B parameters. As transformers loads it
(BF16, with the feed-forward output `wo` kept in fp32) it takes ~12.6 GiB, more than half
the budget of a 24 GB card next to two NVFP4 experts (~8 GiB each). It runs once per
prompt, so its speed does not matter; its memory does. `shrink_text_encoder`:

* every linear (q, k, v, o, wi_0, wi_1, wo: 4.6 B parameters) -> FP8 E4M3 weights with
  one fp32 scale per output row, weight only (`Fp8WeightLinear`: the weight is expanded
  to the activation dtype per call, so the encoder sees no activation quantization).
  FP8 rather than NVFP4: on a random 8-layer UMT5 the last hidden state moved 6.8 % with
  FP8 weights and 23.7 % with NVFP4 (37 % at the full 24 layers, measured on the H100),
  and the encoder's output conditions every step;
* `wo` computes in BF16: transformers keeps it in fp32 against fp16 overflow, which BF16
  (fp32's exponent range) does not have; Wan's own code runs the whole encoder in BF16;
* the 256k x 4096 token embedding (1.96 GiB) -> host memory: one gather of <= 512 rows
  per prompt, copied to the GPU.

The layers are converted one at a time from wherever they are (host or GPU), so an
encoder loaded on the host never has its BF16 weights on the GPU all at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp8WeightLinear(nn.Module):
    """y = x @ (W8 * s).T + b with W8 in E4M3 and s one fp32 scale per output row.

    `weight` is a zero-size tensor in the dtype the layer computes in: transformers' T5
    feed-forward reads `wo.weight.dtype` to decide what to cast its input to (the fp32
    keep), and must see BF16 here, not E4M3 (the real weight is `weight_fp8`)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        from gpubake.kernels.fp8_ref import fp8_rowwise_ref

        super().__init__()
        w = linear.weight.detach()
        w8, scale = fp8_rowwise_ref(w)  # the per-row E4M3 quantizer of the hopper-fp8 activations
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))
        self.register_buffer("weight", torch.empty(0, dtype=compute_dtype, device=w.device), persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight_fp8.to(torch.float32) * self.weight_scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fp8 e4m3 weight, per-row scale"


class HostEmbedding(nn.Module):
    """A token embedding whose table stays in host memory (not a parameter or buffer, so
    `.to(device)` and `state_dict` leave it alone); returns rows on `device`."""

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.device = torch.device(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.to("cpu"), self.table).to(self.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host table -> {self.device}"


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _gpu_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t.is_cuda)


def shrink_text_encoder(encoder: nn.Module, device: torch.device | str) -> dict[str, int]:
    """Convert a transformers (U)T5 encoder in place as described above and move it to
    `device`; returns counts and the bytes it now holds on the GPU. A second call finds
    nothing left to convert."""
    dev = torch.device(device)
    done = {"fp8_linears": 0, "host_embeddings": 0}
    for name, mod in list(encoder.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        with torch.no_grad():
            _set(encoder, name, Fp8WeightLinear(mod.to(dev)))  # `wo` too: it computes in BF16 (see above)
        mod.to("meta")  # drop the full-precision weight now, not at the end
        done["fp8_linears"] += 1
    hosts: dict[int, HostEmbedding] = {}  # by weight: transformers 5 ties `shared` and `embed_tokens`
    for name, mod in list(encoder.named_modules(remove_duplicate=False)):  # by Parameter, not module
        if isinstance(mod, nn.Embedding) and mod.num_embeddings > 4096:
            host = hosts.get(id(mod.weight))
            if host is None:
                host = hosts[id(mod.weight)] = HostEmbedding(mod, dev)  # tied tables stay one table
                done["host_embeddings"] += 1
            _set(encoder, name, host)
    encoder.to(dev)
    done["gpu_bytes"] = _gpu_bytes(encoder) if dev.type == "cuda" else 0
    return done

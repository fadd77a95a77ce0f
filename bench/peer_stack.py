"""The peer stack's weight quantization, one definition for the benches that measure it
(`bench_clip.py`'s peer case, `bench_step.py`'s `peer+...` variants): torchao's float8
rowwise dynamic quantization (W8A8, `Float8DynamicActivationFloat8WeightConfig(PerRow)`) on
the transformer blocks' BF16 linears; the fp32 embedders outside the blocks stay."""

from __future__ import annotations

from typing import Any

PEER_FP8 = "torchao Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) on blocks.* linears"


def quantize_peer_fp8(model: Any) -> None:
    """`model`'s block linears quantized in place (torchao's float8 GEMM needs an sm_89+ GPU)."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def blocks_linear(mod: Any, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and fqn.startswith("blocks.")

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=blocks_linear)

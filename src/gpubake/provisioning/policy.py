"""Quantization policies (data in policies.toml): which linears become NVFP4.

A policy is data so that trading size against fidelity (keep the first and last
blocks, FFN only, ...) needs no code change and is recorded verbatim in the manifest.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from gpubake.errors import GpubakeError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class PolicyError(GpubakeError):
    """Unknown or malformed quantization policy."""


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    quantize: tuple[str, ...]
    keep_blocks: tuple[int, ...] = ()
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def quantizes(self, module: str, num_layers: int) -> bool:
        """True when the Linear `module` (e.g. blocks.3.attn1.to_q) is quantized."""
        if not any(p.search(module) for p in self._patterns):
            return False
        m = _BLOCK.match(module)
        if m:
            idx = int(m.group(1))
            kept = {k % num_layers for k in self.keep_blocks} if num_layers else set()
            if idx in kept:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "quantize": list(self.quantize),
                "keep_blocks": list(self.keep_blocks)}


@functools.cache
def _policies() -> dict[str, Policy]:
    text = resources.files("gpubake.provisioning").joinpath("policies.toml").read_text(encoding="utf-8")
    out = {}
    for name, entry in tomllib.loads(text).get("policies", {}).items():
        try:
            pats = tuple(entry["quantize"])
            out[name] = Policy(
                name=name,
                description=entry.get("description", ""),
                quantize=pats,
                keep_blocks=tuple(int(k) for k in entry.get("keep_blocks", [])),
                _patterns=tuple(re.compile(p) for p in pats),
            )
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise PolicyError(f"policies.toml: policy {name!r}: {exc}") from None
    return out


def policy_names() -> list[str]:
    return list(_policies())


def get_policy(name: str) -> Policy:
    pols = _policies()
    if name not in pols:
        raise PolicyError(f"unknown policy {name!r} for --policy (known: {', '.join(pols)})")
    return pols[name]

"""One A14B expert on the GPU at a time: the other waits in host memory (issue 18, memory).

Why: Wan 2.2 A14B denoises with its high-noise expert first and its low-noise expert after
the boundary, never both in one step, yet a loaded pipeline keeps both on the device. On a
24 GB card that is the difference between fitting and not: the whole A14B with the shrunk
encoder is 20.5 GiB resident and 23.5 GiB at a step's peak on an H200 (docs/benchmarks.md,
"Per clip"); one NVFP4 expert is ~7.8 GiB of it. With the runtime plan's
``expert_offload`` on, each expert's tensors live in host memory (pinned on CUDA, so the
copy in runs at the bus's speed), and a forward pre-hook on each expert copies it onto the
device when it is called and lets the other one go: two copies per clip (the high-noise
expert at the clip's start, the low-noise one at the boundary), ~7.8 GiB each.

The device copies are the only ones freed; the host copies are made once and never change
(inference), so letting an expert go costs no copy back. An `NVFP4Linear`'s prepared
run-time weight (device tensors its backend made) is dropped with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gpubake.provisioning.models import experts_of


class ExpertOffload:
    """Keeps at most one of `experts` on `device`; the others' tensors point at host copies."""

    def __init__(self, experts: dict[str, nn.Module], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.experts = dict(experts)
        # a module in both slots (one expert stored twice) counts once
        self.modules = {id(m): m for m in self.experts.values()}
        self.host = {key: _host_copies(m, pin=self.device.type == "cuda") for key, m in self.modules.items()}
        self.active: nn.Module | None = None
        self.swaps = 0
        for key, m in self.modules.items():  # (already on their host copies: drops what their layers had prepared)
            _point_at(m, self.host[key])
        self.handles = [m.register_forward_pre_hook(self._before_forward) for m in self.modules.values()]

    def _before_forward(self, module: nn.Module, _args: Any) -> None:
        self.activate(module)

    def activate(self, module: nn.Module) -> None:
        """`module` on the device, the one there before back on its host copies."""
        if self.active is module:
            return
        if self.active is not None:
            _point_at(self.active, self.host[id(self.active)])
        _point_at(module, {name: t.to(self.device, non_blocking=True) for name, t in self.host[id(module)].items()})
        self.active = module
        self.swaps += 1

    def on_device(self) -> list[str]:
        """The slots whose expert is on the device now (both names for one module in both)."""
        return [n for n, m in self.experts.items() if m is self.active]

    def remove(self) -> None:
        """Hooks off; every expert back on the device, as a plan without offload has them."""
        for h in self.handles:
            h.remove()
        for key, module in self.modules.items():
            _point_at(module, {n: t.to(self.device) for n, t in self.host[key].items()})
        self.active = None


def _host_copies(model: nn.Module, pin: bool) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by name, in host memory (pinned if `pin`), each
    put in place as soon as it is made, so the host holds one expert's unpinned and pinned
    copies together one tensor at a time, not whole."""
    out: dict[str, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h = t.detach().to("cpu")
        out[name] = h.pin_memory() if pin else h
        _set(model, name, out[name])
    return out


def _set(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Parameter `name` now holds `t` (the same Parameter object: dynamo's guards see the same
    modules), or buffer `name` is `t`."""
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner)
    if leaf in mod._parameters and mod._parameters[leaf] is not None:
        mod._parameters[leaf].data = t
    else:
        mod._buffers[leaf] = t


def _point_at(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make `model`'s parameters and buffers these tensors, and drop any backend weight
    prepared from the old ones."""
    from gpubake.kernels.linear import NVFP4Linear

    for name, t in tensors.items():
        _set(model, name, t)
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            m._prepared = None


def apply_expert_offload(pipe: Any, on: bool, device: torch.device | str) -> dict[str, Any]:
    """Put `pipe`'s experts under an `ExpertOffload` (`on`), or take one off; what was done."""
    old: ExpertOffload | None = getattr(pipe, "_gpubake_expert_offload", None)
    if old is not None:
        old.remove()
        pipe._gpubake_expert_offload = None
    if not on:
        return {}
    experts = experts_of(pipe)
    if len({id(m) for m in experts.values()}) < 2:
        return {"expert_offload": "off: one expert, nothing to swap"}
    pipe._gpubake_expert_offload = ExpertOffload(experts, device)
    one = next(iter(pipe._gpubake_expert_offload.host.values()))
    return {"expert_offload": "on", "expert_bytes": sum(t.numel() * t.element_size() for t in one.values())}

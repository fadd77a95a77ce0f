"""`load_pipeline(path)`: a diffusers Wan pipeline from a BF16, NVFP4 or FP8 gpubake checkpoint.

NVFP4 experts are built without ever materialising BF16 weights for the quantized
linears: the transformer is constructed with parameters on the meta device, each
quantized `nn.Linear` is swapped for a meta `NVFP4Linear` (an FP8 one for a meta
`FP8Linear`, `layout.fp8_modules`), the checkpoint's keys and
shapes are checked against that model (one-line error naming the first missing, extra
or mis-shaped key), and the tensors are then *assigned* (not copied). The remaining
components (VAE, UMT5, tokenizer, scheduler) and the boundary ratio go through
diffusers' own `from_pretrained`, which places them on the GPU itself ($GPUBAKE_LOAD_DIRECT),
while a thread reads the experts' tensors ($GPUBAKE_LOAD_OVERLAP): on an H200 the A14B's load
at boot fell from 27.8 s to 17.3 s with both and the self-test's pre-import
(docs/benchmarks.md). `load_phases` says where a load's time went.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpubake import envs
from gpubake.errors import KernelError
from gpubake.provisioning import layout, trust
from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest, verify_tree


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                "fp16": torch.float16, "float16": torch.float16}[str(dtype)]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r} (bf16, fp16 or fp32)") from None


def checkpoint_format(path: Path) -> str:
    """'nvfp4', 'fp8' or 'bf16' (from the manifest, else from the tensors present)."""
    trust.guard_checkpoint(path)  # the shard headers read below are listed ones
    if (path / MANIFEST_NAME).is_file():
        fmt = read_manifest(path).get("format")
        if fmt in layout.QUANTIZED_FORMATS:
            return fmt
    for e in layout.expert_dirs(layout.model_index(path)):
        found = layout.stored_format(layout.tensor_shapes(layout.shard_files(path / e)))
        if found is not None:
            return found
    return "bf16"


def swap_linears(model: Any, modules: set[str], static: set[str] = frozenset(), fp8: set[str] = frozenset()) -> None:
    """Replace each named nn.Linear of `model` with an NVFP4Linear of the same shape (meta),
    or an FP8Linear for those in `fp8`; those in `static` expect the optional static
    activation scale (`layout.static_scale_modules`)."""
    import torch

    from gpubake.kernels.fp8_linear import FP8Linear
    from gpubake.kernels.linear import NVFP4Linear

    for name in sorted(set(modules) | set(fp8)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, torch.nn.Linear):
            kind = "FP8" if name in fp8 else "NVFP4"
            raise CheckpointError(f"{name}: stored as {kind} but is not a Linear in WanTransformer3DModel")
        with torch.device("meta"):
            if name in fp8:
                new = FP8Linear(old.in_features, old.out_features, bias=old.bias is not None)
            else:
                new = NVFP4Linear(old.in_features, old.out_features, bias=old.bias is not None,
                                  static_input_scale=name in static)
        setattr(parent, child, new)


def load_expert(expert: Path, dtype: Any = None, device: str = "cpu") -> Any:
    """One WanTransformer3DModel (BF16 or NVFP4 linears) from a component directory."""
    empty = EmptyExpert.build(expert, dtype)
    return empty.finish(empty.read(device), device)


@dataclasses.dataclass
class EmptyExpert:
    """An expert's model with meta parameters, checked against its checkpoint's keys and
    shapes, and where its tensors are: built, then `read` (tensor copies only, safe in a
    thread), then `finish` (assigns them).

    Why the split: building a model (accelerate's `init_empty_weights`) and assigning
    parameters (`register_parameter`) go through process-wide patches that diffusers'
    `from_pretrained` also installs while it loads, so those two run on the loading thread;
    only the reads, the load's long part, may overlap it ($GPUBAKE_LOAD_OVERLAP)."""

    path: Path
    model: Any
    shards: list[Path]
    quantized: set[str]
    dtype: Any

    @classmethod
    def build(cls, expert: Path, dtype: Any = None) -> EmptyExpert:
        import torch

        dtype = _torch_dtype(dtype or torch.bfloat16)
        cfg = layout.transformer_config(expert)
        shards = layout.shard_files(expert)
        actual = layout.tensor_shapes(shards)
        model = layout.empty_transformer(cfg)
        nvfp4, fp8 = layout.quantized_modules(actual), layout.fp8_modules(actual)
        quantized = nvfp4 | fp8
        if quantized:
            swap_linears(model, nvfp4, layout.static_scale_modules(actual), fp8)
        expected, _ = layout.expected_shapes(model)
        layout.check_tensors(actual, expected, str(expert))
        return cls(expert, model, shards, quantized, dtype)

    def read(self, device: str) -> dict[str, Any]:
        """The state dict on `device`: NVFP4 and FP8 tensors as stored (float8 weights, float32
        scales; their biases too), the rest in the model's dtype
        (fp32 where the model keeps modules in fp32)."""
        import torch

        fp32_names = set(self.model._keep_in_fp32_modules or ())
        state: dict[str, Any] = {}
        for key, t in _read_tensors(self.shards, device, envs.GPUBAKE_LOAD_THREADS):
            module = key.rpartition(".")[0]
            if module in self.quantized or not t.is_floating_point():
                state[key] = t
            elif fp32_names.intersection(key.split(".")) and self.dtype != torch.float32:
                state[key] = t.to(torch.float32)
            else:
                state[key] = t.to(self.dtype)
        return state

    def finish(self, state: dict[str, Any], device: str) -> Any:
        try:
            self.model.load_state_dict(state, strict=True, assign=True)
        except KernelError as exc:  # a bad static activation scale, named by its key
            raise CheckpointError(f"{self.path}: {exc}") from None
        self.model.to(device)
        self.model.eval()
        return self.model


def _read_tensors(shards: list[Path], device: str, threads: int) -> list[tuple[str, Any]]:
    """Every (key, tensor) of `shards`, on `device`.

    One thread: safetensors' `load_file`, shard by shard (what the boot measured: ~30 s for
    both A14B experts, the encoder and the VAE with the files in memory). Several: the keys
    split into `threads` runs of about equal size (elements), each read by its own `safe_open` handle
    in its own thread; the copies run in torch, outside the GIL, so the page faults and the
    host-to-device copies of several tensors overlap. The same tensors either way.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if threads <= 1:
        return [item for shard in shards for item in load_file(str(shard), device=device).items()]
    sizes = {(shard, key): math.prod(shape) for shard in shards
             for key, shape in layout.tensor_shapes([shard]).items()}  # from the headers
    runs: list[list[tuple[Path, str]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for item, size in sorted(sizes.items(), key=lambda kv: -kv[1]):  # largest first, to the lightest run
        i = loads.index(min(loads))
        runs[i].append(item)
        loads[i] += size

    def read(run: list[tuple[Path, str]]) -> list[tuple[str, Any]]:
        # this thread's own handles, one per shard it reads
        handles = {shard: safe_open(str(shard), framework="pt", device=device) for shard in {s for s, _ in run}}
        return [(key, handles[shard].get_tensor(key)) for shard, key in run]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpubake-load") as pool:
        return [item for got in pool.map(read, [r for r in runs if r]) for item in got]


def load_pipeline(path: str | os.PathLike[str], device: str = "cpu", dtype: Any = None, *, verify: bool = False,
                  host_components: tuple[str, ...] = (), require_manifest: bool = False) -> Any:
    """The diffusers Wan pipeline (both experts and boundary_ratio) for checkpoint `path`.

    Only files the manifest lists are read: a checkpoint holding any other file (an
    injected index and shard, say) or a symlink out of `path` is refused with a
    `trust.TrustError` naming it, before any file is opened. `require_manifest` (the
    serving path) refuses a directory without one.

    `verify=True` first checks every file against gpubake-manifest.json (slow for
    full-size weights; the self-test does it once at boot). `host_components` stay in
    host memory (the runtime plan shrinks the text encoder layer by layer on its way to
    the GPU, so its BF16 weights never sit there whole).
    """
    import torch

    path = Path(path)
    dtype = _torch_dtype(dtype or torch.bfloat16)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    trust.guard_checkpoint(path, require_manifest=require_manifest)
    index = layout.model_index(path)
    if verify:
        verify_tree(path)
    seconds: dict[str, float] = {}  # where a load's time goes (the boot's largest part: docs/benchmarks.md)
    names = layout.expert_dirs(index)
    where = {e: "cpu" if e in host_components else device for e in names}
    overlap = envs.GPUBAKE_LOAD_OVERLAP == "on"
    if not overlap:
        experts = {}
        for e in names:
            t0 = time.perf_counter()
            experts[e] = load_expert(path / e, dtype=dtype, device=where[e])
            seconds[e] = time.perf_counter() - t0
        pipe = _other_components(path, index, dtype, device, host_components, experts, seconds)
    else:
        # $GPUBAKE_LOAD_OVERLAP: the experts' tensors are read in a thread while diffusers loads
        # and moves the other components (copies and page faults run outside the GIL)
        t0 = time.perf_counter()
        empty = {e: EmptyExpert.build(path / e, dtype) for e in names}
        seconds["experts_build"] = time.perf_counter() - t0

        def read_all() -> dict[str, tuple[dict[str, Any], float]]:
            out = {}
            for e in names:
                t1 = time.perf_counter()
                out[e] = (empty[e].read(where[e]), time.perf_counter() - t1)
            return out

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpubake-experts") as pool:
            pending = pool.submit(read_all)  # a failed load below still waits for it (the with's exit)
            # WanPipeline's experts are optional: from_pretrained leaves them out
            pipe = _other_components(path, index, dtype, device, host_components, dict.fromkeys(names), seconds)
            t0 = time.perf_counter()
            states = pending.result()
            seconds["experts_wait"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for e in names:
            seconds[e] = states[e][1]
        pipe.register_modules(**{e: empty[e].finish(states[e][0], where[e]) for e in names})
        seconds["experts_assign"] = time.perf_counter() - t0
    pipe._gpubake_load_seconds = {k: round(v, 3) for k, v in seconds.items()}
    return pipe


def _other_components(path: Path, index: dict[str, Any], dtype: Any, device: str, host_components: tuple[str, ...],
                      experts: dict[str, Any], seconds: dict[str, float]) -> Any:
    """The pipeline through diffusers' `from_pretrained` with `experts` (models, or None to
    leave them out), its other modules on `device` (those in `host_components` stay)."""
    import torch
    import diffusers

    t0 = time.perf_counter()
    cls = getattr(diffusers, index["_class_name"])  # diffusers imports a pipeline's module on first use
    seconds["pipeline_class"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    placed = direct_device_map(device, host_components)
    try:
        pipe = cls.from_pretrained(str(path), dtype=dtype, **({"device_map": placed} if placed else {}), **experts)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: diffusers could not load a component ({' '.join(str(exc).split())[:200]})") from None
    seconds["other_components"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not host_components:
        pipe = pipe.to(device)
    else:
        for name, comp in pipe.components.items():
            if isinstance(comp, torch.nn.Module) and name not in host_components:
                comp.to(device)
    seconds["to_device"] = time.perf_counter() - t0
    return pipe


def direct_device_map(device: str, host_components: tuple[str, ...] = ()) -> str | None:
    """`from_pretrained`'s device_map when $GPUBAKE_LOAD_DIRECT is on and diffusers can place
    every component on `device` itself: "cuda" for cuda / cuda:0 (diffusers 0.42 takes the
    device type, not an index), "cpu" for the CPU; else None (load on the host, then move)."""
    import torch

    if envs.GPUBAKE_LOAD_DIRECT != "on" or host_components:
        return None
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    return "cuda" if dev.type == "cuda" and dev.index in (None, 0) else None


def load_phases(pipe: Any) -> dict[str, float]:
    """Seconds per phase of `pipe`'s load (each expert, the other components, the move to
    the device); {} for a pipeline this module did not load."""
    return dict(getattr(pipe, "_gpubake_load_seconds", None) or {})

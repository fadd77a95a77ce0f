"""`gpubake quantize SRC DEST [--format nvfp4|fp8]`: a BF16 Wan 2.2 diffusers checkpoint -> NVFP4
(default) or FP8-weight experts.

Streams: each shard is opened with safetensors `safe_open` (memory-mapped) and read
one tensor at a time; the quantized shard is written before the next is opened, so
peak memory is about one output shard plus one layer in float32, whatever the model
size (bench/bench_quantize.py measures it on a full-size A14B expert).

Per quantized linear `P` the output holds `P.weight_packed` (uint8 [out, in/2]),
`P.weight_scale` (float8_e4m3fn [out, in/16], row-major), `P.weight_global_scale`
(float32 []) and `P.bias` (unchanged): the state-dict layout of
`gpubake.kernels.linear.NVFP4Linear`. With ``--format fp8`` it holds `P.weight`
(float8_e4m3fn [out, in]), `P.weight_scale` (float32 [out, 1], one scale per output row)
and `P.bias`: `gpubake.kernels.fp8_linear.FP8Linear`'s (W8A8 on FP8 tensor cores, for
cards with the memory for 1 byte a weight). The same policy picks the linears either way.
Everything else is copied: other transformer
tensors (kept in BF16, or fp32 for the modules diffusers keeps in fp32), and the VAE,
text encoder, tokenizer, scheduler and model_index byte for byte. The source is
verified against its own manifest before anything is written (`trust.verify_source`:
only files it lists are read, no symlink out of it is followed); the output manifest
records the source's files and hashes and how they were verified, the policy, the
SQNR of every quantized layer and the tool version.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from gpubake.errors import GpubakeError
from gpubake.fsutil import atomic_path, write_json_atomic
from gpubake.provisioning import layout, trust
from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.manifest import (
    MANIFEST_NAME,
    build_manifest,
    is_disk_full,
    normalise_modes,
    read_manifest,
    write_manifest,
)
from gpubake.provisioning.policy import Policy, get_policy

FORMAT = "nvfp4"
FP8_FORMAT = "fp8"
FORMATS = layout.QUANTIZED_FORMATS  # what `--format` takes, the manifest's "format"; a source in any is refused


ROWS_PER_CHUNK = 1024  # bounds the float32 temporaries of one layer to ~ROWS x in_features


def quantize_weight(w: Any, device: str = "cpu", out_device: str = "cpu") -> tuple[Any, float | None]:
    """NVFP4 of one [out, in] weight on `device` (Triton on CUDA, the reference on CPU),
    and its SQNR in dB (None when the error is exactly zero).

    The global scale comes from the whole tensor; rows are then quantized in chunks with
    that scale (bit-identical to one call, since blocks never cross rows), so the float32
    temporaries stay small whatever the layer size.
    """
    import torch

    from gpubake.kernels.format import NVFP4Tensor, amax_finite, dequantize_ref, global_scale_from_amax
    from gpubake.kernels.quantizer import quantizer_for

    x = w.to(device)
    quantize = quantizer_for(x.device)
    g = global_scale_from_amax(amax_finite(x))
    data, scales = [], []
    sig = err = 0.0
    for i in range(0, x.shape[0], ROWS_PER_CHUNK):
        xi = x[i : i + ROWS_PER_CHUNK]
        qi = quantize(xi, g)
        ref = xi.float()
        sig += float(ref.pow(2).sum(dtype=torch.float64))
        err += float((ref - dequantize_ref(qi, torch.float32)).pow(2).sum(dtype=torch.float64))
        data.append(qi.data.to(out_device))
        scales.append(qi.block_scale.to(out_device))
        del qi, ref
    q = NVFP4Tensor(torch.cat(data), torch.cat(scales), g.reshape(()).float().to(out_device), torch.Size(x.shape))
    return q, sqnr_db(sig, err)


def quantize_weight_fp8(w: Any, device: str = "cpu", out_device: str = "cpu") -> tuple[Any, Any, float | None]:
    """FP8 (E4M3, one float32 scale per output row: `fp8_linear.quantize_fp8_rowwise`) of one
    [out, in] weight on `device`, and its SQNR in dB (None when the error is exactly zero).
    Rows are independent, so they go in chunks: the float32 temporaries stay small."""
    import torch

    from gpubake.kernels.fp8_linear import dequantize_fp8, quantize_fp8_rowwise

    x = w.to(device)
    qs, scales = [], []
    sig = err = 0.0
    for i in range(0, x.shape[0], ROWS_PER_CHUNK):
        xi = x[i : i + ROWS_PER_CHUNK]
        q, s = quantize_fp8_rowwise(xi)
        ref = xi.float()
        sig += float(ref.pow(2).sum(dtype=torch.float64))
        err += float((ref - dequantize_fp8(q, s)).pow(2).sum(dtype=torch.float64))
        qs.append(q.to(out_device))
        scales.append(s.to(out_device))
        del q, s, ref
    return torch.cat(qs), torch.cat(scales), sqnr_db(sig, err)


def sqnr_db(signal: float, error: float) -> float | None:
    """10 log10(signal / error) in dB, to 4 places; None when the error (or signal) is zero."""
    return round(10.0 * math.log10(signal / error), 4) if error > 0 and signal > 0 else None


def check_format(fmt: str) -> str:
    """`--format`: nvfp4 or fp8 (one line naming the flag otherwise)."""
    if fmt not in FORMATS:
        raise GpubakeError(f"--format: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    return fmt


def default_device() -> str:
    """Where a build quantizes: `cuda` when torch sees a GPU (seconds an expert), else `cpu`
    (the reference quantizer, on every core: `cpu_threads`)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads() -> int:
    """Every core this process may run on (torch's default is the physical cores only)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _refuse_quantized_source(src: Path) -> None:
    """A source its manifest calls quantized, in any format, is not requantized."""
    fmt = read_manifest(src).get("format") if (src / MANIFEST_NAME).is_file() else None
    if fmt in FORMATS:
        raise CheckpointError(f"{src}: already quantized ({fmt}); quantize a BF16 checkpoint")


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    policy: str = "default",
    *,
    device: str = "cpu",
    progress: bool = True,
    model_id: str | None = None,
    trust_source: bool = False,
    fmt: str = FORMAT,
) -> dict[str, Any]:
    """Quantize `src` (BF16 diffusers Wan checkpoint) into `dest` as `fmt` (nvfp4 or fp8);
    returns a summary.

    `src` is verified against its own manifest first (`trust.verify_source`); only the
    files it lists are read. `trust_source` hashes an unverifiable source as it is."""
    t_start = time.monotonic()
    src, dest = Path(src), Path(dest)
    check_format(fmt)
    pol = get_policy(policy)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GpubakeError(f"{dest}: already exists and is not empty (remove it or choose another DEST)")
    # Before parsing anything: no symlink out of the source, no file its manifest does not list.
    trust.check_listing(src, trust_source=trust_source)
    index = layout.model_index(src)
    experts = layout.expert_dirs(index)
    configs = {e: layout.transformer_config(src / e) for e in experts}
    # Validate every expert before writing anything: a bad source fails in seconds.
    for e in experts:
        actual = layout.tensor_shapes(layout.shard_files(src / e))
        found = layout.stored_format(actual)
        if found is not None:
            raise CheckpointError(f"{src / e}: already quantized ({found}); quantize a BF16 checkpoint")
        exp, _ = layout.expected_shapes(layout.empty_transformer(configs[e]))
        layout.check_tensors(actual, exp, f"{src / e}")
    _refuse_quantized_source(src)
    source = trust.verify_source(src, trust_source=trust_source)
    hash_secs = time.monotonic() - t_start
    started = time.monotonic()
    layers: dict[str, Any] = {}
    stats = {"quantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0}
    threads = _use_all_cores() if device == "cpu" else None
    try:
        with atomic_path(dest) as tmp, _ShardProgress(progress, device) as bar:
            tmp.mkdir()
            for e in experts:
                _quantize_expert(src / e, tmp / e, pol, configs[e], device, layers, stats, bar, fmt)
            # Everything else the source's record lists, byte for byte (never an
            # unlisted file, nor DEST's own staging directory when DEST is inside SRC).
            copied = [rel for rel in sorted(source["files"]) if rel.split("/", 1)[0] not in experts]
            for rel in copied:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
            normalise_modes(tmp)
            sq = [v["sqnr_db"] for v in layers.values() if v["sqnr_db"] is not None]
            quant = {
                "format": fmt,
                **layout.QUANT_RECORDS[fmt],
                "policy": pol.to_json(),
                "experts": experts,
                "layers": layers,
                "summary": {
                    "quantized_layers": stats["quantized"],
                    "kept_tensors": stats["kept"],
                    "sqnr_db_min": min(sq) if sq else None,
                    "sqnr_db_mean": round(sum(sq) / len(sq), 4) if sq else None,
                },
            }
            src_model = read_manifest(src).get("model_id") if (src / MANIFEST_NAME).is_file() else None
            out_manifest = build_manifest(tmp, fmt=fmt, model_id=model_id or src_model, source=source, quantization=quant)
            trust.check_copies(out_manifest["files"], source["files"], copied + [f"{e}/config.json" for e in experts])
            write_manifest(tmp, out_manifest)
    except Exception as exc:
        if is_disk_full(exc):
            raise GpubakeError(f"{dest}: no space left on device while writing the quantized checkpoint") from None
        raise
    finally:
        if threads is not None:
            _restore_threads(threads)
    secs = time.monotonic() - started
    total_secs = time.monotonic() - t_start
    return {
        "dest": str(dest),
        "format": fmt,
        "policy": pol.name,
        "experts": experts,
        "quantized_layers": stats["quantized"],
        "kept_tensors": stats["kept"],
        "transformer_bytes_in": stats["bytes_in"],
        "transformer_bytes_out": stats["bytes_out"],
        "compression": round(stats["bytes_in"] / stats["bytes_out"], 3) if stats["bytes_out"] else None,
        "sqnr_db_min": quant["summary"]["sqnr_db_min"],
        "sqnr_db_mean": quant["summary"]["sqnr_db_mean"],
        "seconds": round(total_secs, 3),
        "quantize_seconds": round(secs, 3),  # read, quantize, write (after validation and source hashing)
        "validate_hash_seconds": round(hash_secs, 3),
    }


def _keep_fp32_names() -> tuple[str, ...]:
    from diffusers import WanTransformer3DModel

    return tuple(WanTransformer3DModel._keep_in_fp32_modules or ())


def _kept_tensor(key: str, t: Any, fp32_names: tuple[str, ...]) -> Any:
    """Non-quantized tensors: BF16, except modules diffusers keeps in fp32 (as stored)."""
    import torch

    if not t.is_floating_point():
        return t
    if any(part in fp32_names for part in key.split(".")):
        return t
    return t.to(torch.bfloat16)


def _use_all_cores() -> int:
    """Let torch's CPU ops use every core for the run; returns the previous thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    return before


def _restore_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class _ShardProgress:
    """One progress bar per shard (bytes of the source read so far, rate, ETA) on stderr,
    and an overall line per expert; a no-op when progress is off."""

    def __init__(self, enabled: bool, device: str) -> None:
        self.enabled, self.device = enabled, device
        self._p: Any = None

    def __enter__(self) -> _ShardProgress:
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            from gpubake.console import console

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                               TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self._p.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.stop()

    def expert(self, name: str, total: int) -> Any:
        if self._p is None:
            return None
        on = f"{self.device}, {cpu_threads()} cores" if self.device == "cpu" else self.device
        return self._p.add_task(f"quantize {name} ({on})", total=total)

    def shard(self, label: str, total: int) -> Any:
        return self._p.add_task(f"  {label}", total=total) if self._p is not None else None

    def advance(self, task: Any, n: int) -> None:
        if self._p is not None and task is not None:
            self._p.advance(task, n)

    def done(self, task: Any) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, visible=False)


def _quantize_expert(
    src: Path,
    dest: Path,
    pol: Policy,
    config: dict[str, Any],
    device: str,
    layers: dict[str, Any],
    stats: dict[str, int],
    bar: _ShardProgress,
    fmt: str = FORMAT,
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gpubake.kernels.format import weight_tensors
    from gpubake.kernels.fp8_linear import FP8_SCALE_KEY, FP8_WEIGHT_KEY

    dest.mkdir(parents=True)
    num_layers = int(config.get("num_layers", 0))
    fp32_names = _keep_fp32_names()
    model = layout.empty_transformer(config)
    _, linears = layout.expected_shapes(model)
    del model
    shards = layout.shard_files(src)
    weight_map: dict[str, str] = {}
    overall = bar.expert(src.name, sum(s.stat().st_size for s in shards))
    for i, shard in enumerate(shards, 1):
        out: dict[str, Any] = {}
        stats["bytes_in"] += shard.stat().st_size
        task = bar.shard(f"shard {i}/{len(shards)} {shard.name}", shard.stat().st_size)
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                t = f.get_tensor(key)
                read = t.numel() * t.element_size()
                if leaf == "weight" and module in linears and pol.quantizes(module, num_layers):
                    if t.shape[-1] % 16:
                        raise CheckpointError(f"{shard}: {key} has in_features {t.shape[-1]}, not a multiple of 16")
                    if fmt == FP8_FORMAT:
                        wq, scale, s = quantize_weight_fp8(t, device)
                        out.update({f"{module}.{FP8_WEIGHT_KEY}": wq.contiguous(),
                                    f"{module}.{FP8_SCALE_KEY}": scale.contiguous()})
                    else:
                        q, s = quantize_weight(t, device)
                        out.update({f"{module}.{k}": v.contiguous() for k, v in weight_tensors(q).items()})
                    layers[f"{src.name}/{module}"] = {"shape": list(t.shape), "sqnr_db": s}
                    stats["quantized"] += 1
                else:
                    out[key] = _kept_tensor(key, t, fp32_names).contiguous()
                    stats["kept"] += 1
                del t
                bar.advance(task, read)
                bar.advance(overall, read)
        save_file(out, str(dest / shard.name), metadata={"format": "pt"})
        stats["bytes_out"] += (dest / shard.name).stat().st_size
        weight_map.update({k: shard.name for k in out})
        del out
        bar.done(task)
    shutil.copyfile(src / "config.json", dest / "config.json")
    if (src / layout.INDEX_FILE).is_file():
        total = sum((dest / s.name).stat().st_size for s in shards)
        write_json_atomic(dest / layout.INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def quantize_model_inplace(model: Any, policy: str = "default", device: str | None = None,
                           fmt: str = FORMAT) -> dict[str, float | None]:
    """Swap the policy's nn.Linear modules of an in-memory WanTransformer3DModel for
    NVFP4Linear (`fmt` fp8: FP8Linear), one at a time (each BF16 weight is freed as soon as
    it is replaced); returns {module: SQNR dB}. The same math as `quantize_checkpoint`, for
    benchmarks that build full-size random models without writing them to disk.
    """
    import torch

    from gpubake.kernels.fp8_linear import FP8Linear
    from gpubake.kernels.linear import NVFP4Linear

    check_format(fmt)
    pol = get_policy(policy)
    num_layers = int(model.config.num_layers)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pol.quantizes(n, num_layers)]
    out: dict[str, float | None] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        dev = device or str(lin.weight.device)
        kind = FP8Linear if fmt == FP8_FORMAT else NVFP4Linear
        new = kind(lin.in_features, lin.out_features, bias=lin.bias is not None, device=dev,
                   dtype=lin.bias.dtype if lin.bias is not None else torch.bfloat16)
        if fmt == FP8_FORMAT:
            wq, scale, s = quantize_weight_fp8(lin.weight.detach(), dev, out_device=dev)
            new.load_fp8(wq, scale)
        else:
            q, s = quantize_weight(lin.weight.detach(), dev, out_device=dev)
            new.load_nvfp4(q)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach())
        setattr(parent, child, new)
        del lin
        out[name] = s
    return out

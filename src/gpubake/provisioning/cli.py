"""CLI commands of the checkpoint pipeline: fetch, make-tiny, quantize, import, fidelity.

Heavy imports (torch, diffusers, boto3, huggingface_hub) happen inside the commands.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from gpubake.console import console, emit_json


_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]{1,2})?)$")


def check_device(flag: str, device: str) -> str:
    """`cpu`, `cuda` or `cuda:N` that this machine has; checked before any work starts."""
    from gpubake.errors import GpubakeError

    if not _DEVICE.match(device):
        raise GpubakeError(f"{flag}: unknown device {device!r} (use cpu, cuda or cuda:N)")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise GpubakeError(f"{flag}: {device} is not available here ({count} CUDA device{'s' if count != 1 else ''})")
    return device


def check_positive(flag: str, value: int | None) -> None:
    """A size/count option: absent (the model's default) or at least 1, never silently replaced."""
    from gpubake.errors import GpubakeError

    if value is not None and value < 1:
        raise GpubakeError(f"{flag}: must be at least 1, got {value}")


def fetch_cmd(
    source: str = typer.Argument(..., help="hf://org/repo[@rev], s3://bucket/prefix, https://host/dir/ (with gpubake-manifest.json) or https://host/file, or a model id of the registry."),
    dest: Path = typer.Argument(..., help="Directory to create; appears only when every file verified."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected sha256 of the source's gpubake-manifest.json (or of the single https file)."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (R2, B2, MinIO); default AWS_ENDPOINT_URL or AWS."),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=64, help="Files transferred in parallel."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be fetched; write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Fetch a checkpoint, verify every file's sha256, place it atomically (resumes a .partial)."""
    from gpubake.provisioning.fetch import fetch
    from gpubake.provisioning.models import get_model

    if "://" not in source:
        model_id = source
        source = get_model(model_id).source
        if source.startswith("generate:"):
            from gpubake.errors import FetchError

            raise FetchError(f"SOURCE {model_id!r}: this model has no remote source; use `gpubake make-tiny`")
    result = fetch(source, dest, sha256=sha256, endpoint_url=endpoint_url, jobs=jobs, dry_run=dry_run, progress=not json_out)
    _report(result, json_out, f"fetched {result.get('files', '?')} files into {dest} (verified: {result.get('verified', '-')})")


def make_tiny_cmd(
    dest: Path = typer.Argument(..., help="Directory to create (diffusers layout)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Write a tiny random Wan 2.2 checkpoint (two experts, VAE, UMT5, tokenizer) for tests and the demo."""
    from gpubake.errors import GpubakeError
    from gpubake.provisioning.manifest import MANIFEST_NAME, sha256_file
    from gpubake.provisioning.tiny import make_tiny

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise GpubakeError(f"{dest}: already exists and is not empty")
    path = make_tiny(dest, seed=seed)
    result = {"dest": str(path), "seed": seed, "manifest_sha256": sha256_file(path / MANIFEST_NAME)}
    _report(result, json_out, f"tiny checkpoint written to {path}")


def quantize_cmd(
    src: Path = typer.Argument(..., help="BF16 diffusers Wan 2.2 checkpoint directory."),
    dest: Path = typer.Argument(..., help="Directory to create for the quantized checkpoint."),
    policy: str = typer.Option("default", "--policy", help="Quantization policy (policies.toml): default, keep-first-last, ffn-only."),
    fmt: str = typer.Option("nvfp4", "--format", help="nvfp4 (4-bit, any GPU) or fp8 (E4M3 weights, one scale per row: W8A8 on FP8 tensor cores, twice the weight memory)."),
    device: str = typer.Option("cpu", "--device", help="Where the math runs: cpu (reference) or cuda (Triton)."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Registry id recorded in the manifest."),
    trust_source: bool = typer.Option(False, "--trust-source", help="Do not verify SRC against its gpubake-manifest.json (needed for a source without one); its files are hashed as they are. Symlinks out of SRC are refused all the same."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Quantize the transformer experts to NVFP4 or FP8 (streams shard by shard) and write the manifest.

    SRC is first verified against its own manifest (written by `fetch` or `make-tiny`):
    a file it does not list, a wrong size or sha256, or a symlink out of SRC is refused."""
    check_device("--device", device)
    from gpubake.provisioning.models import get_model
    from gpubake.provisioning.quantize import check_format, quantize_checkpoint

    check_format(fmt)
    if model_id:
        get_model(model_id)
    result = quantize_checkpoint(src, dest, policy, device=device, progress=not json_out, model_id=model_id,
                                 trust_source=trust_source, fmt=fmt)
    _report(result, json_out, f"quantized {result['quantized_layers']} layers to {fmt} into {dest} "
                              f"(SQNR mean {result['sqnr_db_mean']} dB)")


def import_cmd(
    src: str = typer.Argument(..., help="The NVFP4 or FP8 checkpoint: a local file or folder, or any fetch source (hf://, s3://, https://)."),
    dest: Path = typer.Argument(..., help="Directory to create for the gpubake checkpoint (nvfp4 or fp8, as the source)."),
    fmt: str = typer.Option("auto", "--format", help="Producer: auto (from names and metadata), lightx2v, modelopt or comfy; the precision (NVFP4 or FP8) is read from the weights' dtype."),
    base: Optional[str] = typer.Option(None, "--base", help="The matching diffusers checkpoint, for what SRC lacks (text encoder, VAE, tokenizer, scheduler, configs)."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="Registry id recorded in the manifest (default: --base's)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Convert another tool's NVFP4 (LightX2V, ModelOpt, ComfyUI) or FP8 (LightX2V, ComfyUI) Wan 2.2 checkpoint exactly into gpubake's layout."""
    from gpubake.provisioning.importers.convert import import_checkpoint

    result = import_checkpoint(src, dest, fmt, base=base, model_id=model_id, progress=not json_out)
    inexact = f", {result['inexact_layers']} with a rounded global scale" if result["inexact_layers"] else ""
    used = " (recorded, unused)" if result["checkpoint_format"] == "fp8" else ""
    _report(result, json_out, f"imported {result['quantized_layers']} {result['format']} "
                              f"{result['checkpoint_format'].upper()} layers into {dest} ({result['exact_layers']} "
                              f"exact{inexact}; {result['activation_scales']} static activation scales{used})")


def fidelity_cmd(
    bf16: Path = typer.Argument(..., help="BF16 checkpoint."),
    nvfp4: Path = typer.Argument(..., help="Its NVFP4 quantization."),
    out: Path = typer.Option(Path("fidelity"), "--out", help="Directory for fidelity.json and contact_sheet.png."),
    prompt: list[str] = typer.Option(["a red cat running on the beach"], "--prompt", help="Prompt (repeatable)."),
    seed: list[int] = typer.Option([0], "--seed", help="Seed (repeatable)."),
    height: Optional[int] = typer.Option(None, "--height", help="Default: the model's registry height."),
    width: Optional[int] = typer.Option(None, "--width"),
    frames: Optional[int] = typer.Option(None, "--frames"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    device: str = typer.Option("cpu", "--device"),
    step_cache: Optional[str] = typer.Option(
        None, "--step-cache", help="A step cache on the NVFP4 run (GPUBAKE_RUNTIME's forms, e.g. mag:0.04): "
                                   "its quality cost against BF16 (run once without it to compare)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
) -> None:
    """Run BF16 and NVFP4 pipelines on fixed seeds/prompts: per-layer SQNR, per-step latent error, PSNR/SSIM, contact sheet."""
    for flag, value in (("--height", height), ("--width", width), ("--frames", frames), ("--steps", steps)):
        check_positive(flag, value)
    check_device("--device", device)
    if step_cache is not None:
        from gpubake.errors import GpubakeError
        from gpubake.provisioning.step_cache import StepCache, StepCacheError

        try:
            step_cache = str(StepCache.parse(step_cache))
        except StepCacheError as exc:
            raise GpubakeError(f"--step-cache: {exc}") from None
    from gpubake.provisioning.fidelity import run_fidelity

    report = run_fidelity(bf16, nvfp4, out, prompts=prompt, seeds=seed, height=height, width=width,
                          num_frames=frames, steps=steps, device=device, progress=not json_out,
                          step_cache=step_cache)
    s = report["summary"]
    _report(report, json_out, f"PSNR {s['psnr_db_mean']} dB, SSIM {s['ssim_mean']}, latent rel. error (last step) {s['latent_rel_err_last_mean']}; wrote {out}")


def _report(result: dict, json_out: bool, line: str) -> None:
    if json_out:
        emit_json(result)
    else:
        console.print(line)

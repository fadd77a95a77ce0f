"""Helpers shared by the tests of every part (on sys.path via pytest's `pythonpath`)."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate a test server, killing it if it does not exit within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def edit_context_code(ctx, text: str) -> None:
    """A code-only change in a rendered build context: `text` appended to gpubake/__init__.py
    inside the context's gpubake wheel (its RECORD line updated, every other entry kept
    byte for byte), and the wheel's new sha256 written where the Containerfile names it."""
    import base64
    import hashlib
    import json
    import zipfile
    from pathlib import Path

    ctx = Path(ctx)
    (wheel,) = (ctx / "app").glob("gpubake-*.whl")
    old_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    data = {info.filename: body for info, body in entries}
    init = data["gpubake/__init__.py"] + text.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(init).digest()).rstrip(b"=").decode()
    record_name = next(n for n in data if n.endswith(".dist-info/RECORD"))
    record = [f"gpubake/__init__.py,sha256={digest},{len(init)}" if line.startswith("gpubake/__init__.py,") else line
              for line in data[record_name].decode().splitlines()]
    data.update({"gpubake/__init__.py": init, record_name: ("\n".join(record) + "\n").encode()})
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as out:
        for info, _ in entries:
            out.writestr(info, data[info.filename])
    tmp.replace(wheel)
    new_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    containerfile = ctx / "Containerfile"
    assert old_sha in containerfile.read_text()
    containerfile.write_text(containerfile.read_text().replace(old_sha, new_sha))
    manifest = ctx / "context.json"
    if manifest.exists():
        files = json.loads(manifest.read_text())
        rel = f"app/{wheel.name}"
        files["files"][rel] = new_sha
        files["files"]["Containerfile"] = hashlib.sha256(containerfile.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(files, indent=2, sort_keys=True) + "\n")


def remove_store(root) -> None:
    """Delete a test's containers-storage: unmount what the overlay driver left mounted under
    it (its home's bind mount, layers of the last containers), deepest first, then remove."""
    import shutil
    from pathlib import Path

    root = Path(root).absolute()
    with open("/proc/self/mounts", encoding="utf-8") as fh:  # octal escapes: \040 is a space
        points = [line.split()[1].encode().decode("unicode_escape") for line in fh]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def decode_operand(data, blocked, rows: int, k: int):
    """An FP4 operand of `torch._scaled_mm` as it defines it: e2m1 x its un-swizzled block
    scale (no global scale); `data` packed bytes (uint8 or float4_e2m1fn_x2) [rows, k/2]."""
    import torch

    from gpubake.kernels.format import BLOCK, e2m1_decode, unpack_fp4, unswizzle_scales

    v = e2m1_decode(unpack_fp4(data.view(torch.uint8)))
    s = unswizzle_scales(blocked, rows, k // BLOCK).float()
    return (v.reshape(rows, -1, BLOCK) * s.unsqueeze(-1)).reshape(rows, k)


def tiny_forward(model, seed: int = 0):
    """One seeded forward of a tiny Wan expert (1 latent frame of 8 x 8, 16 text tokens, t=500),
    float32 out: what the checkpoint tests compare formats with."""
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 1, 8, 8, generator=g).bfloat16()
    ctx = torch.randn(1, 16, cfg.text_dim, generator=g).bfloat16()
    with torch.inference_mode():
        return model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=ctx,
                     return_dict=False)[0].float()


def edit_safetensors(path, fn) -> None:
    """Rewrite a safetensors file after `fn` changed its state dict in place (a broken fixture)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def import_refused(capsys, args: list[str], dest) -> str:
    """`gpubake import ARGS` refused as the CLI must refuse: exit 2, one `error:` line, no
    traceback, nothing at DEST and no temporary folder beside it; the line, whitespace-joined."""
    from gpubake.cli import _run

    rc = _run(["import", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}")]  # no temp left
    return " ".join(err.split())


def cpu_hopper_fp8():
    """hopper-fp8's arithmetic on the CPU: torch's CPU `_scaled_mm` takes row-wise E4M3, the
    Triton kernels run in the interpreter (the kernel tests' TRITON_INTERPRET=1)."""
    from gpubake.kernels.backends import HopperFp8

    class CpuHopperFp8(HopperFp8):
        needs_cuda = False
        caps = None

    return CpuHopperFp8()


def tiny_cpu_pipe(checkpoint):
    """The tiny NVFP4 checkpoint as the plain pipeline on the CPU, at its own recipe (tiny-4step)."""
    from gpubake.provisioning.loader import load_pipeline
    from gpubake.provisioning.models import get_recipe
    from gpubake.provisioning.sampling import apply_recipe

    p = load_pipeline(checkpoint, "cpu")
    p.set_progress_bar_config(disable=True)
    apply_recipe(p, get_recipe("tiny-4step"))
    return p


def guided_latents(pipe, steps: int):
    """A guided clip's final latents (both experts) and its block counts (`step_cache.count_blocks`)."""
    import torch

    from gpubake.provisioning.step_cache import count_blocks

    with count_blocks(pipe) as counts, torch.inference_mode():
        out = pipe("a fox in the snow", height=64, width=64, num_frames=5, num_inference_steps=steps,
                   guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator().manual_seed(1),
                   output_type="latent").frames
    return out.float(), counts

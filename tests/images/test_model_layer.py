"""The model cache's key follows the code that makes a checkpoint's bytes
(`provisioning.bake.code_identity`), found through its imports, not a list of file names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake.images import catalog, model_layer
from gpubake.provisioning import bake

SRC = Path(bake.__file__).resolve().parents[2]


def test_the_makers_closure_holds_the_byte_deciding_code():
    files = bake.code_files()
    for module in ("gpubake.provisioning.tiny", "gpubake.provisioning.quantize", "gpubake.provisioning.policy",
                   "gpubake.provisioning.layout", "gpubake.provisioning.manifest",
                   "gpubake.kernels.format"):  # quantize imports format inside a function
        assert module in files, module
    assert "provisioning/policies.toml" in files  # package data the policy module reads
    assert not [m for m in files if m.startswith(("gpubake.images", "gpubake.smoke_tests", "gpubake.provisioning.serving"))]


def test_the_key_of_a_generated_model_holds_the_code_identity():
    spec = catalog.find("demo")
    assert spec.model.source == "generate:tiny"
    assert model_layer.model_key(spec) == model_layer.model_key(spec)
    other = spec.model_copy(update={"model": spec.model.model_copy(update={"source": "hf://org/repo@main"})})
    assert model_layer.model_key(other) != model_layer.model_key(spec)


@pytest.fixture
def identity_of(tmp_path: Path):
    """identity_of(edit) -> code_identity() of a copy of src/ after `edit(copy's gpubake dir)`."""

    def run(edit) -> str:
        dest = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
        shutil.copytree(SRC / "gpubake", dest / "gpubake", ignore=shutil.ignore_patterns("__pycache__"))
        edit(dest / "gpubake")
        proc = subprocess.run(
            [sys.executable, "-c", "from gpubake.provisioning import bake; print(bake.code_identity())"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(dest)}, cwd=dest,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    return run


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_code_identity_moves_with_the_code_and_its_names(identity_of):
    base = identity_of(lambda root: None)
    assert identity_of(lambda root: None) == base  # same tree, same identity
    assert identity_of(lambda root: _append(root / "images" / "cli.py", "\n# unrelated\n")) == base
    assert identity_of(lambda root: _append(root / "kernels" / "format.py", "\n# rounding changed\n")) != base
    assert identity_of(lambda root: _append(root / "provisioning" / "policies.toml", "\n# recipe\n")) != base

    def rename_policy(root: Path) -> None:
        (root / "provisioning" / "policy.py").rename(root / "provisioning" / "recipes.py")
        quantize = root / "provisioning" / "quantize.py"
        quantize.write_text(quantize.read_text().replace("gpubake.provisioning.policy", "gpubake.provisioning.recipes"))

    def rename_and_edit(root: Path) -> None:
        rename_policy(root)
        _append(root / "provisioning" / "recipes.py", "\n# a new default\n")

    renamed = identity_of(rename_policy)
    assert renamed != base and identity_of(rename_and_edit) != renamed  # the renamed module is still in the key


def test_build_quantizes_on_every_core_with_a_bar_and_an_eta_per_shard(tiny_checkpoint, tmp_path, monkeypatch):
    """No GPU here: the quantizer runs on every core this process may use, and each shard gets
    a progress bar with its rate and ETA (stderr), as model_layer asks for at build time."""
    import io

    import torch
    from rich.console import Console

    from gpubake import console as console_mod
    from gpubake.provisioning import quantize

    assert bake.quantize_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    seen: list[int] = []
    real = quantize.quantize_weight

    def spy(w, device="cpu", out_device="cpu"):
        seen.append(torch.get_num_threads())
        return real(w, device, out_device)

    monkeypatch.setattr(quantize, "quantize_weight", spy)
    out = io.StringIO()
    monkeypatch.setattr(console_mod, "console", Console(file=out, force_terminal=True, width=200))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a process might have it: the build must not stay on one core
    try:
        bake.quantize_checkpoint(tiny_checkpoint, tmp_path / "q", "default", device="cpu", progress=True, model_id="tiny-wan2.2")
        assert seen and set(seen) == {quantize.cpu_threads()}  # all cores while quantizing
        assert torch.get_num_threads() == 1  # and back afterwards
    finally:
        torch.set_num_threads(before)
    text = out.getvalue()
    for expert in ("transformer", "transformer_2"):
        assert f"quantize {expert} (cpu, {quantize.cpu_threads()} cores)" in text
    assert "shard 1/1 diffusion_pytorch_model.safetensors" in text and "ETA" in text

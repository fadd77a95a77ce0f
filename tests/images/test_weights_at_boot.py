"""model.at = "boot": the image holds no weights; start.sh fetches (here: generates) them into
the volume with gpubake's own commands, quantizes, reuses them at the next boot, and points
the service at them. The Packer path copies the weights once and says what it does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake.images import catalog, model_layer, render

WRAPPER = """#!/bin/bash
# gpubake for the start script: the real commands, except that `serve` reports what it was given.
if [ "$1" = serve ]; then echo "SERVE GPUBAKE_MODEL_DIR=$GPUBAKE_MODEL_DIR"; exit 0; fi
echo "gpubake $1" >> "$CALLS"
exec "{python}" -m gpubake "$@"
"""


def _at_boot(name: str):
    spec = catalog.find(name)
    return spec.model_copy(update={"model": spec.model.model_copy(update={"at": "boot"})})


def _start_script(spec, target: str = "runpod") -> str:
    ctx = render.template_context(spec, target, render.RenderOptions())
    return render.render_template("start.sh.j2", ctx)


def test_an_hf_source_is_fetched_with_its_pinned_revision_and_quantized():
    spec = _at_boot("wan22-t2v-a14b-nvfp4-hopper")
    text = _start_script(spec)
    assert f"fetch {spec.model.source} \"$src\"" in text and "@5be7df9619b54f4e2667b2755bc6a756675b5cd7" in text
    assert "quantize \"$src\" \"$dest\" --format nvfp4 --policy default --model-id wan2.2-t2v-a14b" in text
    assert f'dest="$models/"wan2.2-t2v-a14b-{model_layer.model_key(spec)[:16]}' in text
    assert "fetch_model || log" in text
    built = _start_script(catalog.find("wan22-t2v-a14b-nvfp4-hopper"))
    assert "fetch_model" not in built  # weights in the image: nothing fetched at boot


@pytest.mark.slow
def test_start_script_bakes_the_weights_into_the_volume_once(tmp_path: Path):
    spec = _at_boot("demo")
    script = tmp_path / "start.sh"
    script.write_text(_start_script(spec))
    wrapper = tmp_path / "bin" / "gpubake"
    wrapper.parent.mkdir()
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    (tmp_path / "ws").mkdir()
    env = {**os.environ, "GPUBAKE_BIN": str(wrapper), "GPUBAKE_WORKSPACE": str(tmp_path / "ws"), "GPUBAKE_ETC": str(tmp_path / "etc"),
           "GPUBAKE_PYTHON_BIN": sys.executable, "CALLS": str(tmp_path / "calls"), "TRITON_INTERPRET": "1",
           "GPUBAKE_MODEL_DIR": "/opt/gpubake/model"}  # the image's ENV: start.sh points the service elsewhere
    for key in ("PUBLIC_KEY", "SSH_PUBLIC_KEY", "RUNPOD_SSH_PUBLIC_KEY"):
        env.pop(key, None)
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    dest = tmp_path / "ws" / "gpubake" / "models" / f"tiny-wan2.2-{model_layer.model_key(spec)[:16]}"
    assert f"SERVE GPUBAKE_MODEL_DIR={dest}" in first.stdout
    manifest = json.loads((dest / "gpubake-manifest.json").read_text())
    assert manifest["format"] == "nvfp4" and manifest["model_id"] == "tiny-wan2.2"
    from gpubake.provisioning.manifest import verify_tree

    verify_tree(dest)  # every file as its manifest says
    assert not (dest.parent / (dest.name + ".source")).exists()  # the BF16 source is gone once quantized
    assert (tmp_path / "calls").read_text().split() == ["gpubake", "make-tiny", "gpubake", "quantize"]
    second = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and f"SERVE GPUBAKE_MODEL_DIR={dest}" in second.stdout
    assert "fetched at an earlier boot" in second.stderr
    assert (tmp_path / "calls").read_text().split() == ["gpubake", "make-tiny", "gpubake", "quantize"]  # nothing again


def _packer_context(tmp_path: Path, spec) -> Path:
    ctx = tmp_path / "ctx"
    render.render_context(spec, "runpod", ctx, render.RenderOptions(timestamp=1_700_000_000))
    return ctx


def test_packer_step_moves_the_layer_folders_into_place_once(tmp_path: Path):
    """90-model.sh (Packer) merges model/<layer>/ into $PREFIX/model by renaming: no second copy."""
    spec = catalog.find("demo")
    ctx = _packer_context(tmp_path, spec)
    plan = model_layer.read_plan(ctx)
    for layer in plan:
        (ctx / "model" / layer.name / layer.component).mkdir(parents=True)
        (ctx / "model" / layer.name / layer.component / "w.bin").write_text(layer.name)
    (ctx / "model" / plan[-1].name / "gpubake-manifest.json").write_text("{}")
    inode = os.stat(ctx / "model" / plan[0].name / plan[0].component / "w.bin").st_ino
    prefix = tmp_path / "prefix"
    proc = subprocess.run(["sh", "scripts/90-model.sh"], cwd=ctx, capture_output=True, text=True,
                          env={**os.environ, "GPUBAKE_PREFIX": str(prefix)})
    assert proc.returncode == 0, proc.stderr
    assert os.stat(prefix / "model" / plan[0].component / "w.bin").st_ino == inode  # moved, not copied
    assert sorted(p.relative_to(prefix / "model").as_posix() for p in (prefix / "model").rglob("*") if p.is_file()) == \
        sorted([f"{layer.component}/w.bin" for layer in plan] + ["gpubake-manifest.json"])
    assert f"{len(plan)} weight layer folders" in proc.stderr


def test_packer_step_says_what_it_does_without_weights(tmp_path: Path):
    ctx = _packer_context(tmp_path / "boot", _at_boot("demo"))
    proc = subprocess.run(["sh", "scripts/90-model.sh"], cwd=ctx, capture_output=True, text=True,
                          env={**os.environ, "GPUBAKE_PREFIX": str(tmp_path / "p")})
    assert proc.returncode == 0 and "model.at = boot: no weights in the image; start.sh fetches them" in proc.stderr
    ctx = _packer_context(tmp_path / "build", catalog.find("demo"))
    proc = subprocess.run(["sh", "scripts/90-model.sh"], cwd=ctx, capture_output=True, text=True,
                          env={**os.environ, "GPUBAKE_PREFIX": str(tmp_path / "p")})
    assert proc.returncode == 2 and "no model/ in the build context" in proc.stderr

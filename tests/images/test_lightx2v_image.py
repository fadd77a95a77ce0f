"""The LightX2V 4-step catalog images: they render, their dry run names both sources pinned
by revision (or says which one is not pinned yet), and the spec's import fields are checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gpubake_spec_helpers import write_spec  # noqa: E402

from gpubake.errors import SpecError  # noqa: E402
from gpubake.images import catalog  # noqa: E402
from gpubake.images.spec import load_spec  # noqa: E402

BIN = Path(sys.executable).parent
IMAGES = ("wan22-t2v-a14b-lightx2v-nvfp4", "wan22-t2v-a14b-lightx2v-nvfp4-hopper")
LX = "hf://lightx2v/Wan2.2-NVFP4-Sparse@"
BASE = "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers@"
PINNED = re.compile(r"^hf://[^@]+@[0-9a-f]{40}$")


def build_image(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "build-image"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ})


def test_the_two_variants_are_the_a14b_images_archs_with_the_4step_model():
    for name, archs in zip(IMAGES, ({"sm_100", "sm_120"}, {"sm_89", "sm_90"})):
        spec = catalog.find(name)
        assert set(spec.gpu_archs) == archs and spec.model.id == "wan2.2-t2v-a14b-lightx2v-4step"
        assert spec.model.format == "lightx2v" and spec.model.quantization == "nvfp4"
        assert spec.model.source.startswith(LX) and spec.model.base.startswith(BASE)
        assert PINNED.match(spec.model.base)
        assert spec.model.files == ["Wan2.2-T2V-A14B_NVFP4_Sparse_high.safetensors",
                                    "Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors"]
        same = catalog.find(name.replace("-lightx2v", ""))  # the existing A14B image of the same GPUs
        assert (spec.cuda, spec.torch, spec.base.image, spec.python) == (same.cuda, same.torch, same.base.image,
                                                                         same.python)


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_renders_and_its_facts_name_the_model(name, tmp_path):
    proc = build_image("--target", "runpod", "--image", name, "--render-only", str(tmp_path / "ctx"), "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads((tmp_path / "ctx" / "image.json").read_text())
    assert facts["model"]["id"] == "wan2.2-t2v-a14b-lightx2v-4step" and facts["model"]["source"].startswith(LX)
    assert facts["throughput_key"] == "wan2.2-t2v-a14b-lightx2v-4step"
    assert (tmp_path / "ctx" / "Containerfile").is_file() and (tmp_path / "ctx" / "marketplace" / "runpod.json").is_file()


@pytest.mark.parametrize("name", IMAGES)
def test_the_dry_run_names_both_sources(name, tmp_path):
    proc = build_image("--target", "vastai", "--image", name, "--dry-run", "--json", "--dist", str(tmp_path / "dist"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    step = next(s for s in plan["steps"] if s["step"] == "prepare model")
    assert step["how"] == "import --format lightx2v" and step["model"] == "wan2.2-t2v-a14b-lightx2v-4step"
    assert step["source"].startswith(LX) and step["base"].startswith(BASE) and PINNED.match(step["base"])
    assert step["source"] in step["detail"] and step["base"] in step["detail"]
    assert step["files"] == ["Wan2.2-T2V-A14B_NVFP4_Sparse_high.safetensors",
                             "Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors"]
    # a source still on the placeholder says so, loudly (and the build refuses it: test_bake_import)
    assert step["unpinned"] == [n for n in ("source", "base") if not PINNED.match(step[n])]
    assert ("NOT PINNED" in step["detail"]) == bool(step["unpinned"])
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize(("edits", "expected"), [
    ([(r'^base = .*$', "")], 'model: format = "lightx2v" imports a quantized checkpoint: set quantization = "nvfp4" '
     'or "fp8" (its precision) and base'),
    ([(r'^quantization = "nvfp4"', 'quantization = "bf16"')], "imports a quantized checkpoint"),
    ([(r'^format = .*$', "")], "model: base and files go with format"),
    ([(r'^format = .*$', 'format = "gguf"')], "model.format: must be one of"),
    ([(r'^base = .*$', 'base = "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers"')],
     "model.base: must pin a commit (hf://org/repo@<40 hex>"),
    ([(r'^source = .*$', 'source = "hf://lightx2v/Wan2.2-NVFP4-Sparse@main"')], "model.source: must pin a commit"),
    ([(r'^source = .*$', 'source = "s3://bucket/lightx2v"')], "model: source: an imported checkpoint"),
    ([(r'^files = .*$', 'files = []')], "model.files: List should have at least 1 item"),
    ([(r'^files = .*$', 'files = ["a b"]')], "model.files[0]: invalid value 'a b'"),
])
def test_bad_import_fields_are_one_line_naming_the_field(tmp_path, edits, expected):
    path = write_spec(tmp_path, based_on="wan22-t2v-a14b-lightx2v-nvfp4-hopper", edits=edits)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert expected in str(exc.value) and "\n" not in str(exc.value), str(exc.value)

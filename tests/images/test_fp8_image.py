"""The FP8-weight image (`model.quantization = "fp8"`, `min_gpu_memory_gb`): spec, size table,
build plan, start script, the model layer's quantize step, the catalog entry and its listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gpubake.errors import BuildError, SpecError
from gpubake.images import catalog, layers, model_layer, render
from gpubake.images.spec import QUANTIZED, SCHEMA_FILE, parse_spec
from gpubake.provisioning import bake

FP8 = "wan22-t2v-a14b-fp8-hopper"
GB = 1_000_000_000
BIN = Path(sys.executable).parent
MODELS_TOML = Path(bake.__file__).parent / "models.toml"


def _spec_dict(name: str = FP8) -> dict:
    return tomllib.loads((catalog.CATALOG_DIR / f"{name}.toml").read_text())


def _error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="custom.toml")
    assert "\n" not in str(info.value)
    return str(info.value)


def _with(spec, **model):
    return spec.model_copy(update={"model": spec.model.model_copy(update=model)})


# ------------------------------------------------------------------ spec and schema


def test_the_fp8_image_validates_with_its_memory_floor():
    spec = catalog.find(FP8)
    assert spec.model.quantization == "fp8" and spec.min_gpu_memory_gb == 80 and spec.gpu_archs == ["sm_90"]
    assert spec.model.at == "build" and spec.model.revision and spec.model.format is None
    assert QUANTIZED == {"nvfp4": "NVFP4", "fp8": "FP8"}
    assert catalog.find("wan22-t2v-a14b-nvfp4-hopper").min_gpu_memory_gb is None  # optional: absent = any size


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(min_gpu_memory_gb=0), "custom.toml: min_gpu_memory_gb: Input should be greater than or equal to 1"),
        (lambda d: d.update(min_gpu_memory_gb="80"), "custom.toml: min_gpu_memory_gb: Input should be a valid integer"),
        (lambda d: d.update(min_gpu_memory_gb=80.5), "custom.toml: min_gpu_memory_gb: Input should be a valid integer"),
        (lambda d: d["model"].update(quantization="fp4"), "custom.toml: model.quantization: must be one of 'nvfp4', 'fp8' or 'bf16'"),
        (lambda d: d["model"].update(format="modelopt", base=d["model"]["source"]),
         'custom.toml: model: format = "modelopt" imports a quantized checkpoint: set quantization = "nvfp4" (its '
         'precision)'),
        (lambda d: d["model"].update(format="comfy", quantization="bf16", base=d["model"]["source"]),
         'custom.toml: model: format = "comfy" imports a quantized checkpoint: set quantization = "nvfp4" or "fp8"'),
    ],
)
def test_bad_fp8_fields_are_one_line(edit, expected):
    data = _spec_dict()
    edit(data)
    assert _error(data).startswith(expected)


def test_a_cpu_only_image_has_no_gpu_memory_floor():
    data = tomllib.loads((catalog.CATALOG_DIR / "demo.toml").read_text())
    data["min_gpu_memory_gb"] = 24
    assert 'min_gpu_memory_gb: a CPU-only image (cuda = "none") runs on no GPU' in _error(data)


def test_the_schema_file_carries_fp8_and_the_memory_floor():
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["min_gpu_memory_gb"]["anyOf"][0] == {"maximum": 4096, "minimum": 1, "type": "integer"}
    quant = schema["$defs"]["Model"]["properties"]["quantization"]
    assert quant["enum"] == ["nvfp4", "fp8", "bf16"] and ">= 80 GB" in quant["description"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(_spec_dict(), schema)
    bad = {**_spec_dict(), "min_gpu_memory_gb": 0}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_image_facts_and_labels_say_fp8():
    spec = catalog.find(FP8)
    facts = render.image_facts(spec, "runpod")
    assert facts.model.quantization == "fp8"
    assert type(facts).model_validate_json(facts.model_dump_json()).model.quantization == "fp8"  # image.json reads back
    assert render.labels(spec, "runpod")["ai.gpubake.quantization"] == "fp8"


# ------------------------------------------------------------------ size table and plan


def _fp8_from_nvfp4(nvfp4_bytes: int, num_layers: int, hidden: int, ffn: int) -> int:
    """FP8 bytes of an expert from its NVFP4 bytes: the default policy's 10 linears a block
    (q, k, v, out of both attentions, hidden x hidden; FFN hidden->ffn, ffn->hidden) swap
    0.5625 B/param + a 4-byte global scale for 1 B/param + a 4-byte scale per output row."""
    linears = [(hidden, hidden)] * 8 + [(ffn, hidden), (hidden, ffn)]  # (out, in)
    params = num_layers * sum(o * i for o, i in linears)
    rows = num_layers * sum(o for o, _ in linears)
    count = num_layers * len(linears)
    assert params * 9 % 16 == 0
    return nvfp4_bytes - (params * 9 // 16 + 4 * count) + params + 4 * rows


def test_fp8_bytes_of_every_expert_are_computed_from_the_shapes():
    shapes = tomllib.loads(MODELS_TOML.read_text())["models"]
    table = layers.size_table()["models"]
    for model_id, entry in table.items():
        arch = shapes[model_id]
        for name, comp in entry["components"].items():
            if comp["kind"] != "expert":
                assert "fp8_bytes" not in comp
                continue
            want = _fp8_from_nvfp4(comp["nvfp4_bytes"], arch["num_layers"], arch["hidden_dim"], arch["ffn_dim"])
            assert comp["fp8_bytes"] == want, (model_id, name)
            assert comp["quantized_params"] == arch["num_layers"] * (8 * arch["hidden_dim"] ** 2 + 2 * arch["hidden_dim"] * arch["ffn_dim"])
    assert table["wan2.2-t2v-a14b"]["components"]["transformer"]["fp8_bytes"] == 14_535_841_424  # the earlier computation


def test_component_bytes_follow_the_quantization():
    comp = layers.size_table()["models"]["wan2.2-t2v-a14b"]["components"]
    assert layers.component_bytes(comp["transformer"], "fp8") == 14_535_841_424
    assert layers.component_bytes(comp["transformer"], "nvfp4") == 8_378_981_584
    assert layers.component_bytes(comp["transformer"], "bf16") == comp["transformer"]["source_bytes"]
    assert layers.component_bytes(comp["text_encoder"], "fp8") == comp["text_encoder"]["source_bytes"]


def test_the_fp8_plan_holds_two_14_5_gb_experts_in_layers_of_at_most_4_gb():
    spec = catalog.find(FP8)
    out = layers.estimate(spec, gpu=False, cores=2).to_json()
    assert all(0 < layer["bytes"] <= 4 * GB for layer in out["layers"])
    experts = {c: sum(layer["bytes"] for layer in out["layers"] if layer["component"] == c) for c in ("transformer", "transformer_2")}
    assert experts == {"transformer": 14_535_841_424, "transformer_2": 14_535_841_424}
    assert 40 * GB < out["image_weight_bytes"] < 42 * GB  # two FP8 experts, the 11.4 GB encoder, the VAE
    nvfp4 = layers.estimate(catalog.find("wan22-t2v-a14b-nvfp4-hopper"), gpu=False, cores=2).to_json()
    assert out["download_bytes"] == nvfp4["download_bytes"]  # the same BF16 source, quantized at build
    assert out["quantize"]["params"] == 2 * 14_050_918_400 and out["disk_bytes"]["download"] == out["download_bytes"]
    sources = {layer["component"]: layer["source"] for layer in out["layers"]}
    assert sources["transformer"].endswith("transformer/ quantized to FP8 (default)")
    assert sources["text_encoder"].endswith("text_encoder/ as stored")


@pytest.mark.parametrize("name", [n for n in catalog.names() if catalog.find(n).cuda != "none" and catalog.find(n).model.at == "build"])
def test_every_container_disk_holds_its_weights_and_environment(name):
    """The image unpacks onto the rented container disk: its weights plus ~8 GB of Python
    environment, with room to spare (the FP8 image's ~41 GB of weights need more than 80 GB)."""
    spec = catalog.find(name)
    weights = layers.estimate(spec, gpu=False, cores=2).to_json()["image_weight_bytes"]
    assert weights + 8 * GB <= 0.6 * spec.runtime.container_disk_gb * GB, (weights, spec.runtime.container_disk_gb)


# ------------------------------------------------------------------ the model layer


def test_needs_quantizing_quantizes_bf16_and_refuses_another_quantized_format():
    fp8 = catalog.find(FP8)
    assert model_layer.needs_quantizing(fp8, "bf16") and model_layer.needs_quantizing(fp8, "unknown")
    assert not model_layer.needs_quantizing(fp8, "fp8")  # already in the spec's format: baked as it is
    with pytest.raises(BuildError) as info:
        model_layer.needs_quantizing(fp8, "nvfp4")
    assert str(info.value) == (f"model.source: {fp8.model.source} is already quantized (NVFP4), but "
                               'model.quantization = "fp8": give a BF16 source, or set quantization = "nvfp4"')
    nvfp4 = catalog.find("wan22-t2v-a14b-nvfp4-hopper")
    with pytest.raises(BuildError, match=r'already quantized \(FP8\), but model.quantization = "nvfp4"'):
        model_layer.needs_quantizing(nvfp4, "fp8")
    with pytest.raises(BuildError, match=r'already quantized \(NVFP4\), but model.quantization = "bf16"'):
        model_layer.needs_quantizing(_with(nvfp4, quantization="bf16"), "nvfp4")
    assert not model_layer.needs_quantizing(_with(nvfp4, quantization="bf16"), "bf16")


def _fake_source(dest: Path, fmt: str) -> None:
    dest.mkdir(parents=True)
    (dest / bake.MANIFEST_NAME).write_text(json.dumps({"format": fmt, "files": {}}))


def test_the_build_quantizes_an_fp8_spec_with_format_fp8(tmp_path, monkeypatch):
    calls: list[dict] = []

    def quantize_checkpoint(src, dest, policy="default", *, device="cpu", progress=True, model_id=None, fmt="nvfp4"):
        calls.append({"policy": policy, "model_id": model_id, "fmt": fmt, "src_format": json.loads(
            (Path(src) / bake.MANIFEST_NAME).read_text())["format"]})
        Path(dest).mkdir()

    monkeypatch.setattr(bake, "fetch", lambda uri, dest, **kw: _fake_source(Path(dest), "unknown"))
    monkeypatch.setattr(bake, "quantize_checkpoint", quantize_checkpoint)
    monkeypatch.setattr(bake, "quantize_device", lambda: "cpu")
    model_layer._make(catalog.find(FP8), tmp_path / "fp8")
    model_layer._make(catalog.find("wan22-t2v-a14b-nvfp4-hopper"), tmp_path / "nvfp4")
    assert calls == [{"policy": "default", "model_id": "wan2.2-t2v-a14b", "fmt": "fp8", "src_format": "unknown"},
                     {"policy": "default", "model_id": "wan2.2-t2v-a14b", "fmt": "nvfp4", "src_format": "unknown"}]
    assert not (tmp_path / "fp8.work").exists()


def test_an_nvfp4_source_for_an_fp8_image_is_refused_before_quantizing(tmp_path, monkeypatch):
    monkeypatch.setattr(bake, "fetch", lambda uri, dest, **kw: _fake_source(Path(dest), "nvfp4"))
    monkeypatch.setattr(bake, "quantize_checkpoint", lambda *a, **k: pytest.fail("quantized an NVFP4 checkpoint"))
    with pytest.raises(BuildError, match=r"is already quantized \(NVFP4\), but model.quantization = \"fp8\""):
        model_layer._make(catalog.find(FP8), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()  # nothing half-written


def test_an_fp8_import_spec_validates_and_the_build_asks_the_importer_for_fp8(tmp_path, monkeypatch):
    """`format = "lightx2v"` (or comfy) with `quantization = "fp8"`: another tool's FP8 checkpoint,
    imported with the spec's quantization as the precision the importer must find."""
    lx = catalog.find("wan22-t2v-a14b-lightx2v-nvfp4-hopper")
    data = _spec_dict("wan22-t2v-a14b-lightx2v-nvfp4-hopper")
    data["model"]["quantization"] = "fp8"
    spec = parse_spec(data, source="custom.toml")
    assert (spec.model.format, spec.model.quantization) == ("lightx2v", "fp8")
    assert "configs) (fp8)" in model_layer.describe(spec)["detail"]
    assert model_layer.model_key(spec) != model_layer.model_key(lx)
    calls = []
    monkeypatch.setattr(bake, "import_checkpoint", lambda *a, **k: calls.append(k["precision"]))
    model_layer._make(spec, tmp_path / "out")
    model_layer._make(lx, tmp_path / "out2")
    assert calls == ["fp8", "nvfp4"]


def test_describe_and_the_cache_key_name_the_format():
    fp8, nvfp4 = catalog.find(FP8), catalog.find("wan22-t2v-a14b-nvfp4-hopper")
    assert model_layer.describe(fp8)["how"] == "fetch, quantize a BF16 checkpoint to FP8 (default policy)"
    assert model_layer.describe(nvfp4)["how"] == "fetch, quantize a BF16 checkpoint to NVFP4 (default policy)"
    assert model_layer.model_key(fp8) != model_layer.model_key(_with(fp8, quantization="nvfp4"))


# ------------------------------------------------------------------ start.sh (weights at boot)


def _start_script(spec) -> str:
    return render.render_template("start.sh.j2", render.template_context(spec, "runpod", render.RenderOptions()))


def test_start_script_quantizes_an_fp8_image_at_boot_with_format_fp8():
    text = _start_script(_with(catalog.find(FP8), at="boot"))
    assert ('"$GPUBAKE_BIN" quantize "$src" "$dest" --format fp8 --policy default --model-id wan2.2-t2v-a14b '
            '--device "$device" || return 1') in text
    assert 'if [ "$fmt" != fp8 ]; then' in text and 'log "model: quantizing to "FP8" (' in text
    assert "    nvfp4) log \"model: \"" in text and "is already quantized (\"NVFP4\"), the image wants \"fp8; return 1 ;;" in text
    nvfp4 = _start_script(_with(catalog.find("wan22-t2v-a14b-nvfp4-hopper"), at="boot"))
    assert '"$GPUBAKE_BIN" quantize "$src" "$dest" --format nvfp4 --policy' in nvfp4
    assert "    fp8) log" in nvfp4 and 'if [ "$fmt" != nvfp4 ]; then' in nvfp4


def test_start_script_refuses_a_source_in_another_format(tmp_path: Path):
    """The rendered case statement, run by bash: an NVFP4 source for the FP8 image stops the
    fetch with one log line and never reaches quantize."""
    text = _start_script(_with(catalog.find(FP8), at="boot"))
    body = text.split("fetch_model() {", 1)[1].split("\n}\n", 1)[0]
    script = tmp_path / "t.sh"
    script.write_text("log() { echo \"LOG $*\"; }\nfetch_model() {" + body + "\n}\nfetch_model; echo rc=$?\n")
    home = tmp_path / "home"
    src = home / "models"
    src.mkdir(parents=True)
    dest_name = f"wan2.2-t2v-a14b-{model_layer.model_key(_with(catalog.find(FP8), at='boot'))[:16]}"
    (src / f"{dest_name}.source").mkdir()
    (src / f"{dest_name}.source" / "gpubake-manifest.json").write_text('{"format": "nvfp4"}')
    bin_ = tmp_path / "gpubake"
    bin_.write_text("#!/bin/sh\necho CALLED \"$@\"\n")
    bin_.chmod(0o755)
    env = {**os.environ, "GPUBAKE_HOME": str(home), "GPUBAKE_BIN": str(bin_), "GPUBAKE_PYTHON_BIN": sys.executable}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert "rc=1" in proc.stdout and "CALLED" not in proc.stdout, proc.stdout + proc.stderr
    assert "is already quantized (NVFP4), the image wants fp8" in proc.stdout


# ------------------------------------------------------------------ the console scripts


def _run(*args: str, script: str = "gpubake", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_images_lists_the_fp8_image_with_its_memory_floor():
    proc = _run("images", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["images"]}
    assert rows[FP8]["quantization"] == "fp8" and rows[FP8]["min_gpu_memory_gb"] == 80
    assert rows[FP8]["gpu_archs"] == ["sm_90"] and rows[FP8 + "-cu128"]["min_gpu_memory_gb"] == 80
    assert rows["wan22-t2v-a14b-nvfp4-hopper"]["min_gpu_memory_gb"] is None
    table = _run("images", env={"COLUMNS": "250"})
    line = next(x for x in (table.stdout + table.stderr).splitlines() if f"{FP8} " in x)  # the table goes to the console
    assert ">= 80 GB" in line and "(fp8)" in line


def test_dry_run_plans_the_fp8_build(tmp_path: Path):
    proc = _run("--target", "runpod", "--image", FP8, "--dry-run", "--json", "--dist", str(tmp_path / "dist"),
                script="build-image", env={"GPUBAKE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    model = next(s for s in plan["steps"] if s["step"] == "prepare model")
    assert model["quantization"] == "fp8" and model["how"] == "fetch, quantize a BF16 checkpoint to FP8 (default policy)"
    assert 40 * GB < plan["weights"]["image_weight_bytes"] < 42 * GB
    assert "quantized to FP8 (default)" in proc.stderr
    assert not (tmp_path / "dist").exists() and not (tmp_path / "cache" / "models").exists()


def test_render_only_says_how_to_quantize_to_fp8(tmp_path: Path):
    out = tmp_path / "ctx"
    proc = _run("--target", "vastai", "--image", FP8, "--render-only", str(out), "--json", script="build-image",
                env={"GPUBAKE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    left = json.loads(proc.stdout)["left_out"]
    assert left["commands"][1].startswith("gpubake quantize ") and " --format fp8 --policy default " in left["commands"][1]
    facts = json.loads((out / "image.json").read_text())
    assert facts["model"]["quantization"] == "fp8"
    weights = json.loads((out / "weights.json").read_text())
    assert weights["quantization"] == "fp8" and sum(x["bytes"] for x in weights["layers"]) > 40 * GB
    payload = json.loads((out / "marketplace" / "vastai.json").read_text())  # the template publish sends
    assert payload["extra_filters"]["gpu_ram"] == {"gte": 76000}  # MB: 95% of 80 GB x 1000


def test_the_tiny_model_of_an_fp8_image_is_fp8_and_quantized_so(tmp_path):
    """`build-image --tiny-model` keeps the image's format: the FP8 image's tiny model is made
    and quantized with `--format fp8` (so its CPU self-test runs the FP8 path its image.json
    names), an NVFP4 image's is NVFP4, and a BF16 image's stays the NVFP4 demo model."""
    from gpubake.images.cli import with_tiny_model
    from gpubake.provisioning.manifest import read_manifest

    tiny = with_tiny_model(catalog.find(FP8))
    assert (tiny.model.id, tiny.model.quantization, tiny.model.source, tiny.cpu_ok) == (
        "tiny-wan2.2", "fp8", "generate:tiny", True)
    assert with_tiny_model(catalog.find("wan22-t2v-a14b-nvfp4-hopper")).model.quantization == "nvfp4"
    assert render.image_facts(tiny, "runpod").model.quantization == "fp8"
    model_layer._make(tiny, tmp_path / "tiny")  # make-tiny, then the real quantizer
    manifest = read_manifest(tmp_path / "tiny")
    assert manifest["format"] == "fp8" and manifest["quantization"]["weight_dtype"] == "float8_e4m3fn"

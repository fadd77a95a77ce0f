"""The image spec: load / parse / validate, one-line SpecErrors naming file and field."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).parent))
from gpubake_spec_helpers import write_spec  # noqa: E402

from gpubake.errors import SpecError  # noqa: E402
from gpubake.images import catalog  # noqa: E402
from gpubake.images.spec import SCHEMA_FILE, ImageSpec, json_schema_text, load_spec, load_toml, parse_spec  # noqa: E402


@pytest.mark.parametrize("name", catalog.names())
def test_every_shipped_spec_validates(name: str) -> None:
    spec = catalog.find(name)
    assert spec.name == name
    assert spec.source == (catalog.CATALOG_DIR / f"{name}.toml").resolve()
    assert spec.lock_path.is_file()


def test_catalog_ships_the_four_images() -> None:
    assert set(catalog.names()) >= {"demo", "wan22-t2v-a14b-nvfp4", "wan22-t2v-a14b-nvfp4-hopper", "wan22-ti2v-5b"}
    demo = catalog.find("demo")
    assert demo.cuda == "none" and demo.cpu_ok and demo.base.bootstrap is not None and demo.model.source == "generate:tiny"
    blackwell = catalog.find("wan22-t2v-a14b-nvfp4")
    assert set(blackwell.gpu_archs) == {"sm_100", "sm_120"}
    for name in ("wan22-t2v-a14b-nvfp4", "wan22-t2v-a14b-nvfp4-hopper", "wan22-ti2v-5b"):  # issue 17: buildable here
        gpu = catalog.find(name)
        assert gpu.base.bootstrap is not None and {"gcc", "python3-dev"} <= set(gpu.base.bootstrap.packages)  # Triton's JIT
        assert gpu.base.apt_mirror and gpu.base.apt_mirror.startswith("https://snapshot.debian.org/archive/debian/")
        assert gpu.model.revision and len(gpu.model.revision) == 40 and gpu.model.at == "build"
    assert set(catalog.find("wan22-t2v-a14b-nvfp4-hopper").gpu_archs) == {"sm_89", "sm_90"}
    assert catalog.find("wan22-ti2v-5b").model.id == "wan2.2-ti2v-5b"


def _error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ([(r'^cuda = .*$', "")], "custom.toml: cuda: missing required field"),
        ([(r'^gpu_archs', "gpu_arch")], "custom.toml: gpu_arch: unknown field"),
        ([(r"^container_disk_gb = 50$", 'container_disk_gb = "50"')], "custom.toml: runtime.container_disk_gb: Input should be a valid integer, got str '50'"),
        ([(r"^cpu_ok = false$", "cpu_ok = 0")], "custom.toml: cpu_ok: Input should be a valid boolean"),
        ([(r"@sha256:[0-9a-f]{64}", "")], "custom.toml: base.image: must be pinned by digest"),
        ([(r"@sha256:[0-9a-f]{64}", "@sha256:abc")], "custom.toml: base.image: must be pinned by digest"),
        ([(r'^targets = .*$', 'targets = ["runpod", "aws"]')], "custom.toml: targets[1]: must be one of 'runpod' or 'vastai', got 'aws'"),
        ([(r'"sm_89"', '"sm_75"')], "custom.toml: gpu_archs[0]: must be one of"),
        ([(r'"sm_90"', '"sm_89"')], "custom.toml: gpu_archs: listed twice: sm_89"),
        ([(r"port = 8000", "port = 70000")], "custom.toml: runtime.ports[0].port: Input should be less than or equal to 65535, got 70000"),
        ([(r'^env = \{', 'env = { HF_TOKEN = "hf_x", ')], "custom.toml: runtime.env: HF_TOKEN looks like a secret"),
        ([(r"@b8fff7315c768468a5333511427288870b2e9635", "@main")], "custom.toml: model.source: must pin a commit (hf://org/repo@<40 hex>"),
        ([(r"@b8fff7315c768468a5333511427288870b2e9635", "")], "custom.toml: model.source: must pin a commit"),
        ([(r'^apt_mirror = .*$', 'apt_mirror = "http://x.org/debian; rm -rf /"')], "custom.toml: base.apt_mirror: must be an http(s) mirror URL"),
        ([(r'^policy = "default"$', 'policy = "default"\nat = "runtime"')], "custom.toml: model.at: must be one of 'build' or 'boot', got 'runtime'"),
        ([(r'^quantization = "nvfp4"', 'quantization = "int4"')], "custom.toml: model.quantization: must be one of"),
        ([(r"^source = .*$", 'source = "ftp://x/y"')], "custom.toml: model.source: must be generate:tiny"),
        ([(r"^source = .*$", 'source = "https://h/w/?token=hf_abc"')], "custom.toml: model.source: https://h/w/?token=... carries a credential"),
        ([(r"^source = .*$", 'source = "https://u:p@h/w/"')], "custom.toml: model.source: must be generate:tiny"),
        ([(r'^id = .*$', 'id = "wan9-x"')], "custom.toml: model.id: unknown model id 'wan9-x' (known: "),
        ([(r'^id = .*$', r'id = "x\\ntouch /tmp/p\\n#"')], "custom.toml: model.id: invalid value 'x\\ntouch /tmp/p\\n#'"),
        ([(r'^description = .*$', r'description = "a\\nb"')], "custom.toml: description: invalid value 'a\\nb'"),
        ([(r'^volume_mount = .*$', 'volume_mount = "/workspace/../etc"')], "custom.toml: runtime.volume_mount: invalid value"),
        ([(r'^entrypoint = .*$', 'entrypoint = ["/opt/gpubake/start.sh; id"]')], "custom.toml: runtime.entrypoint[0]: invalid value"),
        ([(r'^env = \{', r'env = { X = "a\\u0000b", ')], "custom.toml: runtime.env.X: invalid value 'a\\x00b'"),
        ([(r'^env = \{', 'env = { "X Y" = "1", ')], "custom.toml: runtime.env['X Y'][key]: invalid value 'X Y'"),
        ([(r'^lock = .*$', 'lock = "../../etc/passwd.txt"')], "custom.toml: python.lock: must be a path inside the catalog directory"),
        ([(r"^\[base\]$", '[base.bootstrap]\nsuite = "bookworm"\n[base]')], "custom.toml: base: set exactly one of base.image or [base.bootstrap]"),
        ([(r"^schema_version = 1$", "schema_version = 2")], "custom.toml: schema_version: must be one of 1, got 2"),
    ],
)
def test_bad_spec_gives_one_line_naming_file_and_field(tmp_path: Path, edits: list, expected: str) -> None:
    assert expected in _error(write_spec(tmp_path, edits=edits))


def test_several_errors_are_counted_on_the_one_line(tmp_path: Path) -> None:
    message = _error(write_spec(tmp_path, edits=[(r"^cuda = .*$", ""), (r"^torch = .*$", "")]))
    assert message.startswith(f"{tmp_path / 'custom.toml'}: cuda: missing required field (and 1 more error)")


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    path = write_spec(tmp_path)
    path.rename(tmp_path / "other.toml")
    assert "other.toml: name: 'custom' must equal the file name stem 'other'" in _error(tmp_path / "other.toml")


def test_invalid_toml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\ncuda = \n', encoding="utf-8")
    assert "broken.toml: invalid TOML: " in _error(path) and "line 2" in _error(path)


def test_missing_file(tmp_path: Path) -> None:
    assert _error(tmp_path / "nope.toml").endswith("nope.toml: no such spec file")


def test_lock_must_exist_and_pin_with_hashes(tmp_path: Path) -> None:
    path = write_spec(tmp_path, edits=[(r'^lock = .*$', 'lock = "locks/mine.txt"')])
    assert "custom.toml: python.lock: mine.txt not found" in _error(path)
    lock = tmp_path / "locks" / "mine.txt"
    lock.write_text("torch==2.11.0 \\\n    --hash=sha256:" + "a" * 64 + "\nnumpy==2.0.0\n", encoding="utf-8")
    assert "custom.toml: python.lock: mine.txt: numpy==2.0.0 has no --hash=sha256:" in _error(path)
    lock.write_text("numpy>=2 --hash=sha256:" + "a" * 64 + "\n", encoding="utf-8")
    assert "requirement not pinned with ==: 'numpy>=2'" in _error(path)
    lock.write_text("# nothing\n", encoding="utf-8")
    assert "pins no requirements" in _error(path)


def test_lock_torch_pin_must_match_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, edits=[(r'^lock = .*$', 'lock = "locks/mine.txt"')])
    (tmp_path / "locks" / "mine.txt").write_text("torch==2.10.0 --hash=sha256:" + "b" * 64 + "\n", encoding="utf-8")
    assert "custom.toml: torch: '2.11.0' but locks/mine.txt pins torch==2.10.0" in _error(path)
    (tmp_path / "locks" / "mine.txt").write_text("torch==2.11.0+cu126 --hash=sha256:" + "b" * 64 + "\n", encoding="utf-8")
    assert "custom.toml: cuda: '13.0' but locks/mine.txt pins torch==2.11.0+cu126" in _error(path)


def test_parse_is_separate_from_validate() -> None:
    data = load_toml(catalog.CATALOG_DIR / "demo.toml")
    spec = parse_spec(data, source="demo.toml")
    assert isinstance(spec, ImageSpec) and spec.source is None  # no file system checks yet
    with pytest.raises(SpecError, match=r"^x: a spec is a TOML table, got list$"):
        parse_spec([], source="x")


def test_spec_is_immutable() -> None:
    spec = catalog.find("demo")
    with pytest.raises(ValidationError, match="frozen"):
        spec.cuda = "12.8"  # type: ignore[misc]


def test_json_schema_file_matches_the_model() -> None:
    """`python -m gpubake.images.spec` regenerates it; a model change without it fails here."""
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text()
    schema = json.loads(json_schema_text())
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"name", "targets", "cuda", "torch", "base", "python", "model", "runtime"}


def test_every_shipped_spec_satisfies_the_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    for name in catalog.names():
        jsonschema.validate(tomllib.loads((catalog.CATALOG_DIR / f"{name}.toml").read_text()), schema)


def test_lock_must_really_be_inside_the_catalog_directory(tmp_path: Path) -> None:
    """Compared as resolved paths: a symlink out of the spec's directory is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    catalog_dir = tmp_path / "cat"
    catalog_dir.mkdir()
    path = write_spec(catalog_dir, edits=[(r'^lock = .*$', 'lock = "locks/mine.txt"')])
    real = outside / "mine.txt"
    real.write_text("torch==2.11.0 --hash=sha256:" + "b" * 64 + "\n", encoding="utf-8")
    (catalog_dir / "locks" / "mine.txt").symlink_to(real)
    assert f"custom.toml: python.lock: locks/mine.txt leads out of {catalog_dir.resolve()} (to {real})" in _error(path)
    (catalog_dir / "locks" / "mine.txt").unlink()
    (catalog_dir / "locks" / "elsewhere.txt").write_text(real.read_text(), encoding="utf-8")
    (catalog_dir / "locks" / "mine.txt").symlink_to("elsewhere.txt")  # a symlink that stays inside is fine
    assert load_spec(path).python.lock == "locks/mine.txt"

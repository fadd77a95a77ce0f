"""image.json at boot: `ImageFacts.read` (one line for a bad file), where the self-test and the
service find it (`facts.resolve`), and that the boot reads it instead of the spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake.cli import _run
from gpubake.images.catalog import find
from gpubake.images.render import image_facts
from gpubake.provisioning import facts
from gpubake.provisioning.facts import FactsError, ImageFacts


@pytest.fixture
def demo_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.json"
    image_facts(find("demo"), "vastai").write(path)
    return path


def test_facts_read_back_as_written(demo_file: Path):
    got = ImageFacts.read(demo_file)
    assert got == image_facts(find("demo"), "vastai")
    assert got.target == "vastai" and got.targets == ["runpod", "vastai"] and got.throughput_key == "tiny-wan2.2"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.pop("cuda"), "cuda: Field required"),
        (lambda d: d.update(gpu_arch=["sm_90"]), "gpu_arch: Extra inputs are not permitted"),
        (lambda d: d.update(target="lambda"), "target: Input should be 'runpod' or 'vastai'"),
        (lambda d: d["model"].update(quantization="int4"), "model.quantization: Input should be 'nvfp4', 'fp8' or 'bf16'"),
        (lambda d: d.update(cuda="12.8", min_driver=None), "min_driver: must be set exactly when cuda is not 'none'"),
    ],
)
def test_a_bad_facts_file_is_one_line_naming_file_and_field(demo_file: Path, change, needle):
    data = json.loads(demo_file.read_text())
    change(data)
    demo_file.write_text(json.dumps(data))
    with pytest.raises(FactsError) as exc:
        ImageFacts.read(demo_file)
    assert str(exc.value).startswith(f"{demo_file}: ") and needle in str(exc.value), str(exc.value)


def test_missing_and_non_json_facts(tmp_path: Path):
    with pytest.raises(FactsError, match=r"image\.json: no image facts file"):
        ImageFacts.read(tmp_path / "image.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FactsError, match=r"bad\.json: not JSON"):
        ImageFacts.read(tmp_path / "bad.json")


def test_resolve_order(demo_file: Path, tmp_path: Path, monkeypatch):
    other = tmp_path / "other.json"
    image_facts(find("wan22-ti2v-5b"), "runpod").write(other)
    monkeypatch.setenv(facts.FACTS_ENV, str(other))
    monkeypatch.setenv(facts.IMAGE_ENV, "wan22-t2v-a14b-nvfp4")
    assert facts.resolve(demo_file).name == "demo"  # --facts first
    assert facts.resolve().name == "wan22-ti2v-5b"  # then $GPUBAKE_IMAGE_FACTS, over $GPUBAKE_IMAGE
    monkeypatch.setenv(facts.FACTS_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(FactsError, match="absent.json: no image facts file"):
        facts.resolve()  # a facts path that was set but is wrong is an error, not a fallback


def test_spec_names_need_the_command_line(monkeypatch):
    monkeypatch.setattr(facts, "_spec_facts", None)
    monkeypatch.delenv(facts.FACTS_ENV, raising=False)
    with pytest.raises(FactsError, match="^--image: naming an image spec needs the gpubake command line"):
        facts.resolve(image="demo")
    monkeypatch.setattr(facts, "_spec_facts", lambda ref: image_facts(find(ref), None))
    got = facts.resolve(image="demo")
    assert got.name == "demo" and got.target is None


def test_selftest_reads_the_facts_file(demo_file: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv(facts.IMAGE_ENV, raising=False)
    report = tmp_path / "r.json"
    rc = _run(["selftest", "--facts", str(demo_file), "--model-dir", str(tmp_path / "absent"), "--report", str(report)])
    assert rc == 3
    data = json.loads(report.read_text())
    assert data["image"] == "demo" and data["model_id"] == "tiny-wan2.2"
    assert data["stages"][0]["status"] == "pass" and "cpu_ok" in data["stages"][0]["message"]


def test_the_boot_imports_nothing_of_the_build_side(demo_file: Path, tmp_path: Path):
    """As in an image: the facts from $GPUBAKE_IMAGE_FACTS, the self-test run, gpubake.images never loaded."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gpubake.provisioning.facts import resolve\n"
        "from gpubake.smoke_tests.api import create_selftest\n"
        f"test = create_selftest(resolve(), Path({str(tmp_path / 'absent')!r}), Path({str(tmp_path / 'clip')!r}), device='cpu')\n"
        "report = test.run()\n"
        "print(report.verdict, report.image, sorted(m for m in sys.modules if m.startswith('gpubake.images')))\n"
    )
    env = {**os.environ, facts.FACTS_ENV: str(demo_file)}
    env.pop(facts.IMAGE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "fail demo []"

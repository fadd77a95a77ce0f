"""build-image through the real console script: bad input -> one line + exit 2; render-only; dry-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from build_fakes import RecordingRunner  # noqa: E402
from gpubake_spec_helpers import write_spec  # noqa: E402

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path | None = None, env: dict | None = None, script: str = "build-image") -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_help() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for flag in ("--target", "--image", "--builder", "--push", "--render-only", "--dist", "--json", "--dry-run", "--log-file"):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "error: --target is required (runpod or vastai)"),
        (("--target", "aws"), "error: --target: unknown value 'aws' (choose runpod or vastai)"),
        (("--target", "runpod", "--image", "nope"), "error: unknown image 'nope' (known: demo, "),
        (("--target", "runpod", "--builder", "kaniko"), "error: --builder: unknown value 'kaniko' (choose buildah or docker or packer)"),
        (("--target", "runpod", "--push", "not a ref"), "error: --push: 'not a ref' is not REGISTRY/NAME:TAG"),
    ],
)
def test_bad_flags(tmp_path: Path, args: tuple, expected: str) -> None:
    assert one_line_error(run(*args, "--dist", str(tmp_path / "dist"))).startswith(expected)
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ([(r"^torch = .*$", "")], "custom.toml: torch: missing required field"),
        ([(r"^container_disk_gb = 50$", 'container_disk_gb = "lots"')], "custom.toml: runtime.container_disk_gb: Input should be a valid integer"),
        ([(r"^cpu_ok", "cpu_okay")], "custom.toml: cpu_okay: unknown field"),
        ([(r"@sha256:[0-9a-f]{64}", "")], "custom.toml: base.image: must be pinned by digest"),
        ([(r"^gpu_archs = .*$", 'gpu_archs = ["sm_120"]'), (r'^torch = .*$', 'torch = "2.6.0"'), (r'^cuda = .*$', 'cuda = "12.6"'),
          (r"cuda:13\.0\.2-", "cuda:12.6.3-")], "custom.toml: gpu_archs[0]: sm_120 needs CUDA 12.8+ but cuda = '12.6'"),
        ([(r"^gpu_archs = .*$", 'gpu_archs = ["sm_80"]'), (r'^torch = .*$', 'torch = "2.13.0"'), (r'^cuda = .*$', 'cuda = "12.8"'),
          (r"cuda:13\.0\.2-", "cuda:12.8.1-")], "custom.toml: cuda: torch 2.13 publishes no CUDA 12.8 wheels"),
    ],
)
def test_bad_specs(tmp_path: Path, edits: list, expected: str) -> None:
    if any("torch = " in r for _, r in edits):  # a different torch: give the spec a lock without a torch pin
        edits = [*edits, (r'^lock = .*$', 'lock = "locks/min.txt"')]
        (tmp_path / "locks").mkdir()
        (tmp_path / "locks" / "min.txt").write_text("numpy==2.0.0 --hash=sha256:" + "d" * 64 + "\n")
    spec = write_spec(tmp_path, edits=edits)
    line = one_line_error(run("--target", "runpod", "--image", str(spec), "--dist", str(tmp_path / "dist")))
    assert expected in line and str(spec) in line
    assert not (tmp_path / "dist").exists()


def test_target_not_in_spec(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, edits=[(r"^targets = .*$", 'targets = ["runpod"]')])
    line = one_line_error(run("--target", "vastai", "--image", str(spec)))
    assert line == "error: --target: image 'custom' does not list 'vastai' in targets (runpod)"


def test_render_only_then_packer_validate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run("--target", "runpod", "--image", "wan22-t2v-a14b-nvfp4", "--render-only", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["image"] == "wan22-t2v-a14b-nvfp4" and result["context_dir"] == str(out)
    assert "Containerfile" in result["files"] and "image.pkr.hcl" in result["files"]
    if shutil.which("packer") is None:
        pytest.skip("packer not installed (scripts/setup.sh installs Debian's packer 1.6.6)")
    check = subprocess.run(["packer", "validate", "image.pkr.hcl"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # A second render into the same (now full) directory refuses instead of mixing contexts.
    again = run("--target", "runpod", "--image", "wan22-t2v-a14b-nvfp4", "--render-only", str(out))
    assert one_line_error(again) == f"error: --render-only: {out} exists and is not an empty directory"


def test_spec_schema_and_images_commands(tmp_path: Path) -> None:
    proc = run("spec-schema", script="gpubake")
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"] == "ImageSpec"
    proc = run("images", "--json", script="gpubake")
    rows = {r["name"]: r for r in json.loads(proc.stdout)["images"]}
    assert rows["wan22-t2v-a14b-nvfp4"]["min_driver"] == "580.95.05" and rows["demo"]["min_driver"] is None
    for columns in ("80", "250"):  # a narrow terminal lists, a wide one tabulates: no name is ever cut
        proc = run("images", script="gpubake", env={"COLUMNS": columns})
        assert proc.returncode == 0, proc.stderr
        words = set(proc.stderr.replace("│", " ").split())  # (the human view, on the console's stderr)
        assert set(rows) <= words, (columns, set(rows) - words)
        assert ("┃" in proc.stderr) == (columns == "250")
    assert "  GPU sm_90, >= 80 GB; CUDA 13.0" in run("images", script="gpubake", env={"COLUMNS": "80"}).stderr


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    proc = run("--target", "vastai", "--image", "wan22-t2v-a14b-nvfp4-hopper", "--builder", "packer", "--dry-run", "--json",
               "--dist", str(dist), "--push", "registry.example.com/team/hopper:v1",
               env={"GPUBAKE_REGISTRY_PASSWORD": "dry-run-secret-xyz"})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["dry_run"] is True and plan["builder"] == "packer"
    assert [s["step"] for s in plan["steps"]] == ["load spec", "check compatibility", "render context", "prepare model", "build (packer)", "push"]
    build = plan["steps"][4]
    assert build["commands"][0] == "packer validate -machine-readable image.pkr.hcl"
    assert any(c.startswith("packer build -machine-readable") for c in build["commands"])
    assert "dry-run-secret-xyz" not in proc.stdout + proc.stderr
    assert "1. load spec" in proc.stderr and "$ packer build" in proc.stderr
    assert not dist.exists()


def test_unusable_builder_is_one_line_and_leaves_no_archive(tmp_path: Path) -> None:
    """--builder packer where no docker daemon answers (this CI): refused before any build step."""
    from gpubake.images.builders.packer import PackerBuilder

    if PackerBuilder().available():
        pytest.skip("packer and a docker daemon are usable here")
    dist = tmp_path / "dist"
    line = one_line_error(run("--target", "runpod", "--image", "wan22-ti2v-5b", "--builder", "packer", "--dist", str(dist)))
    assert line.startswith("error: --builder packer: not usable here")
    assert not dist.exists()


@pytest.mark.parametrize("builder", ["buildah", "packer"])
def test_dry_run_lists_exactly_the_commands_a_build_runs(builder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--dry-run --json` against a build of the same request, whose process runner records every command.

    The demo has a bootstrap base, so the plan starts with debootstrap; with an empty cache and
    store the build runs every step. Cheap commands run for real (tar, packer validate); the
    slow or daemon-bound ones are stood in for (tests/images/build_fakes.py).
    """
    from gpubake.cli import _run
    from gpubake.images import layers, model_layer
    from gpubake.images.builders import packer as pk
    from gpubake.images.builders import proc
    from gpubake.images.builders.buildah import read_archive_manifest

    needed = {"buildah": ("buildah", "skopeo", "debootstrap"), "packer": ("packer", "debootstrap")}[builder]
    if missing := [tool for tool in needed if shutil.which(tool) is None]:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/setup.sh)")
    env = {"GPUBAKE_CACHE": str(tmp_path / "cache"), "GPUBAKE_STORAGE_ROOT": str(tmp_path / "store"), "SOURCE_DATE_EPOCH": "1700000000"}
    dist = tmp_path / "dist"
    args = ["--target", "runpod", "--image", "demo", "--builder", builder, "--dist", str(dist), "--json"]
    dry = run(*args, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    (planned,) = [s for s in json.loads(dry.stdout)["steps"] if s["step"] == f"build ({builder})"]
    assert not dist.exists() and not (tmp_path / "cache").exists() and not (tmp_path / "store").exists()

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # debootstrap's root check: debootstrap itself is stood in for
    monkeypatch.setattr(pk, "_docker_daemon_up", lambda: True)
    runner = RecordingRunner(execute=False)
    monkeypatch.setattr(proc, "run_step", runner)

    def prepare_model(spec, context: Path) -> Path:  # the weights are not a builder command
        for layer in model_layer.read_plan(context):
            (context / "model" / layer.name).mkdir(parents=True)
            (context / "model" / layer.name / "weights.bin").write_bytes(b"\0" * 64)
        return context / "model"

    monkeypatch.setattr(model_layer, "plan_for_build", lambda spec: layers.estimated_layers(spec))  # no tiny model made
    monkeypatch.setattr(model_layer, "prepare_model", prepare_model)
    capsys.readouterr()
    assert _run(["build-image", *args]) == 0
    built = json.loads(capsys.readouterr().out)

    assert [step.to_json() for step in runner.calls] == planned["plan"]
    assert [step.command() for step in runner.calls] == planned["commands"]
    archive = dist / "demo-runpod.oci.tar"
    assert built["archive"] == str(archive) and built["digest"] == read_archive_manifest(archive)[0]
    assert sorted(p.name for p in dist.iterdir()) == ["demo-runpod.build.log", "demo-runpod.oci.tar"]  # no context, no partial
    argvs = [step["argv"] for step in planned["plan"]]
    if builder == "buildah":
        bud = next(a for a in argvs if "bud" in a)
        assert "--identity-label=false" in bud and "--pull=false" in bud
        # two pip downloads: the lock's +cpu torch with its extra index (PyTorch's CPU index), the rest from PyPI
        assert [a[0] for a in argvs] == ["debootstrap", "tar", "skopeo", sys.executable, sys.executable, "buildah", "buildah"]
        assert argvs[3][1:4] == argvs[4][1:4] == ["-m", "pip", "download"] and "push" in argvs[6]
        assert argvs[6][argvs[6].index("--compression-format") + 1] == "zstd"
    else:
        target = pk.build_target(dist, pk.packer_version())
        assert [a[0] for a in argvs][-5:] == ["debootstrap", "tar", "skopeo", "packer", "skopeo"]
        assert argvs[-6] == ["packer", "validate", "-machine-readable", target]
        assert argvs[-3][-1].startswith("docker-daemon:localhost/gpubake/bootstrap-bookworm:")  # the base, into docker
        assert next(a for a in argvs if a[:2] == ["packer", "build"])[-1] == target


def test_dry_run_of_a_plan_the_builder_refuses_is_one_line(tmp_path: Path) -> None:
    """The plan is the builder's own: docker cannot build a bootstrap base, and its dry run says so."""
    line = one_line_error(run("--target", "runpod", "--image", "demo", "--builder", "docker", "--dry-run", "--dist", str(tmp_path / "d")))
    assert line == "error: docker builder: spec demo has a bootstrap base; build it with --builder buildah"
    assert not (tmp_path / "d").exists()


def test_dry_run_json_plans_the_a14b_weights_in_layers_of_at_most_4_gb(tmp_path: Path) -> None:
    """Issue 17: the planned layers (name, source, estimated bytes), the download, disk, RAM and
    time, before anything starts."""
    proc = run("--target", "runpod", "--image", "wan22-t2v-a14b-nvfp4", "--dry-run", "--json", "--dist", str(tmp_path / "d"),
               env={"GPUBAKE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    weights = plan["weights"]
    assert weights == next(s for s in plan["steps"] if s["step"] == "prepare model")["weights"]
    assert len(weights["layers"]) >= 8 and all(0 < layer["bytes"] <= 4_000_000_000 for layer in weights["layers"])
    assert all({"name", "source", "bytes"} <= set(layer) and layer["estimated"] for layer in weights["layers"])
    assert weights["download_bytes"] > 100e9 and weights["disk_bytes"]["total"] > weights["download_bytes"]
    assert weights["ram_bytes"] > 0 and weights["seconds"]["total"] > weights["seconds"]["quantize"] > 0
    assert weights["quantize"]["device"] in ("cpu", "cuda") and plan["compression"] == "zstd"
    assert "layer 06-transformer-1:" in proc.stderr and "quantize on" in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "d").exists()


def test_compression_and_with_model_flags_are_checked(tmp_path: Path) -> None:
    line = one_line_error(run("--target", "runpod", "--compression", "lz4", "--dist", str(tmp_path / "d")))
    assert line == "error: --compression: unknown value 'lz4' (choose zstd or zstd:chunked or gzip)"
    line = one_line_error(run("--target", "runpod", "--with-model", "--dist", str(tmp_path / "d")))
    assert line == "error: --with-model: only with --render-only DIR (a build places the weights itself)"


def test_render_only_says_what_it_leaves_out_and_how_to_fill_it(tmp_path: Path) -> None:
    out = tmp_path / "ctx"
    proc = run("--target", "runpod", "--image", "wan22-t2v-a14b-nvfp4-hopper", "--render-only", str(out), "--json",
               env={"GPUBAKE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    left = json.loads(proc.stdout)["left_out"]
    assert left["path"] == "model/" and left["layers"] == len(json.loads((out / "weights.json").read_text())["layers"])
    assert left["fill"].endswith(f"--render-only {out}-full --with-model")
    source = "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers@5be7df9619b54f4e2667b2755bc6a756675b5cd7"
    assert left["commands"][0].startswith(f"gpubake fetch {source} ")
    assert left["commands"][1].startswith("gpubake quantize ") and "--policy default" in left["commands"][1]
    assert "left out: model/" in proc.stderr and "--with-model" in proc.stderr
    assert not (out / "model").exists() and not (tmp_path / "cache" / "models").exists()  # (the app wheel is cached)


@pytest.mark.slow
def test_render_only_with_model_is_a_complete_context(tmp_path: Path) -> None:
    """--with-model places the weights as the Containerfile's layers and builds the bootstrap
    base FROM names: the context builds as it is (after loading the base, as it says)."""
    import re

    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the bootstrap base needs root and debootstrap")

    out = tmp_path / "ctx"
    proc = run("--target", "vastai", "--render-only", str(out), "--with-model", "--json",
               env={"GPUBAKE_CACHE": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["left_out"] is None
    base = result["base"]
    assert (out / "Containerfile").read_text().splitlines()[1] == f"FROM {base['ref']}"
    assert Path(base["layout"], "index.json").is_file() and base["load"]["docker"].endswith(f"docker-daemon:{base['ref']}")
    assert "load it into your builder first" in proc.stderr
    copies = re.findall(r"^COPY model/([^/]+)/ /opt/gpubake/model/$", (out / "Containerfile").read_text(), flags=re.M)
    assert copies == sorted(p.name for p in (out / "model").iterdir()) and len(copies) == 5
    plan = json.loads((out / "weights.json").read_text())["layers"]
    assert [layer["name"] for layer in plan] == copies and not any(layer["estimated"] for layer in plan)
    assert (out / "model" / copies[-1] / "gpubake-manifest.json").is_file()

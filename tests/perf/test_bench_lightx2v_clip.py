"""bench/bench_lightx2v_clip.py --small: the device bench's code path (random LightX2V-layout
weights, `gpubake import`, the serving loader, the recipes' clips) on the tiny model on the
CPU, so the script is known to work before its GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_lightx2v_clip.py"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    root = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(root / "out"), "--work", str(root / "w")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "out" / "bench_lightx2v_clip.json").read_text()), proc.stdout, root


def test_the_import_is_timed_and_exact(small_run):
    report, _, root = small_run
    imp = report["phases"]["import"]
    assert imp["wall_seconds"] > 0 and imp["peak_rss_gib"] > 0 and imp["peak_gpu_gib"] is None
    assert imp["summary"]["format"] == "lightx2v" and imp["summary"]["exact_layers"] == imp["summary"]["quantized_layers"] == 60
    assert not (root / "w" / "scratch").exists()  # source and base are removed after the import
    assert report["phases"]["write_source"]["bytes"] > 0 and report["phases"]["load"]["seconds"] > 0


def test_each_case_times_a_whole_clip_with_its_recipe(small_run):
    report, stdout, _ = small_run
    cases = report["cases"]
    assert list(cases) == ["4step-480", "4step-720", "40step-480"]
    for name in ("4step-480", "4step-720"):
        c = cases[name]
        assert c["recipe"]["name"] == "lightx2v-4step-t2v" and c["warmup"]["steps"] == c["timed"]["steps"] == 4
        assert c["timed"]["forwards"] == {"transformer": 2, "transformer_2": 2}  # one forward a step, 2 per expert
    assert cases["4step-480"]["timed"]["size"] == "64x64x5" and cases["4step-720"]["timed"]["size"] == "96x96x5"
    forty = cases["40step-480"]
    assert forty["recipe"]["name"] == "wan22-t2v-a14b-40step" and forty["timed"]["steps"] == 40
    assert sum(forty["timed"]["forwards"].values()) == 80 and "extrapolated" not in forty  # CFG: 2 a step
    for c in cases.values():
        t = c["timed"]
        parts = t["text_encoder_seconds"] + t["denoise_seconds"] + t["decode_seconds"] + t["write_seconds"]
        assert 0 < parts <= t["total_seconds"] + 1e-3 and Path(t["video"]).is_file()
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith(("4step", "40step"))] == list(cases)
    assert stdout.splitlines()[0].startswith("import: ")


def test_a_case_that_does_not_fit_the_budget_is_skipped_and_says_so(small_run, tmp_path):
    _, _, root = small_run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--reuse", "--out", str(tmp_path), "--work",
                           str(root / "w"), "--budget-s", "0", "--cases", "4step-720"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_lightx2v_clip.json").read_text())
    assert report["phases"]["import"] == {"reused": str(root / "w" / "model")}
    assert report["cases"]["4step-720"]["skipped"].startswith("budget: ")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--small", "--cases", "8step-480"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--cases: unknown 8step-480" in bad.stderr


def test_full_size_scratch_goes_to_ram_when_it_fits_and_the_disk_is_checked(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_lightx2v_clip", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse(["--work", str(tmp_path / "w")])
    free = {}
    monkeypatch.setattr(bench, "free_gib", lambda p: free["shm" if str(p) == "/dev/shm" else "work"])
    monkeypatch.setattr(bench.os, "access", lambda p, mode: True)
    free.update(shm=64, work=40)  # the H200 machine: 128 GiB RAM (64 in /dev/shm), 64 GiB disk
    where = bench.placement(args)
    assert str(where["src"]).startswith("/dev/shm/") and str(where["base"]).startswith("/dev/shm/")
    assert where["dest"] == tmp_path / "w" / "model"
    free.update(shm=20)  # room for the source only
    where = bench.placement(args)
    assert str(where["src"]).startswith("/dev/shm/") and where["base"] == tmp_path / "w" / "scratch" / "base"
    free.update(shm=0, work=40)  # everything on a disk too small for it: refused before anything is written
    with pytest.raises(SystemExit, match="GiB free, the run needs ~55 GiB there"):
        bench.placement(args)

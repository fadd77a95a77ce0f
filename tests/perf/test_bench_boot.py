"""bench/boot_a14b_device.sh's CPU smoke mode (TINY=1): the device script runs end to end
before a device call is spent on it (a tiny checkpoint; the GPU image's self-test fails its
GPU stage here, so what is checked is the protocol: four boots, their environments, the
volume's compile-cache folders and the summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_boot_bench_smoke_mode_writes_four_boots(tmp_path):
    env = {**os.environ, "TINY": "1", "PY": sys.executable, "ROOT": str(tmp_path / "a14b"),
           "VOLUME": str(tmp_path / "volume"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", "bench/boot_a14b_device.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    boot = json.loads((tmp_path / "out" / "boot.json").read_text())
    boots = ["first", "later", "later-old", "later-nopreimport"]
    assert list(boot) == ["write", *boots]
    assert boot["write"]["checkpoint_disk_bytes"] > 0
    assert [boot[b]["env"] for b in boots] == [
        "", "", "GPUBAKE_LOAD_OVERLAP=off GPUBAKE_LOAD_DIRECT=off GPUBAKE_PREIMPORT=off", "GPUBAKE_PREIMPORT=off"]
    for name in boots:
        run = boot[name]
        assert run["page_cache"] == "kept (TINY)" and run["wall_s"] > 0
        assert run["exit"] == 3 and run["verdict"] == "fail"  # no GPU here: the GPU image fails its gpu stage
        assert set(run["stage_seconds"]) >= {"gpu", "model", "render"}
        assert (tmp_path / "out" / name / "selftest-a14b.json").is_file()
    assert (tmp_path / "volume" / "gpubake" / "compile-cache" / "inductor").is_dir()

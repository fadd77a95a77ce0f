"""bench/bench_multigpu.py --small: the 2/8-GPU benchmark's own code path, run by torchrun
with 2 CPU processes over gloo on the tiny model, so the device run starts from a script
known to work. Timings on the CPU mean nothing; the JSON's shape and the clip checks do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_small_run_writes_every_mode(tmp_path: Path):
    """Two launches, as bench_multigpu.sh splits a run: the second appends its rows and
    compares with the one-GPU clip the first saved."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    for modes in ("single,single-bf16-attention,pool,ulysses", "ring"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(REPO / "bench" / "bench_multigpu.py"), "--small", "--out", str(tmp_path),
                               "--modes", modes], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "multigpu-2cpu.json").read_text())
    assert len(out["launches"]) == 2 and (tmp_path / "single-small.pt").is_file()
    assert out["world_size"] == 2 and out["device"] == "cpu (gloo)"
    runs = {r["mode"]: r for r in out["runs"]}
    assert list(runs) == ["single", "single-bf16-attention", "pool", "ulysses:2", "ring:2"]
    assert not [r["error"] for r in runs.values() if "error" in r]
    for r in runs.values():
        assert r["size"] == "small" and r["tokens"] == 12 and r["steps"] == 2
        assert r["seconds_per_step"] > 0 and r["total_seconds"] > r["decode_seconds"] > 0
        assert r["projected_clip_seconds"] > r["total_seconds"]  # 40 steps, not 2
    assert runs["ulysses:2"]["max_abs_diff_vs_single"] == 0.0  # bit-exact (tests/perf/test_parallel.py says why)
    assert 0.0 < runs["ring:2"]["max_abs_diff_vs_single"] <= 2**-4  # the ring merge: rounding, not equal
    assert runs["pool"]["max_abs_diff_vs_single"] == 0.0  # the same clip on each worker
    assert len(runs["pool"]["wall_seconds_per_rank"]) == 2 and runs["pool"]["clips_per_hour"] > 0
    assert runs["ulysses:2"]["parallel"]["self_attention_backend"] == "native"
    assert runs["ring:2"]["parallel"]["self_attention_backend"] == "_native_flash"
    assert runs["ring:2"]["plan"]["parallel"] == "ring:2" and runs["single"]["plan"]["parallel"] == "none"
    assert "step_speedup_vs_single" in runs["ulysses:2"] and "throughput_vs_single" in runs["pool"]

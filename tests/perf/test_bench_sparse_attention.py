"""bench/bench_sparse_attention.py in its --small mode: every variant of the H200 run through
the same code (inputs, router, FlexAttention, the FA3 arithmetic, errors, JSON) on the CPU,
so the one device run does not fail on a path nobody ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_sparse_attention as B  # noqa: E402

NAMES = ["sdpa-bf16", "fa3-fp8", "flex-dense", "sparse-flex-0.1", "sparse-flex-0.2", "sparse-flex-0.1-b128"]
ROUTERS = ["router-0.1", "router-0.1-legacy", "router-0.1-b128", "router-0.1-b128-legacy"]
TUNED = [f"sparse-flex-0.1{b}-k{tag}" for tag in B.KERNEL_OPTIONS for b in ("", "-b128")]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench_sparse") / "sparse.json"
    assert B.main(["--small", "--json-out", str(out)]) == 0
    return json.loads(out.read_text())


def test_small_run_measures_every_variant_at_both_sizes(small):
    assert small["small"] is True and small["compiled"] is False and not small["skipped"]
    assert sorted(small["sizes"]) == ["300", "520"] and set(NAMES) | {"router-0.1"} <= set(B.PREDICTIONS)
    assert set(B.PREDICTIONS) <= set(NAMES + ROUTERS + TUNED) | {"router-0.1 vs legacy"}  # no prediction of nothing
    for rows in small["sizes"].values():
        assert sorted(rows) == sorted(NAMES + ROUTERS + TUNED)  # (the JSON is written with sorted keys)
        for name in TUNED:  # compared with its untuned twin (on the CPU the options are not used: equal)
            assert rows[name]["rel_err_vs_untuned_local"] == 0.0 and rows[name]["finite"], name
        assert all("error" not in r and r["ms"] > 0 for r in rows.values()), rows
        for name in ROUTERS[1::2]:  # the former router chooses what the current one does (fp32 order aside)
            assert 0.9 <= rows[name]["route_equal_local"] <= 1.0 and 0.9 <= rows[name]["route_equal_gaussian"] <= 1.0
        for name in NAMES:
            assert rows[name]["finite"] and {"rel_err_vs_bf16_gaussian", "rel_err_vs_bf16_local"} <= set(rows[name])
        assert rows["sdpa-bf16"]["rel_err_vs_bf16_gaussian"] == 0.0  # the baseline itself
        assert rows["flex-dense"]["rel_err_vs_bf16_local"] < 1e-2  # keep 1.0: dense, to BF16 rounding
        assert 0.03 < rows["fa3-fp8"]["rel_err_vs_bf16_gaussian"] < 0.2  # FP8's error, not a copy of SDPA
        for kind in ("gaussian", "local"):  # dropping 90 % of the key blocks costs accuracy
            assert rows["sparse-flex-0.1"][f"rel_err_vs_bf16_{kind}"] > 10 * rows["flex-dense"][f"rel_err_vs_bf16_{kind}"]
        # a route has something to find in local inputs, not in diffuse ones
        assert rows["sparse-flex-0.1"]["rel_err_vs_bf16_local"] < rows["sparse-flex-0.1"]["rel_err_vs_bf16_gaussian"]
        assert rows["fa3-fp8"]["speedup_vs_fa3_fp8"] == 1.0


def test_small_run_checks_each_sparse_variant_against_the_reference(small):
    check = small["kernel_check"]
    assert check["tokens"] == 256 and check["heads"] == 2
    for name in ("flex-dense", "sparse-flex-0.1", "sparse-flex-0.2", "sparse-flex-0.1-b128"):
        assert check[name]["finite"] and check[name]["rel_err_vs_reference"] < 1e-2  # BF16 output rounding


def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert B.main(["--small", "--json-out", str(out), "--tokens", "300,777"]) == 2
    assert capsys.readouterr().err.strip() == "error: --tokens 777: not one of 300, 520"
    assert B.main(["--small", "--json-out", str(out), "--variants", "sparse-flex-0.3"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --variants sparse-flex-0.3: not one of sdpa-bf16, ")
    assert not out.exists()


def test_a_chosen_variant_runs_with_its_baseline(tmp_path):
    out = tmp_path / "x.json"
    assert B.main(["--small", "--json-out", str(out), "--tokens", "300", "--variants", "router-0.1"]) == 0
    data = json.loads(out.read_text())
    assert sorted(data["sizes"]["300"]) == ["router-0.1", "sdpa-bf16"]


def test_a_tuned_variant_runs_with_its_untuned_twin(tmp_path):
    out = tmp_path / "x.json"
    assert B.main(["--small", "--json-out", str(out), "--tokens", "300", "--variants", "sparse-flex-0.1-b128-ktma"]) == 0
    rows = json.loads(out.read_text())["sizes"]["300"]
    assert sorted(rows) == ["sdpa-bf16", "sparse-flex-0.1-b128", "sparse-flex-0.1-b128-ktma"]
    assert "rel_err_vs_untuned_gaussian" in rows["sparse-flex-0.1-b128-ktma"]

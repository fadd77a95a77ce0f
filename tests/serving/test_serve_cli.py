"""`gpubake serve` settings resolution and bad input (the served app itself is tested
over a socket in test_http.py)."""

from __future__ import annotations

from pathlib import Path

from gpubake.cli import _run


def test_dry_run_prints_resolved_settings(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_OUTPUT_DIR", str(tmp_path / "videos"))
    rc = _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--report", str(tmp_path / "r.json"),
               "--port", "8123", "--dry-run"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 0
    assert f"serving tiny-wan2.2 on http://0.0.0.0:8123 (report {tmp_path / 'r.json'}" in err
    assert f"videos under {tmp_path / 'videos'}, self-test on" in err
    assert not (tmp_path / "r.json").exists()  # a dry run writes nothing


def test_bad_flags(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_IMAGE", raising=False)
    assert _run(["serve", "--port", "0", "--dry-run"]) == 2
    assert "--port: must be 1-65535, got 0" in capsys.readouterr().err
    assert _run(["serve", "--max-queue", "0", "--dry-run"]) == 2
    assert "--max-queue: must be at least 1, got 0" in capsys.readouterr().err
    assert _run(["serve", "--model-dir", str(tmp_path), "--dry-run"]) == 2
    assert "no image spec: pass --image NAME or --spec PATH, or set GPUBAKE_IMAGE" in capsys.readouterr().err
    assert _run(["serve", "--image", "nope", "--dry-run"]) == 2

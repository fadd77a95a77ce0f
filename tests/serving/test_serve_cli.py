"""`gpubake serve` settings resolution and bad input (the served app itself is tested
over a socket in test_http.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gpubake.cli import _run

KEY = "test-key-0123456789abcdef"


def test_dry_run_prints_resolved_settings(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_OUTPUT_DIR", str(tmp_path / "videos"))
    monkeypatch.setenv("GPUBAKE_API_KEY", KEY)
    rc = _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--report", str(tmp_path / "r.json"),
               "--port", "8123", "--dry-run"])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert rc == 0
    assert f"serving tiny-wan2.2 on http://0.0.0.0:8123 (report {tmp_path / 'r.json'}" in err
    assert f"data under {tmp_path / 'videos'}, self-test on, API key required" in err
    assert KEY not in captured.err + captured.out  # the key is never printed
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "videos").exists()  # a dry run writes nothing


def test_data_dir_flag_and_env(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUBAKE_OUTPUT_DIR", str(tmp_path / "older-name"))
    base = ["serve", "--image", "demo", "--model-dir", str(tmp_path), "--host", "127.0.0.1", "--dry-run"]
    assert _run(base) == 0
    assert f"data under {tmp_path / 'data'}," in " ".join(capsys.readouterr().err.split())
    assert _run([*base, "--data-dir", str(tmp_path / "flag")]) == 0
    assert f"data under {tmp_path / 'flag'}," in " ".join(capsys.readouterr().err.split())


def test_bad_flags(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_IMAGE", raising=False)
    assert _run(["serve", "--port", "0", "--dry-run"]) == 2
    assert "--port: must be 1-65535, got 0" in capsys.readouterr().err
    assert _run(["serve", "--max-queue", "0", "--dry-run"]) == 2
    assert "--max-queue: must be at least 1, got 0" in capsys.readouterr().err
    assert _run(["serve", "--keep-hours", "0", "--dry-run"]) == 2
    assert "--keep-hours and --keep-gb: must be > 0" in capsys.readouterr().err
    assert _run(["serve", "--model-dir", str(tmp_path), "--dry-run"]) == 2
    assert "no image spec: pass --image NAME or --spec PATH, or set GPUBAKE_IMAGE" in capsys.readouterr().err
    assert _run(["serve", "--image", "nope", "--dry-run"]) == 2


def test_bad_host_names_the_flag(tmp_path: Path, capsys):
    rc = _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--host", "no-such-host.invalid",
               "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --host 'no-such-host.invalid': not an IP address or a host name")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_foreign_address_names_the_flag(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", KEY)
    # TEST-NET-1 (RFC 5737): a valid address that is no interface of this machine
    rc = _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--report", str(tmp_path / "r.json"),
               "--host", "192.0.2.1", "--port", "8124"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --host 192.0.2.1: not an address of this machine" in err


def test_busy_port_names_the_flag(tmp_path: Path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--report", str(tmp_path / "r.json"),
                   "--host", "127.0.0.1", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: --port {port}: 127.0.0.1:{port} is already in use" in err
    assert not (tmp_path / "jobs.sqlite3").exists()  # refused before the service opened anything


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_no_key_refuses_a_public_address(host: str, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_API_KEY", raising=False)
    base = ["serve", "--image", "demo", "--model-dir", str(tmp_path), "--host", host, "--dry-run"]
    assert _run(base) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--host {host}: not a loopback address and no $GPUBAKE_API_KEY is set" in err
    assert "--insecure-no-auth" in err
    assert _run([*base, "--insecure-no-auth"]) == 0
    assert "OPEN: no API key (--insecure-no-auth)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_no_key_is_fine_on_loopback(host: str, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("GPUBAKE_API_KEY", raising=False)
    assert _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--host", host, "--dry-run"]) == 0
    assert "open: no API key, loopback only" in " ".join(capsys.readouterr().err.split())


def test_short_key_is_refused(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("GPUBAKE_API_KEY", "hunter2")
    assert _run(["serve", "--image", "demo", "--model-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "$GPUBAKE_API_KEY: must be at least 16 characters without spaces (got 7)" in err
    assert "hunter2" not in err

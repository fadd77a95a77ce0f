"""Keys and settings from ~/.config/gpubake/config.toml: bad files are one-line errors."""

from __future__ import annotations

import pytest


def write(tmp_path, monkeypatch, text: str, mode: int = 0o600):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    cfg.chmod(mode)
    monkeypatch.setenv("GPUBAKE_CONFIG", str(cfg))
    return cfg


@pytest.mark.parametrize(("text", "message"), [
    ("[runpod\napi_key = 1", "invalid TOML"),
    ('runpod = "x"\n', "[runpod] must be a table"),
    ("[vastai]\napi_key = 42\n", "vastai.api_key must be a string"),
])
def test_bad_config_files(tmp_path, monkeypatch, cli, text, message):
    cfg = write(tmp_path, monkeypatch, text)
    code, _, err = cli("destroy", "--target", "vastai", "123", "--dry-run")
    assert code == 2 and message in err and str(cfg) in " ".join(err.split())


def test_env_key_wins_over_config_and_readable_key_file_warns(tmp_path, monkeypatch, vast, cli):
    write(tmp_path, monkeypatch, '[vastai]\napi_key = "vast-from-config-0000"\n', mode=0o644)
    code, _, err = cli("destroy", "--target", "vastai", "123")
    assert code == 2 and "not found (HTTP 404)" in err  # authenticated with the env key, then 404
    assert vast.requests[-1].headers["Authorization"] == f"Bearer {vast.api_key}"
    monkeypatch.delenv("VAST_API_KEY")
    code, _, err = cli("destroy", "--target", "vastai", "123")
    assert code == 2 and "API key rejected (HTTP 401)" in err and "vast-from-config-0000" not in err
    assert "readable by others" in err
    assert vast.requests[-1].headers["Authorization"] == "Bearer vast-from-config-0000"


def test_http_backoff_must_be_a_number(monkeypatch, cli):
    monkeypatch.setenv("GPUBAKE_HTTP_BACKOFF", "fast")
    code, _, err = cli("destroy", "--target", "runpod", "abc", "--dry-run")
    assert code == 2 and "GPUBAKE_HTTP_BACKOFF" in err

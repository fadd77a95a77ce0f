"""Redaction of credentials in URLs (userinfo, token-like query values) and of known secret values."""

from __future__ import annotations

import pytest

from gpubake.secrets import redact, redact_url, redact_urls


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:TOKEN@host/dir/?token=abc&x=1", "https://***@host/dir/?token=***&x=1"),
        ("https://h/f.bin?X-Amz-Signature=S&X-Amz-Credential=C&X-Amz-Date=20250101",
         "https://h/f.bin?X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Date=20250101"),
        ("https://h/p?access_token=a;sig=b#frag", "https://h/p?access_token=***;sig=***#frag"),
        ("https://h/p?API_KEY=a&password=b&secret=c&signature=d&key=e&hf_token=f&page=2",
         "https://h/p?API_KEY=***&password=***&secret=***&signature=***&key=***&hf_token=***&page=2"),
        ("https://u@h:8443/x", "https://***@h:8443/x"),
        ("s3://bucket/prefix/x", "s3://bucket/prefix/x"),
        ("hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers@main", "hf://Wan-AI/Wan2.2-T2V-A14B-Diffusers@main"),
        ("https://h/a%20b?q=%2F", "https://h/a%20b?q=%2F"),  # untouched: no re-encoding
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_urls_inside_text_keep_their_punctuation() -> None:
    text = 'error: https://u:p@h/x?token=t: HTTP 404 (see "http://a:b@c/d").'
    assert redact_urls(text) == 'error: https://***@h/x?token=***: HTTP 404 (see "http://***@c/d").'


def test_redact_covers_env_secrets_and_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    assert redact("auth hf_abcdefgh via https://me:pw@hub/?sig=1") == "auth *** via https://***@hub/?sig=***"

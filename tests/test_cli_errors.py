"""The file system and odd input refuse a command with ONE line and exit 2, never a traceback.

Read-only and full disks are real: tmpfs mounts made for the test (`mount -t tmpfs -o ro`
and `-o size=64k`), as root ignores permission bits; skipped where mounting is not
permitted. Commands run through the CLI in-process (`gpubake.cli._run`).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpubake.cli import _run

SECRET = "Tok3n-do-not-print"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    """mount(name, options) -> a fresh tmpfs at tmp_path/name (unmounted afterwards)."""
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount not permitted here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def read_only(mount) -> Path:
    ro = mount("ro", "ro,size=1m")
    assert subprocess.run(["touch", str(ro / "probe")], capture_output=True).returncode != 0
    return ro


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def file_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 serving one small file, `f.bin`."""
    root = tmp_path_factory.mktemp("www")
    (root / "f.bin").write_bytes(b"hello weights\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ build-image --render-only


def test_render_only_under_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    assert _run(["build-image", "--target", "runpod", "--render-only", str(tmp_path / "afile" / "ctx")]) == 2
    line = _one_error_line(capsys)
    assert line == f"error: --render-only: {tmp_path / 'afile' / 'ctx'}: {tmp_path / 'afile'} is not a directory"


def test_render_only_into_a_read_only_directory(read_only: Path, capsys) -> None:
    assert _run(["build-image", "--target", "runpod", "--render-only", str(read_only / "ctx")]) == 2
    assert _one_error_line(capsys) == f"error: --render-only: {read_only / 'ctx'}: Read-only file system"


def test_render_only_onto_a_full_disk_leaves_nothing(mount, capsys) -> None:
    full = mount("full", "size=64k")
    (full / "given").mkdir()
    assert _run(["build-image", "--target", "runpod", "--render-only", str(full / "new" / "deeper" / "ctx")]) == 2
    assert _one_error_line(capsys) == f"error: --render-only: {full / 'new' / 'deeper' / 'ctx'}: No space left on device"
    # an existing empty DIR stays (it was not the command's to delete), nothing else is left
    assert _run(["build-image", "--target", "runpod", "--render-only", str(full / "given")]) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert [p.name for p in full.iterdir()] == ["given"] and not any((full / "given").iterdir())


# ------------------------------------------------------------------ writing onto a read-only mount


def test_spec_schema_onto_read_only(read_only: Path, capsys) -> None:
    assert _run(["spec-schema", "-o", str(read_only / "schema.json")]) == 2
    assert _one_error_line(capsys) == f"error: {read_only / 'schema.json'}: Read-only file system"


def test_make_tiny_onto_read_only(read_only: Path, capsys) -> None:
    assert _run(["make-tiny", str(read_only / "tiny")]) == 2
    assert _one_error_line(capsys) == f"error: {read_only / 'tiny'}: Read-only file system"


def test_quantize_onto_read_only(read_only: Path, tiny_checkpoint: Path, capsys) -> None:
    assert _run(["quantize", str(tiny_checkpoint), str(read_only / "q")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {read_only}") and line.endswith("Read-only file system"), line


def test_fetch_onto_read_only(read_only: Path, file_server: str, capsys) -> None:
    assert _run(["fetch", f"{file_server}/f.bin", str(read_only / "w")]) == 2
    assert _one_error_line(capsys) == f"error: {read_only / 'w'}: Read-only file system"


def test_selftest_report_onto_read_only(read_only: Path, tmp_path: Path, capsys) -> None:
    rc = _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path / "no-model"), "--report", str(read_only / "r.json")])
    assert rc == 2
    assert _one_error_line(capsys) == f"error: {read_only / 'r.json'}: Read-only file system"


# ------------------------------------------------------------------ flags checked before any work


def test_quantize_unknown_device_is_refused_first(tmp_path: Path, capsys) -> None:
    # SRC does not exist: the device is what the command refuses, before reading anything
    assert _run(["quantize", "--device", "tpu", str(tmp_path / "missing"), str(tmp_path / "q")]) == 2
    assert _one_error_line(capsys) == "error: --device: unknown device 'tpu' (use cpu, cuda or cuda:N)"
    assert _run(["quantize", "--device", "cuda:99", str(tmp_path / "missing"), str(tmp_path / "q")]) == 2
    assert _one_error_line(capsys).startswith("error: --device: cuda:99 is not available here")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(("flag", "value"), [("--frames", "0"), ("--steps", "0"), ("--height", "-8")])
def test_fidelity_sizes_must_be_positive(flag: str, value: str, tmp_path: Path, capsys) -> None:
    argv = ["fidelity", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "f"), flag, value]
    assert _run(argv) == 2
    assert _one_error_line(capsys) == f"error: {flag}: must be at least 1, got {value}"
    assert not (tmp_path / "f").exists()


def test_fidelity_unknown_device(tmp_path: Path, capsys) -> None:
    assert _run(["fidelity", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "tpu"]) == 2
    assert _one_error_line(capsys).startswith("error: --device: unknown device 'tpu'")


def test_fidelity_bad_step_cache(tmp_path: Path, capsys) -> None:
    argv = ["fidelity", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "f"), "--step-cache", "mag:7"]
    assert _run(argv) == 2
    assert _one_error_line(capsys).startswith("error: --step-cache: step_cache='mag:7': one of none | fbc:THRESHOLD")
    assert not (tmp_path / "f").exists()


# ------------------------------------------------------------------ input nested too deeply


def test_spec_nested_5000_deep(tmp_path: Path, capsys) -> None:
    """Deeper than any recursion limit of this process (inductor raises it to 2000 when a test
    before this one compiles in-process, and 600 levels then parse)."""
    from gpubake.images.catalog import CATALOG_DIR

    text = (CATALOG_DIR / "demo.toml").read_text().replace('name = "demo"', 'name = "deep"')
    (tmp_path / "deep.toml").write_text(text.replace("description = ", "x = " + "[" * 5000 + "]" * 5000 + "\ndescription = ", 1))
    assert _run(["build-image", "--target", "runpod", "--image", str(tmp_path / "deep.toml"), "--render-only", str(tmp_path / "c")]) == 2
    assert _one_error_line(capsys) == f"error: {tmp_path / 'deep.toml'}: invalid TOML: arrays or tables nested too deeply"
    assert not (tmp_path / "c").exists()


def test_deep_json_input_names_the_file(tmp_path: Path, capsys) -> None:
    """A RecursionError no parser turned into a message: the CLI names the input file."""
    (tmp_path / "table.json").write_text("[" * 100_000 + "]" * 100_000)
    rc = _run(["selftest", "--image", "demo", "--model-dir", str(tmp_path / "m"), "--report", str(tmp_path / "r.json"),
               "--table", str(tmp_path / "table.json")])
    assert rc == 2
    assert _one_error_line(capsys) == f"error: {tmp_path / 'table.json'}: input nested too deeply to read"


# ------------------------------------------------------------------ credentials in URLs


def test_fetch_error_line_redacts_url_credentials(tmp_path: Path, file_server: str, capsys) -> None:
    host = file_server.split("://", 1)[1]
    url = f"http://user:{SECRET}@{host}/missing.bin?token={SECRET}-q&rev=main"
    assert _run(["fetch", url, str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "Traceback" not in err
    assert f"error: http://***@{host}/missing.bin: HTTP 404 (not found)" in err


def test_fetch_plan_redacts_url_credentials(tmp_path: Path, file_server: str, capsys) -> None:
    host = file_server.split("://", 1)[1]
    url = f"http://user:{SECRET}@{host}/f.bin?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}2"
    assert _run(["fetch", url, str(tmp_path / "w"), "--dry-run", "--json"]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert json.loads(out.out)["source"] == f"http://***@{host}/f.bin?X-Amz-Signature=***&X-Amz-Credential=***"

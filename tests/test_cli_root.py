"""The root CLI: every part's commands are registered, usage errors are one line + exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from gpubake import cli
from gpubake.cli import _run

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent

COMMANDS = ("build-image", "fetch", "make-tiny", "quantize", "import", "fidelity", "selftest", "serve",
            "publish", "launch", "destroy", "remote", "push-weights")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([command, "--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


def test_out_of_range_option_is_a_usage_error_not_a_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "gpubake", "fetch", "--jobs", "0", "http://127.0.0.1:9/x", "/tmp/never"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--jobs" in proc.stderr


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def _registered(app: typer.Typer) -> list[str]:
    return list(typer.main.get_command(app).commands)


def test_the_registered_commands_are_exactly_the_table() -> None:
    assert sorted(_registered(cli.app)) == sorted(cli.COMMANDS)
    assert set(COMMANDS) | {"images", "spec-schema"} == set(cli.COMMANDS)


def test_every_command_in_the_readme_is_registered() -> None:
    table = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    documented = set()
    for line in table:
        documented.update(re.findall(r"`gpubake ([a-z][a-z-]*)", line))
        documented.update("build-image" for _ in re.findall(r"`build-image ", line))
    assert {"build-image", "selftest", "remote", "push-weights"} <= documented  # the table was found and read
    assert documented <= set(_registered(cli.app)), documented - set(_registered(cli.app))


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpubake.smoke_tests.cli", None)  # import raises ModuleNotFoundError
    with pytest.raises(ImportError, match=r"command 'selftest': module gpubake\.smoke_tests\.cli failed to import"):
        cli.build_app()


def test_gpubake_help_fails_loudly_with_a_broken_command_module() -> None:
    code = "import sys; sys.modules['gpubake.smoke_tests.cli'] = None; sys.argv = ['gpubake', '--help']; from gpubake.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Commands" not in proc.stdout  # no help without the command
    assert "command 'selftest': module gpubake.smoke_tests.cli failed to import" in proc.stderr


def test_help_imports_no_heavy_library() -> None:
    code = ("import sys; from gpubake.cli import _run; _run(['--help']); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'boto3', 'fabric', 'numpy', 'huggingface_hub') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_build_image_script_usage_names_itself_once() -> None:
    proc = subprocess.run([str(BIN / "build-image"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"Usage: build-image \[OPTIONS\]", proc.stdout) and "build-image build-image" not in proc.stdout

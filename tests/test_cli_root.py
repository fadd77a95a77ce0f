"""The root CLI: every part's commands are registered, usage errors are one line + exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpubake.cli import _run

COMMANDS = ("build-image", "fetch", "make-tiny", "quantize", "fidelity", "selftest", "serve",
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

"""provisioning.preimport: the render stage's libraries imported in a background thread."""

from __future__ import annotations

import subprocess
import sys

from gpubake.provisioning import preimport


def test_on_by_default_and_off_when_asked(monkeypatch):
    monkeypatch.setenv("GPUBAKE_PREIMPORT", "off")
    assert preimport.start_if_on() is None
    monkeypatch.delenv("GPUBAKE_PREIMPORT", raising=False)  # on: it won on the boot (docs/benchmarks.md)
    started = preimport.start_if_on()
    started.join(120)
    assert started.summary()["finished"] and started.summary()["errors"] == []


def test_a_fresh_interpreter_has_the_modules_after_the_thread():
    """In a new process (nothing imported yet) the thread imports every module it names."""
    code = ("import sys; from gpubake.provisioning.preimport import MODULES, Preimport; "
            "assert 'diffusers' not in sys.modules; p = Preimport().start(); p.join(300); "
            "s = p.summary(); assert s['finished'] and not s['errors'], s; "
            "missing = [m for m in MODULES if m not in sys.modules]; assert not missing, missing; "
            "print(sorted(s['modules']) == sorted(MODULES))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"


def test_a_failing_import_is_recorded_not_raised():
    p = preimport.Preimport(modules=("gpubake.no_such_module", "json")).start()
    p.join(30)
    s = p.summary()
    assert s["finished"] and list(s["modules"]) == ["gpubake.no_such_module", "json"]
    assert len(s["errors"]) == 1 and s["errors"][0].startswith("gpubake.no_such_module: No module named")

"""gpubake.envs: every GPUBAKE_* variable declared once, read through it, documented from it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpubake import envs, secrets
from gpubake.errors import GpubakeError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gpubake"
NAME = re.compile(r"GPUBAKE_[A-Z0-9_]+")
# Declared ahead of the code that reads them (work in progress on other branches).
NOT_YET_READ = {"GPUBAKE_API_KEY", "GPUBAKE_DATA_DIR", "GPUBAKE_IMAGE_FACTS"}


def test_docs_environment_md_is_generated_from_the_declarations() -> None:
    doc = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
    assert doc == envs.markdown(), "stale: run `python -m gpubake.envs > docs/environment.md`"
    for name in envs.VARIABLES:
        assert f"| `{name}` |" in doc


def _texts() -> dict[Path, str]:
    files = [p for p in SRC.rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".j2", ".toml", ".hcl", ".json")]
    files += [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "scripts").glob("*.sh"))]
    return {p: p.read_text(encoding="utf-8") for p in files if p.is_file()}


def test_every_gpubake_name_in_code_and_docs_is_declared() -> None:
    used: dict[str, set[str]] = {}
    for path, text in _texts().items():
        for name in NAME.findall(text):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    undeclared = {name: sorted(where) for name, where in used.items() if name not in envs.VARIABLES}
    assert not undeclared, f"declare these in src/gpubake/envs.py: {undeclared}"
    code = {n for n, where in used.items() if any(w.startswith(("src/", "scripts/")) and not w.endswith("envs.py") for w in where)}
    assert set(envs.VARIABLES) - code <= NOT_YET_READ, "declared but used nowhere"


# --------------------------------------------------------------------------- no direct reads


def _is_environ(node: ast.AST, tainted: set[str]) -> bool:
    """`os.environ`, `environ`, or a local name bound to something made from os.environ."""
    if isinstance(node, ast.Attribute) and node.attr == "environ":
        return True
    return isinstance(node, ast.Name) and (node.id == "environ" or node.id in tainted)


def direct_reads(source: str) -> list[str]:
    """The places in `source` that read a GPUBAKE_ variable from os.environ without gpubake.envs."""
    tree = ast.parse(source)
    constants = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        and node.value.value.startswith("GPUBAKE_")
        for t in node.targets
        if isinstance(t, ast.Name)
    }

    def gpubake_key(node: ast.AST | None) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str) and node.value.startswith("GPUBAKE_")
        return isinstance(node, ast.Name) and node.id in constants

    found: list[str] = []
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        tainted = {
            t.id
            for node in ast.walk(scope)
            if isinstance(node, ast.Assign) and "environ" in ast.unparse(node.value)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(scope):
            if isinstance(node, ast.Call) and node.args and gpubake_key(node.args[0]):
                func = node.func
                getenv = isinstance(func, ast.Attribute) and func.attr == "getenv" or isinstance(func, ast.Name) and func.id == "getenv"
                mapping = isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") and _is_environ(func.value, tainted)
                if getenv or mapping:
                    found.append(f"{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Subscript) and gpubake_key(node.slice) and _is_environ(node.value, tainted):
                if isinstance(node.ctx, ast.Load):
                    found.append(f"{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Compare) and gpubake_key(node.left) and any(_is_environ(c, tainted) for c in node.comparators):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def test_the_checker_finds_direct_reads() -> None:
    bad = '''
import os
VAR = "GPUBAKE_CACHE"
a = os.environ.get("GPUBAKE_X", "d")
b = os.environ["GPUBAKE_Y"]
c = os.getenv(VAR)
d = "GPUBAKE_Z" in os.environ
def f(env=None):
    env = dict(os.environ) if env is None else env
    return env.get("GPUBAKE_W")
'''
    assert [line.split(":")[0] for line in direct_reads(bad)] == ["10", "4", "5", "6", "7"]
    good = 'import os\nfrom gpubake import envs\nos.environ["GPUBAKE_SET"] = "1"\nx = envs.raw("GPUBAKE_CACHE")\ny = os.environ.get("HOME")\n'
    assert direct_reads(good) == []


def test_no_module_outside_envs_reads_a_gpubake_variable_from_os_environ() -> None:
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "envs.py" and path.parent == SRC:
            continue
        if reads := direct_reads(path.read_text(encoding="utf-8")):
            offenders[str(path.relative_to(ROOT))] = reads
    assert not offenders, f"read these through gpubake.envs: {offenders}"


def test_envs_imports_nothing_from_gpubake_but_errors() -> None:
    tree = ast.parse((SRC / "envs.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert {m for m in imported if m and m.startswith("gpubake")} == {"gpubake.errors"}


# --------------------------------------------------------------------------- accessors


def test_values_are_read_when_asked_parsed_and_defaulted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GPUBAKE_CACHE", raising=False)
    assert envs.GPUBAKE_CACHE is None
    monkeypatch.setenv("GPUBAKE_CACHE", str(tmp_path))
    assert envs.GPUBAKE_CACHE == tmp_path  # a path, seen as soon as it is set
    monkeypatch.setenv("GPUBAKE_CACHE", "")
    assert envs.GPUBAKE_CACHE is None  # empty is unset
    monkeypatch.delenv("GPUBAKE_HTTP_BACKOFF", raising=False)
    assert envs.GPUBAKE_HTTP_BACKOFF == 1.0  # the declared default, parsed
    monkeypatch.setenv("GPUBAKE_HTTP_BACKOFF", "0.25")
    assert envs.GPUBAKE_HTTP_BACKOFF == 0.25
    assert envs.value("GPUBAKE_SELFTEST", {}, default="quick") == "quick"
    assert envs.raw("GPUBAKE_REGISTRY_USER", {"GPUBAKE_REGISTRY_USER": "me"}) == "me"  # any mapping, not only os.environ


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GPUBAKE_STORAGE_DRIVER", "btrfs", "GPUBAKE_STORAGE_DRIVER: 'btrfs' is not one of auto, overlay, vfs"),
        ("GPUBAKE_HTTP_BACKOFF", "fast", "GPUBAKE_HTTP_BACKOFF: not a number: 'fast'"),
        ("GPUBAKE_HTTP_BACKOFF", "-1", "GPUBAKE_HTTP_BACKOFF: must be >= 0, got '-1'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(GpubakeError) as info:
        getattr(envs, name)
    assert str(info.value) == message


def test_an_undeclared_name_is_a_bug() -> None:
    with pytest.raises(KeyError, match="GPUBAKE_NOPE is not declared"):
        envs.raw("GPUBAKE_NOPE")
    with pytest.raises(AttributeError):
        envs.GPUBAKE_NOPE  # noqa: B018


def test_secrets_are_marked_redacted_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"GPUBAKE_REGISTRY_PASSWORD", "GPUBAKE_API_KEY"} <= set(envs.secret_names())
    assert set(envs.secret_names()) <= set(secrets.SECRET_ENV_VARS)
    monkeypatch.setenv("GPUBAKE_API_KEY", "key-" + "9" * 12)
    assert secrets.redact("auth key-999999999999 sent") == "auth *** sent"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBAKE_")}
    env.update(GPUBAKE_REGISTRY_PASSWORD="pw-never-shown", GPUBAKE_CACHE="/tmp/c")
    proc = subprocess.run([sys.executable, "-m", "gpubake.envs", "--values"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["GPUBAKE_CACHE=/tmp/c", "GPUBAKE_REGISTRY_PASSWORD=***"]
    assert "pw-never-shown" not in envs.markdown()

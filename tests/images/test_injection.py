"""Hostile strings in every string field of a spec: refused with one line naming the field,
or rendered so that nothing of them runs.

Every string field of `ImageSpec` (found by walking the pydantic model, so a new field is
covered or this test fails) gets each payload below appended to its value. Through the
CLI (`build-image --render-only`), the spec is either refused (exit 2, one `error:` line
naming the field) or rendered; a rendered context must then hold a `start.sh` that passes
`bash -n` and, run in a sandbox (empty environment but the spec's own `runtime.env` as the
container runtime sets it, HOME and /etc stand-ins in a temp dir, stub `gpubake`, `sshd`,
`ssh-keygen` and `python3` that only record their argv), creates no marker file; the
Containerfile must have the same instructions as without the payload and its LABEL/ENV
values must read back exactly; the Packer template must validate; the JSON files must
carry the value unchanged.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from gpubake.cli import _run
from gpubake.images import render
from gpubake.images.catalog import CATALOG_DIR
from gpubake.images.spec import ImageSpec

PAYLOADS = (
    "\ntouch {m}\n#",  # the rest of the line commented out: valid bash that runs the command
    "\ntouch {m}\n",
    "$(touch {m})",
    "`touch {m}`",
    "';touch {m};'",
    '";touch {m};"',
    ";touch {m}",
    '}}"$(touch {m})"{{',
    "\\\ntouch {m}",
    "${{IFS}}$(touch${{IFS}}{m})",
)
FAKE = """#!/bin/bash
printf '%s\\n' "$0 $*" >> "$FAKE_LOG"
if [ "$(basename "$0")" = gpubake ] || [ "$(basename "$0")" = python3 ]; then
  env | sort > "$FAKE_LOG.env"
fi
"""


# ------------------------------------------------------------------ walking the model


def _leaves(annotation: typing.Any, path: str) -> set[str]:
    """Dotted patterns of the string leaves under `annotation` (`[]` an item, `{key}`/`{}` a dict key/value)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _leaves(args[0], path)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_leaves(a, path) for a in args))
    if origin is list:
        return _leaves(args[0], path + "[]")
    if origin is dict:
        return _leaves(args[0], path + "{key}") | _leaves(args[1], path + "{}")
    if origin is typing.Literal:
        return {path} if all(isinstance(a, str) for a in args) else set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        out: set[str] = set()
        for name, info in annotation.model_fields.items():
            out |= _leaves(info.annotation, f"{path}.{name}" if path else name)
        return out
    return {path} if annotation is str else set()


STRING_FIELDS = sorted(_leaves(ImageSpec, ""))


def _locations(data: typing.Any, pattern: str) -> list[tuple]:
    """Concrete locations in `data` for a leaf pattern: the first item of each list / dict."""
    tokens = re.findall(r"\[\]|\{key\}|\{\}|[^.\[\]{}]+", pattern)

    def walk(node: typing.Any, rest: list[str], loc: tuple) -> list[tuple]:
        if not rest:
            return [loc]
        head, tail = rest[0], rest[1:]
        if head == "[]":
            return walk(node[0], tail, loc + (0,)) if isinstance(node, list) and node else []
        if head in ("{key}", "{}"):
            if not isinstance(node, dict) or not node:
                return []
            key = sorted(node)[0]
            return [loc + (("key", key) if head == "{key}" else key,)]
        return walk(node[head], tail, loc + (head,)) if isinstance(node, dict) and head in node else []

    return walk(data, tokens, ())


def _set(data: dict, loc: tuple, payload: str) -> dict:
    data = copy.deepcopy(data)
    node = data
    for part in loc[:-1]:
        node = node[part]
    last = loc[-1]
    if isinstance(last, tuple):  # a dict key
        _, key = last
        node[key + payload] = node.pop(key)
    else:
        node[last] = node[last] + payload
    return data


def _field_name(loc: tuple) -> str:
    """How the spec's error line names the location (`runtime.env`, `runtime.entrypoint[0]`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, tuple) or (out.endswith("env") and isinstance(part, str)):
            break  # env keys and values: the message names runtime.env, then the key
        else:
            out += ("." if out else "") + part
    return out


# ------------------------------------------------------------------ writing a spec


def _toml_value(value: typing.Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def _toml(data: dict) -> str:
    lines: list[str] = []

    def table(node: dict, name: str) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict) or k in ("env",)}
        if name:
            lines.append(f"[{name}]")
        lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars.items())
        for key, value in node.items():
            if isinstance(value, dict) and key not in ("env",):
                table(value, f"{name}.{json.dumps(key)}" if name else json.dumps(key))

    table(data, "")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir of plain characters (the specs' volume_mount lies under it)."""
    path = tmp_path_factory.mktemp("inj")
    assert re.fullmatch(r"[A-Za-z0-9_/.-]+", str(path)), path
    (path / "locks").mkdir()
    for lock in (CATALOG_DIR / "locks").glob("*.txt"):
        shutil.copyfile(lock, path / "locks" / lock.name)
    return path


def _base(name: str, root: Path) -> dict:
    data = tomllib.loads((CATALOG_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    data["name"] = "spec"
    data["runtime"]["volume_mount"] = str(root / "ws")  # where start.sh may write: the sandbox
    data["model"]["sha256"] = "0" * 64
    data["model"].setdefault("at", "build")
    return data


def _cases() -> list[tuple[str, str, tuple, int]]:
    """(base spec, field pattern, location, payload index): demo, then the CUDA specs for what demo lacks."""
    out = []
    bases = {"demo": tomllib.loads((CATALOG_DIR / "demo.toml").read_text()),
             "wan22-t2v-a14b-nvfp4": tomllib.loads((CATALOG_DIR / "wan22-t2v-a14b-nvfp4.toml").read_text()),
             # a published checkpoint imported with a base: model.format, model.base, model.files
             "wan22-t2v-a14b-lightx2v-nvfp4": tomllib.loads((CATALOG_DIR / "wan22-t2v-a14b-lightx2v-nvfp4.toml").read_text()),
             # an nvidia/cuda base (base.image)
             "wan22-t2v-a14b-nvfp4-cu128": tomllib.loads((CATALOG_DIR / "wan22-t2v-a14b-nvfp4-cu128.toml").read_text())}
    for data in bases.values():
        data["model"]["sha256"] = "0" * 64
        data["model"].setdefault("at", "build")  # a Literal: a hostile value must be refused naming it
    for pattern in STRING_FIELDS:
        for base, data in bases.items():
            locs = _locations(data, pattern)
            if locs:
                out.extend((base, pattern, locs[0], i) for i in range(len(PAYLOADS)))
                break
    return out


CASES = _cases()


def test_every_string_field_of_the_spec_is_exercised() -> None:
    covered = {pattern for _, pattern, _, _ in CASES}
    assert covered == set(STRING_FIELDS), f"no sample value for {set(STRING_FIELDS) - covered}"
    assert {"name", "model.id", "model.source", "runtime.env{key}", "runtime.env{}", "runtime.entrypoint[]",
            "runtime.volume_mount", "description", "base.image", "python.lock"} <= covered


# ------------------------------------------------------------------ checks of a rendered context


def _instructions(containerfile: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", containerfile)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


_PAIR = re.compile(r'([A-Za-z0-9._-]+)="((?:[^"\\]|\\.)*)"')


def _quoted_pairs(instruction: str) -> dict[str, str]:
    """KEY="VALUE" pairs of a LABEL/ENV line, unescaped as a Containerfile parser does."""
    body = instruction.split(" ", 1)[1]
    pairs = {}
    for key, raw in _PAIR.findall(body):
        assert not re.search(r'(?<!\\)\$', raw), f"unescaped $ in {key}: {raw!r} (the builder would substitute it)"
        pairs[key] = re.sub(r"\\(.)", r"\1", raw)
    assert _PAIR.sub("", body).replace("\\", "").strip() == "", f"text outside KEY=\"VALUE\" pairs: {body!r}"
    return pairs


def _check_context(ctx: Path, spec: ImageSpec, target: str, baseline: list[str], work: Path) -> None:
    # start.sh: valid bash, and run in the sandbox it serves with nothing injected run
    script = ctx / "start.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    sandbox = work / "sandbox"
    bin_dir = sandbox / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("gpubake", "sshd", "ssh-keygen", "python3"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    for d in ("home", "etc"):
        (sandbox / d).mkdir()
    sandbox_env = {
        **spec.runtime.env,  # what the container runtime sets from the image's ENV
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(sandbox / "home"),
        "GPUBAKE_ETC": str(sandbox / "etc"),
        "GPUBAKE_SSHD_PIDFILE": str(sandbox / "sshd.pid"),
        "GPUBAKE_HOOK_DIR": str(sandbox),  # /pre_start.sh and /post_start.sh looked for here, none exist
        "GPUBAKE_SSH_WAIT": "0",  # Vast.ai: no background wait for an attached key
        "FAKE_LOG": str(sandbox / "calls.log"),
    }
    proc = subprocess.run(["bash", str(script)], env=sandbox_env, capture_output=True, text=True, timeout=60, cwd=sandbox)
    assert not list(work.rglob("pwned*")), f"start.sh ran an injected command: {proc.stderr[-500:]}"
    assert proc.returncode == 0, proc.stderr
    calls = (sandbox / "calls.log").read_text().splitlines()
    assert calls and " serve --host 0.0.0.0 " in calls[-1], calls
    # what start.sh exported for SSH sessions is read back by a shell as the same values
    out = subprocess.run(["bash", "-c", f"source {sandbox / 'etc/rp_environment' if target == 'runpod' else sandbox / 'etc/environment'}; "
                          "printf '%s' \"$GPUBAKE_IMAGE\""], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd=sandbox)
    assert out.returncode == 0 and out.stdout == spec.runtime.env.get("GPUBAKE_IMAGE", spec.name)
    # Containerfile: same instructions; LABEL and ENV read back exactly
    ins = _instructions((ctx / "Containerfile").read_text())
    assert [line.split()[0] for line in ins] == [line.split()[0] for line in baseline]
    labels: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in ins:
        if line.startswith("LABEL "):
            labels.update(_quoted_pairs(line))
        elif line.startswith("ENV "):
            env.update(_quoted_pairs(line.replace("PYTHONUNBUFFERED=1", "")))
    assert labels == render.labels(spec, target)
    assert {k: v for k, v in env.items() if k != "PATH"} == dict(spec.runtime.env)
    assert json.loads(next(line for line in ins if line.startswith("ENTRYPOINT ")).split(" ", 1)[1]) == list(spec.runtime.entrypoint)
    # JSON files carry the values unchanged
    info = json.loads((ctx / "image.json").read_text())
    assert info["description"] == spec.description  # image.json: the ImageFacts (provisioning.facts)
    assert info["model_dir"] == spec.runtime.env.get("GPUBAKE_MODEL_DIR")
    payload = json.loads((ctx / "marketplace" / f"{target}.json").read_text())
    if target == "runpod":
        assert payload["env"] == dict(spec.runtime.env)
    else:
        words = shlex.split(payload["env"])
        from gpubake.images.marketplace.payload import api_port  # the Open button's port, unless the spec sets it

        expected = {"OPEN_BUTTON_PORT": str(api_port(spec)), **spec.runtime.env}
        assert dict(w.split("=", 1) for w in words[words.index("-e") + 1 :: 2]) == expected
    # Packer HCL: parses and validates
    if shutil.which("packer"):
        proc = subprocess.run(["packer", "validate", "image.pkr.hcl"], cwd=ctx, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def baselines(root: Path) -> dict[str, list[str]]:
    """Containerfile instructions of each base spec without any payload."""
    out = {}
    for base in ("demo", "wan22-t2v-a14b-nvfp4"):
        (root / "spec.toml").write_text(_toml(_base(base, root)), encoding="utf-8")
        ctx = root / f"baseline-{base}"
        assert _run(["build-image", "--target", "runpod", "--image", str(root / "spec.toml"), "--render-only", str(ctx)]) == 0
        out[base] = _instructions((ctx / "Containerfile").read_text())
    return out


@pytest.mark.parametrize(("base", "pattern", "loc", "index"), CASES, ids=[f"{p}-{i}" for _, p, _, i in CASES])
def test_hostile_value_is_refused_or_inert(base: str, pattern: str, loc: tuple, index: int, root: Path,
                                           baselines: dict[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    work = root / f"case-{pattern.replace('{', '_').replace('}', '_').replace('[]', '_')}-{index}"
    work.mkdir()
    marker = work / "pwned"
    payload = PAYLOADS[index].format(m=marker)
    spec_path = work / "spec.toml"
    shutil.copytree(root / "locks", work / "locks")
    data = _set(_base(base, root), loc, payload)
    spec_path.write_text(_toml(data), encoding="utf-8")
    target = "vastai" if index % 2 else "runpod"
    ctx = work / "ctx"
    capsys.readouterr()
    rc = _run(["build-image", "--target", target, "--image", str(spec_path), "--render-only", str(ctx)])
    err = capsys.readouterr().err
    if rc != 0:
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert f"spec.toml: {_field_name(loc)}" in lines[0], (lines[0], _field_name(loc))
        assert not ctx.exists()
    else:
        from gpubake.images.spec import load_spec

        _check_context(ctx, load_spec(spec_path), target, baselines[base], work)
    assert not list(root.rglob("pwned*")), f"payload ran: {payload!r} in {pattern}"


def test_quotes_in_env_are_refused_for_vastai_naming_file_and_key(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, _, loc, _ = next(c for c in CASES if c[1] == "runtime.env{}")
    work = root / "vast-quotes"
    work.mkdir()
    shutil.copytree(root / "locks", work / "locks")
    data = _set(_base(base, root), loc, "it's")
    data["targets"] = ["runpod", "vastai"]
    (work / "spec.toml").write_text(_toml(data), encoding="utf-8")
    capsys.readouterr()
    assert _run(["build-image", "--target", "runpod", "--image", str(work / "spec.toml"), "--render-only", str(work / "ctx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spec.toml: runtime.env." in err[0] and "Vast.ai's env string cannot carry quotes" in err[0]
    assert not (work / "ctx").exists()


@pytest.mark.parametrize("pattern", ["description", "runtime.env{}"])
def test_free_text_fields_do_reach_the_templates(pattern: str, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Free text (one line, printable) is accepted: there, the templates' quoting is what
    keeps a payload inert, and the cases above check it on a rendered context."""
    base, _, loc, _ = next(c for c in CASES if c[1] == pattern)
    work = root / f"free-{pattern.replace('{}', '_')}"
    work.mkdir()
    shutil.copytree(root / "locks", work / "locks")
    data = _set(_base(base, root), loc, " $(x) `y` 'z' \"w\"; ${IFS}")
    if pattern == "runtime.env{}":  # quotes cannot travel in Vast.ai's env string (spec.check_target_env)
        data["targets"] = ["runpod"]
    (work / "spec.toml").write_text(_toml(data), encoding="utf-8")
    assert _run(["build-image", "--target", "runpod", "--image", str(work / "spec.toml"), "--render-only", str(work / "ctx")]) == 0
    assert "start.sh" in json.loads((work / "ctx" / "context.json").read_text())["files"]

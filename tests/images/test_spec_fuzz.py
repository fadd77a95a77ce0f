"""Fuzz the spec parser: any TOML-ish input parses or raises a one-line SpecError, nothing else."""

from __future__ import annotations

import copy
import datetime as dt
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpubake.errors import SpecError
from gpubake.images.catalog import CATALOG_DIR
from gpubake.images.spec import load_toml, parse_spec

VALID = tomllib.loads((CATALOG_DIR / "wan22-ti2v-5b.toml").read_text(encoding="utf-8"))

# Values TOML can hold: strings, ints, floats, bools, datetimes, arrays, tables.
scalars = (
    st.text(max_size=20)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31))
    | st.dates()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(
    ["name", "cuda", "torch", "targets", "gpu_archs", "cpu_ok", "base", "python", "model", "runtime", "schema_version", "description", "extra"]
)
nested = st.sampled_from(
    [("base", "image"), ("base", "bootstrap"), ("python", "lock"), ("python", "version"), ("model", "sha256"), ("model", "source"),
     ("runtime", "ports"), ("runtime", "env"), ("runtime", "entrypoint"), ("runtime", "container_disk_gb")]
)


def _one_line(exc: SpecError) -> None:
    assert "\n" not in str(exc) and str(exc).startswith("fuzz.toml: ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=12), values, max_size=8))
def test_arbitrary_tables(data: dict) -> None:
    try:
        parse_spec(data, source="fuzz.toml")
    except SpecError as exc:
        _one_line(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values), max_size=3), st.lists(st.tuples(nested, values), max_size=3), st.lists(keys, max_size=2))
def test_mutations_of_a_valid_spec(top: list, deep: list, dropped: list) -> None:
    data = copy.deepcopy(VALID)
    for key, value in top:
        data[key] = value
    for (table, key), value in deep:
        if isinstance(data.get(table), dict):
            data[table][key] = value
    for key in dropped:
        data.pop(key, None)
    try:
        spec = parse_spec(data, source="fuzz.toml")
    except SpecError as exc:
        _one_line(exc)
    else:
        assert spec.name == data["name"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_file_bytes(tmp_path: Path, content: str | bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    try:
        parse_spec(load_toml(path), source="fuzz.toml")
    except SpecError as exc:
        assert "\n" not in str(exc)

"""torch.compile's caches on the volume (provisioning/compile_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from gpubake.provisioning.compile_cache import use_persistent_compile_cache


def test_the_volume_folder_unless_the_user_chose(tmp_path):
    env = {"GPUBAKE_HOME": str(tmp_path / "home")}
    got = use_persistent_compile_cache(env)
    cache = tmp_path / "home" / "compile-cache"
    assert got == {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor") and (cache / "triton").is_dir()
    env = {"GPUBAKE_HOME": str(tmp_path / "home"), "GPUBAKE_COMPILE_CACHE": str(tmp_path / "cc"),
           "TRITON_CACHE_DIR": "/user/triton"}
    assert use_persistent_compile_cache(env) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cc" / "inductor"),
                                                 "TRITON_CACHE_DIR": "/user/triton"}
    assert use_persistent_compile_cache({}) == {}  # no volume: torch's defaults


def test_a_read_only_volume_leaves_torchs_defaults(tmp_path):
    (tmp_path / "home").write_text("a file where the folder would go")
    env = {"GPUBAKE_HOME": str(tmp_path / "home")}
    assert use_persistent_compile_cache(env) == {} and "TORCHINDUCTOR_CACHE_DIR" not in env


def test_inductor_writes_there_even_when_torch_was_imported_first(tmp_path):
    """The self-test imports torch before it compiles: inductor must still read the folder."""
    code = textwrap.dedent("""
        import torch
        from gpubake.provisioning.compile_cache import use_persistent_compile_cache
        use_persistent_compile_cache()
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        f(torch.randn(8))
    """)
    env = {**os.environ, "GPUBAKE_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": "", "TRITON_CACHE_DIR": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = [p for p in (tmp_path / "compile-cache" / "inductor").rglob("*") if p.is_file()]
    assert written, "inductor wrote nothing to the persistent cache"

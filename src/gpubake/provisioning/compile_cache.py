"""Keep torch.compile's caches on the volume, so only a volume's first boot compiles.

Why: the Hopper plan compiles each expert's repeated block at boot; with inductor's and
Triton's caches empty that cost ~17 s of an A14B boot on an H200 (docs/benchmarks.md).
Their defaults live under /tmp, which a new container does not keep; RunPod and Vast.ai
keep /workspace. The caches are keyed by torch, Triton, GPU and graph, so a volume moved to
another GPU or image compiles again instead of loading something wrong.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from gpubake import envs

INDUCTOR = "TORCHINDUCTOR_CACHE_DIR"
TRITON = "TRITON_CACHE_DIR"


def compile_cache_dir(env: MutableMapping[str, str] | None = None) -> Path | None:
    """$GPUBAKE_COMPILE_CACHE, else $GPUBAKE_HOME/compile-cache, else None (torch's defaults)."""
    env = os.environ if env is None else env
    chosen = envs.value("GPUBAKE_COMPILE_CACHE", env)
    if chosen is not None:
        return chosen
    home = envs.raw("GPUBAKE_HOME", env)
    return Path(home) / "compile-cache" if home else None


def use_persistent_compile_cache(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Point inductor and Triton at the persistent cache, unless the user set them; call
    before torch compiles anything. Returns the two variables as they now are (for the report)."""
    env = os.environ if env is None else env
    root = compile_cache_dir(env)
    if root is not None:
        for name, sub in ((INDUCTOR, "inductor"), (TRITON, "triton")):
            if not env.get(name):
                try:
                    (root / sub).mkdir(parents=True, exist_ok=True)
                except OSError:  # a read-only volume: torch's defaults, the boot just compiles
                    continue
                env[name] = str(root / sub)
    return {name: env[name] for name in (INDUCTOR, TRITON) if env.get(name)}

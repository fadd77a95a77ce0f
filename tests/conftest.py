"""Fixtures shared by every part's tests.

`tiny_checkpoint` and `tiny_nvfp4_checkpoint` are built ONCE per session (a few
seconds) into a temporary directory; tests must treat them as read-only (copy with
`shutil.copytree` before changing anything).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Wan 2.2 (two experts) BF16 checkpoint in the diffusers layout."""
    from gpubake.provisioning.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", seed=0)


@pytest.fixture(scope="session")
def tiny_nvfp4_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` quantized to NVFP4 with the default policy (has gpubake-manifest.json)."""
    from gpubake.provisioning.quantize import quantize_checkpoint

    dest = tmp_path_factory.mktemp("ckpt") / "tiny-nvfp4"
    quantize_checkpoint(tiny_checkpoint, dest, policy="default", progress=False)
    return dest

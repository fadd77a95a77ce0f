"""Fault injection for the GPU-group tests (a module of its own: the spawned rank processes
import the loader by name). The loader is the real one (`load_pipeline`, manifest
required, as `load_serving_pipeline` runs it); only the pipeline's call is wrapped, so a
clip whose prompt is `DIE` kills rank 1 with SIGKILL in the middle of the group's render
(what the kernel's OOM killer or a crashed driver does to one rank)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

DIE = "rank 1 dies mid-render"


def _dying_class(base: type) -> type:
    class Dying(base):  # type: ignore[misc, valid-type]
        def __call__(self, *args: Any, **kw: Any) -> Any:
            import torch.distributed as dist

            if kw.get("prompt") == DIE and dist.is_initialized() and dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(*args, **kw)

    return Dying


def dying_loader(path: Path, device: str) -> Any:
    from gpubake.provisioning.loader import load_pipeline

    pipe = load_pipeline(path, device, require_manifest=True)
    pipe.__class__ = _dying_class(type(pipe))
    return pipe

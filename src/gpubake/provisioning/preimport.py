"""Import the render stage's libraries in a background thread while the self-test hashes
the model files ($GPUBAKE_PREIMPORT).

Why: on a boot the render stage's load clock spends ~9 s that no load phase accounts for,
mostly Python importing diffusers' Wan pipeline, transformers' UMT5 and torch's compiler
from a cold page cache, while the model-file check before it (~5.6 s of hashing with
`--quick` on an A14B) leaves the interpreter idle (hashlib releases the GIL).

Two threads importing one package at once can see a partly initialised module where its
imports are circular (accelerate's are), so nothing else may import these at the same
time: the self-test starts this after the kernel stage (torch and triton are whole by then)
and the render stage joins it before its own imports.

An import that fails here is recorded, not raised: the render stage imports the same
modules itself and reports the failure where it belongs.
"""

from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gpubake import envs

# what the render stage imports, heaviest first (each pulls in its dependencies)
MODULES = (
    "diffusers.pipelines.wan.pipeline_wan",
    "diffusers.models.transformers.transformer_wan",
    "diffusers.models.autoencoders.autoencoder_kl_wan",
    "transformers.models.umt5.modeling_umt5",
    "torch._dynamo",
    "torch._inductor.compile_fx",
)  # not gpubake's own modules: the model stage imports some of them as this runs


@dataclass
class Preimport:
    """One background import of `modules`; `summary()` for the report."""

    modules: tuple[str, ...] = MODULES
    seconds: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    finished: bool = False
    _thread: threading.Thread | None = None

    def start(self) -> Preimport:
        self._thread = threading.Thread(target=self._run, name="gpubake-preimport", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        for name in self.modules:
            t0 = time.perf_counter()
            try:
                importlib.import_module(name)
            except Exception as exc:  # the render stage meets it again and reports it
                self.errors.append(f"{name}: {' '.join(str(exc).split())[:160]}")
            self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.finished = True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def summary(self) -> dict[str, Any]:
        return {"finished": self.finished, "seconds": round(sum(self.seconds.values()), 3),
                "modules": dict(self.seconds), "errors": list(self.errors)}


def start_if_on() -> Preimport | None:
    """A started Preimport when $GPUBAKE_PREIMPORT is on, else None."""
    if envs.GPUBAKE_PREIMPORT != "on":
        return None
    return Preimport().start()

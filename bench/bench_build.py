"""Time the demo image build: cold (fresh store, no layer cache), repeated cold (must give
the same digest), and warm after a code-only change (layer cache up to gpubake's wheel step).

    .venv/bin/python bench/bench_build.py [--out /tmp/gpubake-bench] [--json]

Slow inputs (bootstrap base, wheels, tiny model) come from ~/.cache/gpubake as in a normal
build; their first-time cost is timed separately. Results go in docs/building.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

EPOCH = 1700000000


def _build(out: Path, store: Path, *, no_cache: bool, edit: str | None = None) -> dict:
    from gpubake.images.builders.base import BuildRequest
    from gpubake.images.builders.buildah import BuildahBuilder
    from gpubake.images.builders.storage import storage_at
    from gpubake.images.catalog import find
    from gpubake.images.model_layer import prepare_model
    from gpubake.images.render import RenderOptions, render_context

    spec = find("demo")
    t0 = time.monotonic()
    ctx = out / "context"
    render_context(spec, "runpod", ctx, RenderOptions(timestamp=EPOCH))
    if edit:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from testutil import edit_context_code

        edit_context_code(ctx, edit)
    prepare_model(spec, ctx)
    t1 = time.monotonic()
    builder = BuildahBuilder(storage_at(store), no_cache=no_cache, on_step=None)
    res = builder.build(
        BuildRequest(spec, "runpod", ctx, "localhost/gpubake/demo:runpod", out / "demo.oci.tar", EPOCH, out / "build.log")
    )
    return {
        "prepare_s": round(t1 - t0, 1),
        "build_s": round(res.seconds, 1),
        "digest": res.digest,
        "compressed_mb": round(res.total_size / 1e6, 1),
        # the weight layers: one per folder of the context's model/, right before the app and the tail
        "weights_layer": [x["digest"] for x in res.layers[-2 - len(list((ctx / "model").iterdir())):-2]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpubake-bench-build"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    runs = {
        "cold": _build(args.out / "cold", args.out / "store-a", no_cache=False),
        "cold_again": _build(args.out / "cold2", args.out / "store-b", no_cache=True),
        "code_change_warm": _build(args.out / "warm", args.out / "store-a", no_cache=False, edit="\n# bench edit\n"),
    }
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "buildah": subprocess.run(["buildah", "--version"], capture_output=True, text=True).stdout.strip(),
        "same_digest": runs["cold"]["digest"] == runs["cold_again"]["digest"],
        "weights_layer_kept": runs["cold"]["weights_layer"] == runs["code_change_warm"]["weights_layer"],
        "runs": runs,
    }
    shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()

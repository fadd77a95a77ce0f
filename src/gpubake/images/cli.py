"""`gpubake build-image` (also the `build-image` script), `gpubake images`, `gpubake spec-schema`.

build-image: load the spec -> check compatibility -> render the build context -> build
(buildah, docker or packer) -> optionally push -> print the result. Every step before the
build is pure and fast, so a bad flag, spec or architecture fails in well under a second,
before any builder runs, with one line naming what is wrong.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import typer

from gpubake.console import console, emit_json, step_progress
from gpubake.errors import BuildError, GpubakeError
from gpubake.images.builders.base import COMPRESSIONS
from gpubake.images.builders.detect import BUILDER_NAMES



def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise GpubakeError(f"{flag}: unknown value {value!r} (choose {' or '.join(choices)})")
    return value


def _epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not raw.isdigit():
        raise GpubakeError(f"SOURCE_DATE_EPOCH: {raw!r} is not a whole number of seconds")
    return int(raw)


def _paths(name: str, target: str, dist: Path, log_file: Path | None) -> tuple[Path, Path]:
    archive = dist / f"{name}-{target}.oci.tar"
    return archive, log_file or dist / f"{name}-{target}.build.log"


def _request(spec: Any, target: str, *, dist: Path, archive: Path, log_path: Path, timestamp: int,
             compression: str = "zstd") -> Any:
    """The `BuildRequest` of a build, and of its dry run: the same paths, so the same plan.

    The context is rendered into `DIST/.context-NAME-TARGET` (removed after the build).
    """
    from gpubake.images import render
    from gpubake.images.builders import BuildRequest

    return BuildRequest(
        spec=spec,
        target=target,
        context_dir=dist / f".context-{spec.name}-{target}",
        tag=f"{render.local_repository(spec)}:{target}",
        archive=archive,
        timestamp=timestamp,
        log_file=log_path,
        compression=compression,
    )


def with_tiny_model(spec: Any) -> Any:
    """`spec` with the tiny generated model (default policy) baked instead of its own, in the
    spec's quantized format (an FP8 image's tiny model is FP8, so its self-test runs the FP8
    path; NVFP4 otherwise), and `cpu_ok` (the tiny model renders on a CPU, so the image's
    self-test runs without a GPU)."""
    from gpubake.images.spec import QUANTIZED, Model

    fmt = spec.model.quantization if spec.model.quantization in QUANTIZED else "nvfp4"
    tiny = Model(id="tiny-wan2.2", quantization=fmt, policy="default", source="generate:tiny")
    return spec.model_copy(update={"model": tiny, "cpu_ok": True})


def _plan(spec: Any, target: str, builder: Any, *, req: Any, push: str | None, render_dir: Path | None, note: str = "") -> dict:
    """What build-image would do, step by step; the build step holds the builder's own plan."""
    steps: list[dict[str, Any]] = [
        {"step": "load spec", "detail": str(spec.source)},
        {"step": "check compatibility", "detail": f"torch {spec.torch}, cuda {spec.cuda}, archs {', '.join(spec.gpu_archs) or 'cpu'}"},
        {"step": "render context", "detail": str(render_dir or req.context_dir)},
    ]
    name = "none" if render_dir is not None else builder.name if builder is not None else f"none available ({note})"
    weights = _weights_estimate(spec)
    if render_dir is None:
        from gpubake.images.model_layer import describe

        how = describe(spec)
        if spec.model.at == "boot":
            detail = f"none: model.at = boot (start.sh fetches {spec.model.source} into the volume at boot)"
        else:
            detail = (f"{how['detail']} -> {req.context_dir / 'model'}: "
                      f"{len(weights['layers'])} layers, {weights['image_weight_bytes'] / 1e9:.2f} GB")
        steps.append({**how, "step": "prepare model", "detail": detail, "weights": weights})
        if builder is not None:
            commands = builder.plan(req)
            steps.append({"step": f"build ({builder.name})", "detail": req.tag, "commands": [c.command() for c in commands],
                          "plan": [c.to_json() for c in commands], "log_file": str(req.log_file)})  # fmt: skip
        if push:
            steps.append({"step": "push", "detail": f"{req.archive} -> {push}", "auth": "GPUBAKE_REGISTRY_USER/PASSWORD or the container auth file"})
    return {"dry_run": True, "image": spec.name, "target": target, "builder": name, "compression": req.compression,
            "weights": weights, "steps": steps}


def _weights_estimate(spec: Any) -> dict[str, Any]:
    """The weight layers, download, disk, RAM and time (`images.layers.estimate`), before anything starts."""
    from gpubake.images import layers, model_layer
    from gpubake.provisioning.bake import MANIFEST_NAME

    cached = model_layer.cached_path(spec)
    return layers.estimate(spec, cached=cached if (cached / MANIFEST_NAME).is_file() else None).to_json()


def _print_plan(plan: dict) -> None:
    console.print(f"[bold]build-image plan[/] for {plan['image']} ({plan['target']}), builder {plan['builder']}:")
    for i, step in enumerate(plan["steps"], 1):
        console.print(f"  {i}. {step['step']}: {step['detail']}", markup=False, soft_wrap=True)
        for layer in step.get("weights", {}).get("layers", []):
            console.print(f"       layer {layer['name']}: {layer['bytes'] / 1e9:.2f} GB{' (est.)' if layer['estimated'] else ''}"
                          f"  {layer['source']}", markup=False, soft_wrap=True)
        if "weights" in step and step["weights"].get("seconds"):
            w = step["weights"]
            quant = w["quantize"]
            on = f", quantize on {quant['device']}" + (f" ({quant['cpu_cores']} cores)" if quant.get("cpu_cores") else "") if quant else ""
            console.print(f"       download {(w['download_bytes'] or 0) / 1e9:.1f} GB, disk {(w['disk_bytes'] or {}).get('total', 0) / 1e9:.1f} GB, "
                          f"RAM {(w['ram_bytes'] or 0) / 1e9:.1f} GB, ~{w['seconds']['total'] / 60:.0f} min{on}", markup=False, soft_wrap=True)
        for cmd in step.get("plan", []):
            env = "".join(f"{k}={shlex.quote(v)} " for k, v in cmd["env"].items())
            where = f"   # in {cmd['cwd']}" if cmd["cwd"] else ""
            console.print(f"       $ {env}{shlex.join(cmd['argv'])}{where}", markup=False, soft_wrap=True)


def build_image(
    target: str | None = typer.Option(None, "--target", help="Marketplace: runpod or vastai (required)."),
    image: str = typer.Option("demo", "--image", help="Catalog image name, or a path to a spec .toml."),
    builder: str | None = typer.Option(
        None, "--builder", help=f"{', '.join(BUILDER_NAMES)} (default: first available, {BUILDER_NAMES[0]} first)."
    ),
    push: str | None = typer.Option(None, "--push", help="Push the result to REGISTRY/NAME:TAG."),
    render_only: Path | None = typer.Option(None, "--render-only", help="Only write the build context to DIR (new or empty)."),
    dist: Path = typer.Option(Path("dist"), "--dist", help="Where the OCI archive and the build log go."),
    json_out: bool = typer.Option(False, "--json", help="End with one JSON object on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (steps, weight layers, download, disk, RAM, time and the builder's commands); touch nothing."),
    log_file: Path | None = typer.Option(None, "--log-file", help="Full build log (default: DIST/NAME-TARGET.build.log)."),
    compression: str = typer.Option("zstd", "--compression", help=f"Layer compression: {', '.join(COMPRESSIONS)} (gzip for runtimes older than Docker 23 / containerd 1.5)."),
    with_model: bool = typer.Option(False, "--with-model", help="With --render-only: also place the weights in DIR/model/ (fetch, quantize, cached), so DIR builds as it is."),
    tiny_model: bool = typer.Option(False, "--tiny-model", help="Bake the tiny random-weight model (generated here) instead of the spec's, and let the image self-test on a CPU: the image's environment end to end without the real weights (tag and archive get a -tiny suffix)."),
) -> None:
    """Build a marketplace image from its spec: OCI archive in dist/, or pushed with --push."""
    from gpubake.images import catalog, render
    from gpubake.images.spec import TARGETS

    if target is None:
        raise GpubakeError("--target is required (runpod or vastai)")
    _check_choice("--target", target, TARGETS)
    if builder is not None:
        _check_choice("--builder", builder, BUILDER_NAMES)
    _check_choice("--compression", compression, COMPRESSIONS)
    if with_model and render_only is None:
        raise GpubakeError("--with-model: only with --render-only DIR (a build places the weights itself)")
    push_target = render.PushTarget.parse(push) if push else None
    spec = catalog.find(image)  # load + parse + validate + compatibility: one-line SpecError
    if target not in spec.targets:
        raise GpubakeError(f"--target: image {spec.name!r} does not list {target!r} in targets ({', '.join(spec.targets)})")
    timestamp = _epoch()
    if tiny_model:
        spec = with_tiny_model(spec)
    variant = f"{target}-tiny" if tiny_model else target
    archive, log_path = _paths(spec.name, variant, dist, log_file)
    req = _request(spec, target, dist=dist, archive=archive, log_path=log_path, timestamp=timestamp, compression=compression)
    if tiny_model:
        req.tag = f"{req.tag}-tiny"

    if dry_run:
        from gpubake.images.builders import detect_builder, make_builder

        chosen, note = None, ""
        if render_only is None:
            try:
                chosen = make_builder(builder) if builder else detect_builder(None)
            except BuildError as exc:
                if builder:
                    raise
                note = str(exc)
        plan = _plan(spec, target, chosen, req=req, push=push, render_dir=render_only, note=note)
        _print_plan(plan)
        if json_out:
            emit_json(plan)
        return

    options = render.RenderOptions(timestamp=timestamp, push=push_target)
    if render_only is not None:
        _render_only(spec, target, render_only, options, with_model=with_model, json_out=json_out, image=image)
        return

    from gpubake.images.builders import detect_builder

    chosen = detect_builder(builder)
    result = _build(spec, target, chosen, req=req, dist=dist)
    out: dict[str, Any] = {"image": spec.name, "target": target, "log_file": str(log_path), **result.to_json()}
    out["pushed"] = None
    if push_target is not None:
        out["pushed"] = _push(archive, push_target.ref, log_path)
    console.print(
        f"[bold green]built[/] {spec.name} ({target}) with {result.builder} in {result.seconds:.1f}s: "
        f"{result.digest}, {len(result.layers)} layers, {result.total_size / 1e6:.1f} MB"
        + (f" -> {archive}" if result.archive else "")
    )
    if json_out:
        emit_json(out)


def _render_only(spec: Any, target: str, dest: Path, options: Any, *, with_model: bool, json_out: bool, image: str) -> None:
    """`--render-only DIR [--with-model]`: the context, and what it leaves out and how to fill it."""
    from gpubake.images import model_layer, render

    base = None
    if with_model:
        options.weights = model_layer.plan_for_build(spec)  # fetch/quantize first (own progress), exact plan
        base = _bootstrap_layout(spec, options.timestamp, dest)
    created = not dest.exists()
    try:
        rendered = render.render_context(spec, target, dest, options)
    except OSError as exc:  # read-only, full disk: one line naming the flag and the directory
        raise GpubakeError(f"--render-only: {dest}: {exc.strerror or exc}") from None
    left_out = None
    if with_model and spec.model.at == "build":
        try:
            model_layer.prepare_model(spec, dest)
        except BaseException:  # nothing half-written, and nothing removed that this command did not make
            shutil.rmtree(dest if created else dest / model_layer.MODEL_DIR, ignore_errors=True)
            raise
    elif spec.model.at == "build":
        left_out = _left_out(spec, target, dest, image)
    console.print(f"rendered {len(rendered.files) + 1} files for {spec.name} ({target}) into {dest}")
    for note in rendered.skipped:
        console.print(f"  skipped: {note}", markup=False)
    if left_out:
        console.print(left_out["message"], markup=False, soft_wrap=True)
    if base:
        console.print(base["message"], markup=False, soft_wrap=True)
    if json_out:
        emit_json({"image": spec.name, "target": target, **rendered.to_json(), "left_out": left_out, "base": base})


def _bootstrap_layout(spec: Any, timestamp: int, dest: Path) -> dict[str, Any] | None:
    """A bootstrap base is gpubake's own image: build its OCI layout (cached) and say how a hand-run
    build gets it (`FROM` names it as a local image)."""
    if spec.base.bootstrap is None:
        return None
    from gpubake.images import bootstrap

    inputs = bootstrap.inputs_for(spec, timestamp)
    ref = inputs.ref()
    try:
        layout = bootstrap.build_layout(inputs, log_file=dest.parent / f".{dest.name}.bootstrap.log")
    except BuildError as exc:  # no root or no debootstrap here: say so, the weights are placed all the same
        return {"ref": ref, "layout": None, "load": {}, "error": str(exc),
                "message": f"base: FROM {ref} is gpubake's bootstrap base, not built here ({exc}); "
                           f"`build-image --dry-run` lists the commands that make it (debootstrap, as root)"}
    load = {"docker": f"skopeo copy oci:{layout} docker-daemon:{ref}",
            "buildah/podman": f"skopeo copy oci:{layout} containers-storage:{ref}"}
    return {"ref": ref, "layout": str(layout), "load": load,
            "message": f"base: FROM {ref} is gpubake's bootstrap base, built in {layout}; load it into your builder first:\n"
                       + "".join(f"  {cmd}   # {who}\n" for who, cmd in load.items())}


def _left_out(spec: Any, target: str, dest: Path, image: str) -> dict[str, Any]:
    """What a context without weights lacks (`model/`), and the commands that fill it."""
    from gpubake.images import model_layer
    from gpubake.images.spec import QUANTIZED

    m = spec.model
    layers = model_layer.read_plan(dest)
    size = sum(layer.bytes for layer in layers)
    fill = ["build-image", "--target", target, "--image", image, "--render-only", f"{dest}-full", "--with-model"]
    work = Path(model_layer.cached_path(spec))
    steps = ([f"gpubake make-tiny {shlex.quote(str(work))}.src"] if m.source == "generate:tiny"
             else [f"gpubake fetch {shlex.quote(m.source)} {shlex.quote(str(work))}.src"
                   + (f" --sha256 {m.sha256}" if m.sha256 else "")])
    if m.quantization in QUANTIZED:
        steps.append(f"gpubake quantize {shlex.quote(str(work))}.src {shlex.quote(str(work))}"
                     + f" --format {m.quantization} --policy {m.policy} --model-id {m.id} --device cuda   # or --device cpu")
    base_note = (f" (--with-model also builds the bootstrap base that FROM names, and says how to load it)"
                 if spec.base.bootstrap is not None else "")
    message = (
        f"left out: model/ (the weights: {len(layers)} layers, ~{size / 1e9:.2f} GB, planned in {dest / 'weights.json'}){base_note}. "
        f"To build this context by hand (docker build / buildah bud {dest}), render it with the weights placed:\n"
        f"  {shlex.join(fill)}\n"
        f"which runs, cached in {work.parent} (the same commands by hand):\n" + "".join(f"  {c}\n" for c in steps)
        + f"and hard-links the checkpoint into <DIR>/model/<layer>/ as weights.json plans."
    )
    return {"path": "model/", "layers": len(layers), "bytes": size, "fill": shlex.join(fill), "commands": steps,
            "message": message}


def _build(spec: Any, target: str, chosen: Any, *, req: Any, dist: Path) -> Any:
    """Make the weights, render into the request's context, build it, clean up; progress on stderr."""
    from gpubake.images import model_layer, render

    dist.mkdir(parents=True, exist_ok=True)
    req.log_file.parent.mkdir(parents=True, exist_ok=True)
    req.log_file.write_text("", encoding="utf-8")
    context = Path(req.context_dir)
    shutil.rmtree(context, ignore_errors=True)  # what an interrupted build left
    # The checkpoint first, with its own progress (download, quantize: a bar and an ETA per
    # shard): its exact layer plan is what the Containerfile is rendered with.
    weights = model_layer.plan_for_build(spec)
    try:
        with step_progress() as progress:
            task = progress.add_task("render build context")
            render.render_context(spec, target, context, render.RenderOptions(timestamp=req.timestamp, weights=weights))
            _prepare_model(spec, context, req.log_file, progress, task)
            progress.update(task, description=f"build with {chosen.name} (log: {req.log_file})")

            def on_progress(message: str) -> None:
                progress.update(task, description=f"{chosen.name}: {message[:100]}")

            started = time.monotonic()
            result = chosen.build(req, on_progress=on_progress)
            if not result.seconds:
                result.seconds = time.monotonic() - started
            progress.update(task, description=f"built with {chosen.name}")
        return result
    finally:
        shutil.rmtree(context, ignore_errors=True)


def _prepare_model(spec: Any, context: Path, log_path: Path, progress: Any, task: Any) -> None:
    """Place the model weights in the context's model/ (made once, then cached)."""
    from gpubake.images import model_layer

    progress.update(task, description=f"stage the weights of {spec.model.id} ({spec.model.source}) as layers")
    model_layer.prepare_model(spec, context)


def _push(archive: Path, dest: str, log_path: Path) -> dict[str, str]:
    """Push the archive (credentials from the environment or the user's auth file)."""
    from gpubake.images import registry

    with step_progress() as progress:
        progress.add_task(f"push {archive.name} -> {dest}")
        pushed = registry.push(archive, dest, auth=registry.resolve_auth(dest), log_file=log_path)
    return pushed.to_json()


def images(json_out: bool = typer.Option(False, "--json", help="Print the catalog as JSON.")) -> None:
    """List the shipped images: GPU architectures and memory, CUDA, torch, minimum host driver."""
    from gpubake.images import catalog, compat

    rows = []
    for spec in catalog.all_specs():
        driver = compat.min_driver(spec.cuda).toolkit if spec.cuda != "none" else None
        rows.append(
            {
                "name": spec.name,
                "targets": list(spec.targets),
                "gpu_archs": list(spec.gpu_archs),
                "min_gpu_memory_gb": spec.min_gpu_memory_gb,
                "cpu_ok": spec.cpu_ok,
                "cuda": spec.cuda,
                "torch": spec.torch,
                "min_driver": driver,
                "model": spec.model.id,
                "quantization": spec.model.quantization,
            }
        )
    if json_out:
        emit_json({"images": rows})
        return
    from rich.table import Table

    cells = [[r["name"], ", ".join(r["gpu_archs"]) or "cpu",
              f">= {r['min_gpu_memory_gb']} GB" if r["min_gpu_memory_gb"] else "-", r["cuda"], r["torch"],
              r["min_driver"] or "-", f"{r['model']} ({r['quantization']})"] for r in rows]
    table = Table("image", "GPU archs", "GPU memory", "CUDA", "torch", "min driver", "model")
    for c in cells:
        table.add_row(*c)
    heads = [c.header for c in table.columns]
    natural = sum(max(len(str(h)), *(len(c[i]) for c in cells)) + 3 for i, h in enumerate(heads)) + 1  # pad, border
    if natural <= console.width:
        console.print(table)
        return
    # a narrow terminal would cut the names, which is what a user copies into --image: a
    # name a line, its facts indented below
    for c in cells:
        gpu = c[1] + ("" if c[2] == "-" else f", {c[2]}")
        driver = "" if c[5] == "-" else f", driver >= {c[5]}"
        console.print(c[0], style="bold", soft_wrap=True)
        console.print(f"  GPU {gpu}; CUDA {c[3]}, torch {c[4]}{driver}; model {c[6]}", soft_wrap=True, highlight=False)


def spec_schema(output: Path | None = typer.Option(None, "--output", "-o", help="Write to FILE instead of stdout.")) -> None:
    """Print the JSON Schema of image spec files (for editors and reviews)."""
    from gpubake.fsutil import write_text_atomic
    from gpubake.images.spec import json_schema_text

    text = json_schema_text()
    if output is None:
        typer.echo(text, nl=False)
    else:
        write_text_atomic(output, text)
        console.print(f"wrote {output}")

"""The `gpubake` command line: one typer app, each part registers its own commands.

Each part of the package (images, provisioning, smoke_tests, ...) owns a `cli.py`
with `register(app)`; heavy imports (torch, diffusers, boto3) happen inside the
command functions so that `gpubake --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

import typer

from gpubake import __version__
from gpubake.console import console
from gpubake.errors import GpubakeError

if TYPE_CHECKING:
    from gpubake.provisioning.facts import ImageFacts

# Parts that contribute commands, in --help order.
COMMAND_MODULES = (
    "gpubake.images.cli",  # build-image
    "gpubake.provisioning.cli",  # fetch, make-tiny, quantize, fidelity
    "gpubake.smoke_tests.cli",  # selftest
    "gpubake.provisioning.serving.cli",  # serve
    "gpubake.images.marketplace.cli",  # publish, launch, destroy, remote, push-weights
)

app = typer.Typer(
    name="gpubake",
    help="Build GPU marketplace images (RunPod, Vast.ai) for NVFP4 Wan 2.2 video generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gpubake {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    """gpubake: spec -> OCI image -> marketplace template -> self-tested instance."""
    from gpubake.provisioning.facts import provide_spec_facts

    provide_spec_facts(_spec_facts)


def _spec_facts(name_or_path: str) -> ImageFacts:
    """`--image NAME` / `--spec PATH` / $GPUBAKE_IMAGE of `selftest` and `serve`: a dev box or a
    bare host has the catalog but no image.json, so the build side derives the facts from
    the spec as build-image does for image.json. This module sees both sides; the in-image
    side itself never imports `gpubake.images` (docs/architecture.md)."""
    from gpubake.images import catalog, render

    return render.image_facts(catalog.find(name_or_path), None)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a part not yet present in this checkout
            if exc.name and exc.name.startswith("gpubake"):
                continue
            raise
        module.register(app)


_register_all()


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error class(es): typer >= 0.20 vendors click as `typer._click`."""
    classes: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            classes.append(importlib.import_module(module).ClickException)
        except ModuleNotFoundError:
            continue
    return tuple(classes)


_CLICK_ERRORS = _click_errors()


def _run(argv: list[str] | None = None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int):  # click returns typer.Exit's code instead of raising it
            return rc
    except GpubakeError as exc:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        console.print("aborted")
        return 130
    except _CLICK_ERRORS as exc:  # usage errors: bad flag, bad value, missing argument
        exc.show()
        return exc.exit_code
    return 0


def main() -> None:
    """Entry point of the `gpubake` console script."""
    sys.exit(_run())


def build_image_main() -> None:
    """Entry point of the `build-image` console script (same as `gpubake build-image`)."""
    sys.exit(_run(["build-image", *sys.argv[1:]]))

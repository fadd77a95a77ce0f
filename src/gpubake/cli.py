"""The `gpubake` command line: one typer app, each part registers its own commands.

Each part of the package (images, provisioning, smoke_tests, ...) owns a `cli.py`
with `register(app)`; heavy imports (torch, diffusers, boto3) happen inside the
command functions so that `gpubake --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from gpubake import __version__
from gpubake.console import console
from gpubake.errors import GpubakeError

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
        return _error_line(str(exc), exc.exit_code)
    except OSError as exc:  # the file system refused: read-only, full disk, not a directory
        return _error_line(_os_error_text(exc), 2)
    except RecursionError:  # input nested deeper than Python recurses (a spec, a JSON file)
        return _error_line(f"{_input_file(argv)}: input nested too deeply to read", 2)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        console.print("aborted")
        return 130
    except _CLICK_ERRORS as exc:  # usage errors: bad flag, bad value, missing argument
        exc.show()
        return exc.exit_code
    return 0


def _error_line(message: str, exit_code: int) -> int:
    """Print ONE `error: ...` line on stderr (URL credentials and known secrets redacted)."""
    from rich.markup import escape

    from gpubake.secrets import redact

    console.print(f"[bold red]error:[/] {escape(redact(' '.join(message.split())))}", markup=True, soft_wrap=True)
    return exit_code


def _os_error_text(exc: OSError) -> str:
    """`PATH: reason`, naming the user's path rather than an atomic write's temporary one."""
    import re

    def shown(name: object) -> str:
        text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
        # fsutil.atomic_path writes `.NAME.XXXXXXXX[.suffix].partial` beside NAME, fetch `.NAME.partial`
        match = re.fullmatch(r"(?P<dir>.*/)?\.(?P<name>[^/]+?)(?:\.[A-Za-z0-9_]{8}(?:\.[^/]*)?)?\.partial(?P<rest>/.*)?", text)
        return f"{match['dir'] or ''}{match['name']}{match['rest'] or ''}" if match else text

    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None and exc.filename2 is not None:
        return f"{shown(exc.filename2)}: {reason} (copying {shown(exc.filename)})"
    if exc.filename is not None:
        return f"{shown(exc.filename)}: {reason}"
    return reason


def _input_file(argv: list[str] | None) -> str:
    """The input file(s) a command was given: what a RecursionError can only have come from."""
    args = list(sys.argv[1:] if argv is None else argv)
    values = [a.split("=", 1)[1] if "=" in a else a for a in args if not a.startswith("-") or "=" in a]
    files = list(dict.fromkeys(v for v in values if os.path.isfile(v)))
    if len(files) == 1:
        return files[0]
    return f"one of {', '.join(files)}" if files else "input"


def main() -> None:
    """Entry point of the `gpubake` console script."""
    sys.exit(_run())


def build_image_main() -> None:
    """Entry point of the `build-image` console script (same as `gpubake build-image`)."""
    sys.exit(_run(["build-image", *sys.argv[1:]]))

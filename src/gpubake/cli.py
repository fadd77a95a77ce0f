"""The `gpubake` command line: one typer app; every command is registered here, in `COMMANDS`.

The command functions live in each part's `cli.py` (images, provisioning, smoke_tests,
...); heavy imports (torch, diffusers, boto3) happen inside them so that `gpubake --help`
stays fast. A command module that fails to import is a broken installation: the CLI
stops with that error instead of starting without the command.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import typer

from gpubake import __version__
from gpubake.console import console
from gpubake.errors import GpubakeError

if TYPE_CHECKING:
    from gpubake.provisioning.facts import ImageFacts

# Every command, in --help order: name -> "module:attribute" (a function, or a typer app
# for a group of subcommands). README's command table lists them (tests/test_cli_root.py).
COMMANDS: dict[str, str] = {
    "build-image": "gpubake.images.cli:build_image",
    "images": "gpubake.images.cli:images",
    "spec-schema": "gpubake.images.cli:spec_schema",
    "fetch": "gpubake.provisioning.cli:fetch_cmd",
    "make-tiny": "gpubake.provisioning.cli:make_tiny_cmd",
    "quantize": "gpubake.provisioning.cli:quantize_cmd",
    "import": "gpubake.provisioning.cli:import_cmd",
    "fidelity": "gpubake.provisioning.cli:fidelity_cmd",
    "selftest": "gpubake.smoke_tests.cli:selftest",
    "serve": "gpubake.provisioning.serving.cli:serve",
    "publish": "gpubake.images.marketplace.cli:publish_cmd",
    "launch": "gpubake.images.marketplace.cli:launch_cmd",
    "destroy": "gpubake.images.marketplace.cli:destroy_cmd",
    "remote": "gpubake.images.marketplace.cli:remote_app",
    "push-weights": "gpubake.images.marketplace.cli:push_weights_cmd",
}

_SETTINGS: dict[str, Any] = {"add_completion": False, "pretty_exceptions_enable": False}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gpubake {__version__}")
        raise typer.Exit()


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


def load_command(name: str) -> Any:
    """The function (or typer app) of command `name`; an import failure names the module."""
    module, _, attribute = COMMANDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise ImportError(f"gpubake CLI: command {name!r}: module {module} failed to import ({exc})") from exc


def build_app() -> typer.Typer:
    """The `gpubake` app with every command of `COMMANDS`."""
    root = typer.Typer(
        name="gpubake",
        help="Build GPU marketplace images (RunPod, Vast.ai) for NVFP4 Wan 2.2 video generation.",
        no_args_is_help=True,
        **_SETTINGS,
    )
    root.callback()(_root)
    for name in COMMANDS:
        command = load_command(name)
        if isinstance(command, typer.Typer):
            root.add_typer(command, name=name)
        else:
            root.command(name)(command)
    return root


app = build_app()


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


def _run(argv: list[str] | None = None, *, cli: typer.Typer | None = None) -> int:
    """Run `cli` (default: the gpubake app); user errors are one line and their exit status."""
    try:
        rc = (cli or app)(args=argv, standalone_mode=False)
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
    """Entry point of the `build-image` console script: `gpubake build-image` as a program of its own."""
    single = typer.Typer(**_SETTINGS)
    single.command()(load_command("build-image"))  # one command and no callback: typer runs it directly
    sys.exit(_run(sys.argv[1:], cli=single))

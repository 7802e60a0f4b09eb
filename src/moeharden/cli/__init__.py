"""The command-line shell: parse options, call one library function, render what comes back.

``app`` is the Typer application and :func:`main` the console-script entry point
(``moeharden = "moeharden.cli:main"``). The commands live in :mod:`moeharden.cli.audit_commands` and
:mod:`moeharden.cli.harden_commands`, their shared options in :mod:`moeharden.cli.options`, the one
error handler in :mod:`moeharden.cli.handler` (see :mod:`moeharden.errors` for the exit codes). No
tensor code lives here, and torch is imported only inside commands that need it, so that
``moeharden --help`` starts fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from moeharden import __version__
from moeharden import console as ui
from moeharden.cli import audit_commands, harden_commands
from moeharden.cli.handler import EXIT_INTERNAL, debug
from moeharden.errors import EXIT_INTERRUPTED

app = typer.Typer(
    name="moeharden",
    help="Audit and harden Mixture-of-Experts checkpoints against expert-pruning theft.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"moeharden {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout for every command.")] = False,
) -> None:
    """Audit and harden Mixture-of-Experts checkpoints against expert-pruning theft."""
    if json_out:
        ui.set_json_mode(True)


for _command in (audit_commands.scan, harden_commands.prune, harden_commands.entangle, harden_commands.keygen,
                 harden_commands.lock, audit_commands.verify, audit_commands.report, harden_commands.demo,
                 audit_commands.schema):
    app.command()(_command)


def main() -> None:
    """Console-script entry point."""
    if not debug():   # dependencies' deprecation chatter is not for the user (MOEHARDEN_DEBUG=1 shows it)
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except KeyboardInterrupt:  # raised outside a command body
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:   # outside the handler (option parsing, rendering): still one paragraph
        if debug():
            raise
        first = str(err).splitlines()[0][:300] if str(err) else ""
        ui.errors.print(f"Internal error (a bug: please report it): {type(err).__name__}: {first} "
                         "Hint: Re-run with MOEHARDEN_DEBUG=1 for the traceback and report it.",
                         markup=False, soft_wrap=True)
        sys.exit(EXIT_INTERNAL)
    finally:                   # under `accelerate launch`: leave the launch before the interpreter exits
        from moeharden.io.ranks import close, current

        if current().size > 1:
            close()

"""The `chanprune` Typer app: its root options (--debug, --version) and the command group that maps
exceptions to exit codes (failures.py) and feeds config-file settings to the subcommands
(configfiles.py).

Adding a subcommand: a module in this package that decorates a function with `@app.command`,
imported by `cli/__init__.py`. It takes the shared options of options.py (a group of them as one
object, `@shared_options`), calls one recipe (recipes/) and hands its result to its module in
report/. Errors are library exceptions (errors.py) that the group turns into one stderr line and
the documented exit code, so commands never print errors themselves. Heavy imports (torch and
everything built on it) happen inside the commands so that `chanprune --help` stays fast.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from .. import __version__
from ..errors import ChanpruneError
from .configfiles import (
    command_settings,
    config_argument,
    configurable_commands,
    default_map,
)
from .failures import DEBUG_ENV, DEBUG_KEY, fail, one_line, usage_error, warning_printer


class _ChanpruneGroup(TyperGroup):
    """Maps exceptions to one stderr line and the documented exit codes, and shows help texts as
    written.

    Done here rather than in `main()` so that every way of running the app (console script,
    `python -m chanprune_cli`, `typer.testing.CliRunner`) behaves the same.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in [self, *self.commands.values()]:
            _literal_help(command)
            _flags_without_placeholder(command)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        try:
            return super().parse_args(ctx, args)
        except TyperException as exc:  # the root's own options (`chanprune --bogus`)
            usage_error(ctx, exc)
            raise

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:  # type: ignore[override]
        """Also look up the subcommand's defaults in config files (see project/config.py): they become
        the subcommand context's `default_map`, which ranks below flags and above built-in defaults."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and name is not None and name in configurable_commands(self) and not ctx.resilient_parsing \
                and not any(a in ("--help", "-h") for a in rest):
            settings = command_settings(self, name, config_argument(rest))
            ctx.default_map = {name: default_map(cmd, settings)}
        return name, cmd, rest

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            with warnings.catch_warnings():  # restores the previous handler afterwards
                warnings.showwarning = warning_printer(warnings.showwarning)
                return super().invoke(ctx)
        except TyperException as exc:
            usage_error(ctx, exc)
            raise
        except (typer.Exit, typer.Abort, BrokenPipeError):
            raise  # exits and closed pipes keep Typer's own handling
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except ChanpruneError as exc:
            fail(ctx, f"error: {one_line(str(exc))}", exc.exit_code)
        except Exception as exc:  # noqa: BLE001  (a bug or an unforeseen failure: still one line, exit 1)
            fail(ctx, f"error: {type(exc).__name__}: {one_line(str(exc))} (re-run with --debug for the traceback)", 1)


def _literal_help(command: Any) -> None:
    """Help texts are plain text, but Typer renders them as rich markup, which swallows literal
    brackets ("[prune] table", "CxHxW[:K[:N]]" would lose words): escape them all, in one place.
    Only epilogs are markup (`options.examples` escapes what it puts in them)."""
    for holder in [command, *command.params]:
        for attribute in ("help", "short_help"):
            text = getattr(holder, attribute, None)
            if isinstance(text, str):
                setattr(holder, attribute, escape(text))


def _flags_without_placeholder(command: Any) -> None:
    """Flags take no value, so their help shows none (Typer would show `<bool>`): an empty metavar
    for every flag the help lists, --help and the completion flags added later included."""
    get_params = command.get_params

    def params(ctx: Any) -> Any:
        found = get_params(ctx)
        for param in found:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return found

    command.get_params = params


app = typer.Typer(
    name="chanprune",
    cls=_ChanpruneGroup,
    help="Structured channel pruning for trained CNNs: checkpoint in, smaller verified checkpoint out.",
    epilog="Exit codes: 0 success · 1 runtime failure · 2 bad usage or input · 3 a gate was not met · 130 interrupted (Ctrl-C) · 143 terminated (SIGTERM; finetune saves its state first).\n\n"
    "Run [b]chanprune COMMAND --help[/b] for a command's options and examples.",
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # errors are one line (or a plain traceback with --debug)
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"chanprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", envvar=DEBUG_ENV, help="Show full tracebacks on errors.", show_envvar=True)] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """Structured channel pruning for trained CNNs: checkpoint in, smaller verified checkpoint out."""
    if debug:
        ctx.meta[DEBUG_KEY] = True

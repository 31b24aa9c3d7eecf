"""Shared pieces of the `chanprune` command line: the app, error mapping, options, common steps.

Adding a subcommand: a module in this package that decorates a function with `@app.command`,
imported by `cli/__init__.py`. Reuse the `*Opt` option types below (they carry the names, help text and
help panels of DESIGN §8), load with `load_model`, build loaders with `make_eval_loader`, render
through report.py. Errors are library exceptions (errors.py); `_ChanpruneGroup` turns them into
one stderr line and the documented exit code, so commands never print errors themselves.

Heavy imports (torch and everything built on it) happen inside the commands so that
`chanprune --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from .. import __version__
from ..errors import ChanpruneError, UserError

try:  # typer >= 0.26 vendors click; older releases use the click package
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.core import ParameterSource
    from click.globals import get_current_context

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ..checkpoint import LoadedCheckpoint

_DEBUG_KEY = "chanprune.debug"  # in ctx.meta, which every nested context shares
_DEBUG_ENV = "CHANPRUNE_DEBUG"

# Help panels group the options of long commands the same way everywhere.
MODEL_PANEL = "Model"
DATA_PANEL = "Data"
OUTPUT_PANEL = "Output"


# --------------------------------------------------------------------------------------------
# error handling


def _debug_enabled(ctx: typer.Context | None) -> bool:
    if os.environ.get(_DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return bool(ctx is not None and ctx.meta.get(_DEBUG_KEY))


def _one_line(text: str) -> str:
    # The contract is one line on stderr; library messages should already be one line.
    return " ".join(text.split())


def _fail(ctx: typer.Context, message: str, code: int) -> NoReturn:
    if _debug_enabled(ctx):
        traceback.print_exc(file=sys.stderr)
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _warning_printer(previous: Callable[..., None]) -> Callable[..., None]:
    """Show chanprune's own warnings (e.g. skipped unreadable images) as one `warning:` line."""

    shown: set[str] = set()  # a data set opened twice in one run (calibration, recalibration) warns once

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if category.__module__.startswith("chanprune_cli"):
            text = _one_line(str(message))
            if text not in shown:
                shown.add(text)
                print(f"warning: {text}", file=sys.stderr)
        else:  # third-party warnings keep Python's format: their source location matters
            previous(message, category, filename, lineno, file, line)

    return show


class _ChanpruneGroup(TyperGroup):
    """Maps exceptions to one stderr line and the exit codes of DESIGN §8.

    Done here rather than in `main()` so that every way of running the app (console script,
    `python -m chanprune_cli`, `typer.testing.CliRunner`) behaves the same.
    """

    @staticmethod
    def _usage_error(ctx: typer.Context, exc: TyperException) -> None:
        """Usage errors (bad option values, unknown options; exit 2) follow the one-line contract
        too, instead of a usage banner plus a boxed message. Help requests keep Typer's output."""
        if getattr(exc, "exit_code", None) != 2 or type(exc).__name__ == "NoArgsIsHelpError":
            return
        where = getattr(getattr(exc, "ctx", None), "command_path", None) or ctx.command_path
        _fail(ctx, f"error: {_one_line(exc.format_message())} (see '{where} --help')", 2)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        try:
            return super().parse_args(ctx, args)
        except TyperException as exc:  # the root's own options (`chanprune --bogus`)
            self._usage_error(ctx, exc)
            raise

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:  # type: ignore[override]
        """Also look up the subcommand's defaults in config files (see config.py): they become the
        subcommand context's `default_map`, which ranks below flags and above built-in defaults."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and name is not None and name in configurable_commands(self) and not ctx.resilient_parsing \
                and not any(a in ("--help", "-h") for a in rest):
            settings = command_settings(self, name, _config_argument(rest))
            ctx.default_map = {name: default_map(cmd, settings)}
        return name, cmd, rest

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            with warnings.catch_warnings():  # restores the previous handler afterwards
                warnings.showwarning = _warning_printer(warnings.showwarning)
                return super().invoke(ctx)
        except TyperException as exc:
            self._usage_error(ctx, exc)
            raise
        except (typer.Exit, typer.Abort, BrokenPipeError):
            raise  # exits and closed pipes keep Typer's own handling
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except ChanpruneError as exc:
            _fail(ctx, f"error: {_one_line(str(exc))}", exc.exit_code)
        except Exception as exc:  # a bug or an unforeseen failure: still one line, exit 1
            _fail(ctx, f"error: {type(exc).__name__}: {_one_line(str(exc))} (re-run with --debug for the traceback)", 1)


# --------------------------------------------------------------------------------------------
# config files (config.py): option defaults for every command that takes `--config`

# Positional arguments have no option name; these are their config keys.
_ARGUMENT_KEYS = {"ckpt": "checkpoint"}
# Tables that configure something other than one command's options.
EXTRA_TABLES: dict[str, frozenset[str]] = {"run": frozenset({"dir", "stages"})}


def option_keys(command: Any) -> dict[str, Any]:
    """Config key → Click parameter for every option and argument of `command` (not --config/--debug)."""
    from ..project.config import normalise_key

    keys: dict[str, Any] = {}
    for param in command.params:
        if param.name in (None, "config", "debug"):
            continue
        if param.param_type_name == "argument":
            keys[_ARGUMENT_KEYS.get(param.name, param.name)] = param
        else:
            longs = [o for o in param.opts if o.startswith("--")]
            if longs:
                keys[normalise_key(longs[0][2:])] = param
    return keys


def configurable_commands(group: Any) -> dict[str, Any]:
    """Commands that read config files: those with a --config option other than `run` itself."""
    return {name: cmd for name, cmd in group.commands.items()
            if name != "run" and any(p.name == "config" for p in cmd.params)}


def command_keys(group: Any) -> dict[str, set[str]]:
    keys = {name: set(option_keys(cmd)) for name, cmd in configurable_commands(group).items()}
    keys.update({name: set(extra) for name, extra in EXTRA_TABLES.items()})
    return keys


def config_files(group: Any, explicit: str | None) -> list[Any]:
    """The discovered project config, then the --config file (ascending precedence)."""
    from ..project.config import discover, load_config

    tables = list(command_keys(group))
    files = [f for f in (discover(os.getcwd(), tables),) if f is not None]
    if explicit is not None:
        files.append(load_config(explicit, tables))
    return files


def command_settings(group: Any, name: str, explicit: str | None) -> dict[str, Any]:
    """Config key → config.Setting for command `name`."""
    from ..project.config import resolve

    return resolve(name, config_files(group, explicit), command_keys(group))


def default_map(command: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Click's default_map (parameter name → value as the option expects it) from settings."""
    from ..project.config import option_text

    params = option_keys(command)
    result: dict[str, Any] = {}
    for key, setting in settings.items():
        param = params[key]
        many = param.multiple or param.nargs == -1
        value = setting.value
        result[param.name] = (value if isinstance(value, list) else [value]) if many else option_text(value)
    return result


def prefer_flags(**values: Any) -> dict[str, Any]:
    """For mutually exclusive options: when some are given as flags, drop the ones that came from a
    config file (a flag `--ratio` overrides `target_flops` in chanprune.toml). Keys: parameter names."""
    ctx = get_current_context()
    flagged = {k for k, v in values.items() if v is not None and ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if not flagged:
        return values
    return {k: (v if k in flagged or ctx.get_parameter_source(k) != ParameterSource.DEFAULT_MAP else None)
            for k, v in values.items()}


def _config_argument(args: list[str]) -> str | None:
    """The value of --config in a subcommand's raw arguments (read before Click parses them)."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a file: --config chanprune.toml")
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def invoke_command(ctx: typer.Context, name: str, args: list[str], settings: dict[str, Any]) -> Any:
    """Run subcommand `name` with `args` as if typed after `chanprune`, defaults from config `settings`
    (key → config.Setting, as `config.resolve` gives them)."""
    root = ctx.find_root()
    cmd = root.command.get_command(root, name)
    with cmd.make_context(name, list(args), parent=root, default_map=default_map(cmd, settings)) as sub:
        return cmd.invoke(sub)


# --------------------------------------------------------------------------------------------
# help text helpers


def examples(*pairs: tuple[str, str]) -> str:
    """An 'Examples' epilog: (what it does, command line) pairs."""
    lines = [f"  [dim]# {escape(what)}[/dim]\n  $ {escape(cmd)}" for what, cmd in pairs]
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(lines)


# --------------------------------------------------------------------------------------------
# shared options (DESIGN §8: the same names and meaning in every command)


def _debug_callback(ctx: typer.Context, value: bool) -> bool:
    if value:
        ctx.meta[_DEBUG_KEY] = True
    return value


CkptArg = Annotated[Optional[str], typer.Argument(metavar="CKPT", help="Checkpoint file (state dict, safetensors, chanprune file, or a pickled module with --trust-pickle).", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", metavar="ARCH", help="Architecture: a built-in name (see --list-archs), [b]torchvision:NAME[/b], or [b]package.module:factory[/b]. Not needed for chanprune files.", rich_help_panel=MODEL_PANEL, show_default=False)]
ArchKwargsOpt = Annotated[Optional[str], typer.Option("--arch-kwargs", metavar="JSON", help="Factory keyword arguments as a JSON object, e.g. '{\"num_classes\": 10}'.", rich_help_panel=MODEL_PANEL, show_default=False)]
InputShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W", help="Model input shape (default: recorded in the checkpoint or known for the architecture). Data is resized to it.", rich_help_panel=MODEL_PANEL, show_default=False)]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled objects. Pickles run code: only for files you trust.", rich_help_panel=MODEL_PANEL)]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="Where to run the model (auto: CUDA when available).", rich_help_panel=MODEL_PANEL)]
DataOpt = Annotated[Optional[str], typer.Option("--data", metavar="DATA", help="Dataset: ImageFolder directory, .tar/.tar.gz of one, MNIST IDX directory, [b]synthetic:CxHxW[:K[:N]][/b], or [b]digits:train[/b]/[b]digits:test[/b].", rich_help_panel=DATA_PANEL, show_default=False)]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", metavar="M[,M,M]", help="Per-channel normalisation mean; one value applies to every channel (default: ImageNet statistics for RGB images, the data set's own for digits and MNIST).", rich_help_panel=DATA_PANEL, show_default=False)]
StdOpt = Annotated[Optional[str], typer.Option("--std", metavar="S[,S,S]", help="Per-channel normalisation std (default: as --mean).", rich_help_panel=DATA_PANEL, show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size for data passes.", rich_help_panel=DATA_PANEL)]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data loading worker processes (0: load in the main process).", rich_help_panel=DATA_PANEL)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (sampling, shuffling), recorded in JSON reports.", rich_help_panel=DATA_PANEL)]
CalibBatchesOpt = Annotated[Optional[int], typer.Option("--calib-batches", min=1, metavar="N", help="Use at most N batches of --data, drawn at random with --seed (default: all).", rich_help_panel=DATA_PANEL, show_default=False)]
JsonOpt = Annotated[Optional[str], typer.Option("--json", metavar="PATH", help="Also write the report as JSON to PATH ('-': stdout, the table then goes to stderr).", rich_help_panel=OUTPUT_PANEL, show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.", rich_help_panel=OUTPUT_PANEL)]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", metavar="FILE", help="Read option defaults from this TOML file (keys named like the options; a [COMMAND] table for command-specific ones). Flags override it; it overrides a discovered chanprune.toml.", rich_help_panel=OUTPUT_PANEL, show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors (also: CHANPRUNE_DEBUG=1).", callback=_debug_callback, is_eager=True, rich_help_panel=OUTPUT_PANEL)]


# --------------------------------------------------------------------------------------------
# shared steps


def check_json_out(path: str | None, force: bool) -> None:
    """Fail before any long computation when the JSON report could not be written."""
    if path is not None and path != "-":
        from ..support.fsutil import check_output

        check_output(path, force)


def check_distinct_outputs(*options: tuple[str, str | None]) -> None:
    """Two output options naming one file would silently overwrite one result with the other."""
    seen: dict[str, str] = {}
    for option, path in options:
        if path is None or path == "-":
            continue
        key = os.path.normcase(os.path.realpath(path))
        if key in seen:
            raise UserError(f"{seen[key]} and {option} both name {path}; give each output its own file")
        seen[key] = option


def refuse_nonfinite(model: Any, action: str) -> None:
    """UserError naming the NaN/Inf tensors: scores and pruning of a broken model are meaningless."""
    from ..checkpoint import nonfinite_tensors

    bad = nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise UserError(f"the model has NaN/Inf weights in {shown}; refusing to {action} a broken model "
                        "(use a checkpoint from before training diverged)")


def load_model(ckpt: str, arch: str | None, arch_kwargs: str | None, trust_pickle: bool) -> LoadedCheckpoint:
    from ..checkpoint import load_checkpoint

    return load_checkpoint(ckpt, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)


def resolve_input_shape(explicit: tuple[int, int, int] | None, loaded: LoadedCheckpoint) -> tuple[int, int, int]:
    """--input-shape, else the shape recorded in the checkpoint, else the architecture's default."""
    if explicit is not None:
        return explicit
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape)  # type: ignore[return-value]
    from ..models import default_input_shape

    shape = default_input_shape(loaded.arch)
    if shape is None:
        raise UserError("cannot tell this model's input shape; pass --input-shape C,H,W (e.g. --input-shape 3,224,224)")
    return tuple(shape)  # type: ignore[return-value]


def make_eval_loader(
    source: str,
    *,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    batch_size: int,
    workers: int,
    seed: int,
    max_batches: int | None = None,
) -> DataLoader:
    """An evaluation loader; with `max_batches` it draws that many random batches (seeded)."""
    from ..data import make_loader

    # mean/std None: the source's own statistics (ImageNet for RGB images, see data.open_dataset).
    return make_loader(source, batch_size=batch_size, workers=workers, seed=seed, shuffle=max_batches is not None,
                       max_batches=max_batches, train=False, input_shape=input_shape, mean=mean, std=std)


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# the app


app = typer.Typer(
    name="chanprune",
    cls=_ChanpruneGroup,
    help="Structured channel pruning for trained CNNs: checkpoint in, smaller verified checkpoint out.",
    epilog="Exit codes: 0 success · 1 runtime failure · 2 bad usage or input · 3 a gate was not met · 130 interrupted.\n\n"
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
    debug: Annotated[bool, typer.Option("--debug", envvar=_DEBUG_ENV, help="Show full tracebacks on errors.", show_envvar=True)] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """Structured channel pruning for trained CNNs: checkpoint in, smaller verified checkpoint out."""
    if debug:
        ctx.meta[_DEBUG_KEY] = True


def print_archs() -> None:
    from rich.table import Table

    from ..models import builtin_archs
    from ..report import make_console

    table = Table(title="built-in architectures (--arch NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, description in builtin_archs().items():
        table.add_row(name, description)
    console = make_console()
    console.print(table)
    console.print("Also: [b]torchvision:NAME[/b] (any torchvision classification model) and "
                  "[b]package.module:factory[/b] (your own model, importable from the working directory).")


CriterionOpt = Annotated[Optional[str], typer.Option("--criterion", metavar="NAME", help="Channel-importance criterion (see [b]chanprune score --help[/b] for the list).", show_default=False)]
CriterionOptionOpt = Annotated[Optional[list[str]], typer.Option(
    "--criterion-opt", metavar="KEY=VALUE",
    help="A criterion option (repeatable), e.g. [b]--criterion-opt sigma=0.5[/b]; typed like its default. "
         "[b]chanprune score --list-criteria[/b] lists each criterion's options and defaults.", show_default=False)]
OutOpt = Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Output file (safetensors).", rich_help_panel=OUTPUT_PANEL, show_default=False)]


def validate_common(input_shape: str | None, mean: str | None, std: str | None, json_out: str | None,
                     force: bool) -> tuple[tuple[int, int, int] | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """Parse the shared options and check the JSON destination before any slow step."""
    from ..data import parse_floats, parse_shape

    shape = parse_shape(input_shape) if input_shape is not None else None
    mean_t = parse_floats(mean, name="mean") if mean is not None else None
    std_t = parse_floats(std, name="std") if std is not None else None
    check_json_out(json_out, force)
    return shape, mean_t, std_t


def calibration_loader(data: str | None, shape: tuple[int, int, int], mean: tuple[float, ...] | None,
                        std: tuple[float, ...] | None, batch_size: int, workers: int, seed: int,
                        calib_batches: int | None) -> DataLoader | None:
    return None if data is None else make_eval_loader(data, input_shape=shape, mean=mean, std=std, batch_size=batch_size,
                                                  workers=workers, seed=seed, max_batches=calib_batches)

"""The `chanprune` command line (DESIGN §8): parse options, call the library, render.

Adding a subcommand: reuse the `*Opt` option types below (they carry the names, help text and
help panels of DESIGN §8), load with `_load_model`, build loaders with `_make_loader`, render
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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from . import __version__
from .errors import ChanpruneError, UserError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from .checkpoint import LoadedCheckpoint

_DEBUG_KEY = "chanprune.debug"  # in ctx.meta, which every nested context shares
_DEBUG_ENV = "CHANPRUNE_DEBUG"

# Help panels group the options of long commands the same way everywhere.
_MODEL = "Model"
_DATA = "Data"
_OUTPUT = "Output"


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

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if category.__module__.startswith("chanprune_cli"):
            print(f"warning: {_one_line(str(message))}", file=sys.stderr)
        else:  # third-party warnings keep Python's format: their source location matters
            previous(message, category, filename, lineno, file, line)

    return show


class _ChanpruneGroup(TyperGroup):
    """Maps exceptions to one stderr line and the exit codes of DESIGN §8.

    Done here rather than in `main()` so that every way of running the app (console script,
    `python -m chanprune_cli`, `typer.testing.CliRunner`) behaves the same.
    """

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            with warnings.catch_warnings():  # restores the previous handler afterwards
                warnings.showwarning = _warning_printer(warnings.showwarning)
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException, BrokenPipeError):
            raise  # exits, usage errors (exit 2) and closed pipes keep Typer's own handling
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except ChanpruneError as exc:
            _fail(ctx, f"error: {_one_line(str(exc))}", exc.exit_code)
        except Exception as exc:  # a bug or an unforeseen failure: still one line, exit 1
            _fail(ctx, f"error: {type(exc).__name__}: {_one_line(str(exc))} (re-run with --debug for the traceback)", 1)


# --------------------------------------------------------------------------------------------
# help text helpers


def _examples(*pairs: tuple[str, str]) -> str:
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
ArchOpt = Annotated[Optional[str], typer.Option("--arch", metavar="ARCH", help="Architecture: a built-in name (see --list-archs), [b]torchvision:NAME[/b], or [b]package.module:factory[/b]. Not needed for chanprune files.", rich_help_panel=_MODEL, show_default=False)]
ArchKwargsOpt = Annotated[Optional[str], typer.Option("--arch-kwargs", metavar="JSON", help="Factory keyword arguments as a JSON object, e.g. '{\"num_classes\": 10}'.", rich_help_panel=_MODEL, show_default=False)]
InputShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W", help="Model input shape (default: recorded in the checkpoint or known for the architecture). Data is resized to it.", rich_help_panel=_MODEL, show_default=False)]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled objects. Pickles run code: only for files you trust.", rich_help_panel=_MODEL)]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="Where to run the model (auto: CUDA when available).", rich_help_panel=_MODEL)]
DataOpt = Annotated[Optional[str], typer.Option("--data", metavar="DATA", help="Dataset: ImageFolder directory, .tar/.tar.gz of one, MNIST IDX directory, [b]synthetic:CxHxW[:K[:N]][/b], or [b]digits:train[/b]/[b]digits:test[/b].", rich_help_panel=_DATA, show_default=False)]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", metavar="M[,M,M]", help="Per-channel normalisation mean; one value applies to every channel (default: ImageNet statistics for RGB images, the data set's own for digits and MNIST).", rich_help_panel=_DATA, show_default=False)]
StdOpt = Annotated[Optional[str], typer.Option("--std", metavar="S[,S,S]", help="Per-channel normalisation std (default: as --mean).", rich_help_panel=_DATA, show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size for data passes.", rich_help_panel=_DATA)]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data loading worker processes (0: load in the main process).", rich_help_panel=_DATA)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (sampling, shuffling), recorded in JSON reports.", rich_help_panel=_DATA)]
CalibBatchesOpt = Annotated[Optional[int], typer.Option("--calib-batches", min=1, metavar="N", help="Use at most N batches of --data, drawn at random with --seed (default: all).", rich_help_panel=_DATA, show_default=False)]
JsonOpt = Annotated[Optional[str], typer.Option("--json", metavar="PATH", help="Also write the report as JSON to PATH ('-': stdout, the table then goes to stderr).", rich_help_panel=_OUTPUT, show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.", rich_help_panel=_OUTPUT)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors (also: CHANPRUNE_DEBUG=1).", callback=_debug_callback, is_eager=True, rich_help_panel=_OUTPUT)]


# --------------------------------------------------------------------------------------------
# shared steps


def _check_json_out(path: str | None, force: bool) -> None:
    """Fail before any long computation when the JSON report could not be written."""
    if path is not None and path != "-":
        from .fsutil import check_output

        check_output(path, force)


def _load_model(ckpt: str, arch: str | None, arch_kwargs: str | None, trust_pickle: bool) -> LoadedCheckpoint:
    from .checkpoint import load_checkpoint

    return load_checkpoint(ckpt, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)


def _resolve_input_shape(explicit: tuple[int, int, int] | None, loaded: LoadedCheckpoint) -> tuple[int, int, int]:
    """--input-shape, else the shape recorded in the checkpoint, else the architecture's default."""
    if explicit is not None:
        return explicit
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape)  # type: ignore[return-value]
    from .models import default_input_shape

    shape = default_input_shape(loaded.arch)
    if shape is None:
        raise UserError("cannot tell this model's input shape; pass --input-shape C,H,W (e.g. --input-shape 3,224,224)")
    return tuple(shape)  # type: ignore[return-value]


def _make_loader(
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
    from .data import make_loader

    # mean/std None: the source's own statistics (ImageNet for RGB images, see data.open_dataset).
    return make_loader(source, batch_size=batch_size, workers=workers, seed=seed, shuffle=max_batches is not None,
                       max_batches=max_batches, train=False, input_shape=input_shape, mean=mean, std=std)


def _seed_everything(seed: int) -> None:
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
    add_completion=False,
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


def _print_archs() -> None:
    from rich.table import Table

    from .models import builtin_archs
    from .report import make_console

    table = Table(title="built-in architectures (--arch NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, description in builtin_archs().items():
        table.add_row(name, description)
    console = make_console()
    console.print(table)
    console.print("Also: [b]torchvision:NAME[/b] (any torchvision classification model) and "
                  "[b]package.module:factory[/b] (your own model, importable from the working directory).")


@app.command(
    epilog=_examples(
        ("layers, params, MACs and accuracy of a CIFAR ResNet-56 state dict",
         "chanprune analyze resnet56.th --arch cifar_resnet56 --data cifar10-test.tar.gz --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"),
        ("a torchvision model with 10 classes, report as JSON",
         "chanprune analyze model.pt --arch torchvision:resnet18 --arch-kwargs '{\"num_classes\": 10}' --input-shape 3,224,224 --json report.json"),
        ("quick accuracy estimate on 5 random batches",
         "chanprune analyze model.pt --arch cifar_resnet20 --data test/ --calib-batches 5 --batch-size 100"),
        ("the built-in architectures", "chanprune analyze --list-archs"),
    ),
)
def analyze(
    ckpt: CkptArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    calib_batches: CalibBatchesOpt = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List the built-in architectures and exit.", rich_help_panel=_MODEL)] = False,
    debug: DebugOpt = False,
) -> None:
    """Show a model's layers, parameters, MACs, size and (with --data) top-1/top-5 accuracy."""
    if list_archs:
        _print_archs()
        return
    if ckpt is None:
        raise typer.BadParameter("give a checkpoint path (or --list-archs)", param_hint="'CKPT'")

    # Validate every option before the slow steps (loading, tracing, evaluating).
    from .data import parse_floats, parse_shape

    shape = parse_shape(input_shape) if input_shape is not None else None
    mean_t = parse_floats(mean, name="mean") if mean is not None else None
    std_t = parse_floats(std, name="std") if std is not None else None
    _check_json_out(json_out, force)
    dev = None
    if data is not None:
        from .device import resolve_device

        dev = resolve_device(device)
    _seed_everything(seed)

    from . import measure
    from .report import AnalyzeReport, analyze_document, layer_rows, make_console, model_size_bytes, render_analyze, write_json

    loaded = _load_model(ckpt, arch, arch_kwargs, trust_pickle)
    shape = _resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    macs = measure.count_macs(model, shape)
    rows = layer_rows(model, measure.per_module_macs(model, shape))
    from .graph import build_graph
    from .report import group_rows

    groups = group_rows(build_graph(model, shape))

    accuracy: dict[str, Any] | None = None
    if data is not None:
        loader = _make_loader(data, input_shape=shape, mean=mean_t, std=std_t, batch_size=batch_size,
                              workers=workers, seed=seed, max_batches=calib_batches)
        result = measure.evaluate(model, loader, dev, max_batches=calib_batches, progress=True)
        accuracy = {
            "top1": float(result["top1"]),
            "top5": float(result["top5"]),
            "images": int(result["images"]),
            "data": data,
            "max_batches": calib_batches,
        }

    report = AnalyzeReport(
        checkpoint=ckpt,
        source_format=loaded.source_format,
        arch=loaded.arch,
        input_shape=shape,
        params=measure.count_params(model),
        macs=macs,
        size_bytes=model_size_bytes(model),
        layers=rows,
        seed=seed,
        accuracy=accuracy,
        groups=groups,
    )
    # With `--json -` stdout carries only the JSON document, so the table goes to stderr.
    render_analyze(report, make_console(stderr=json_out == "-"))
    if json_out is not None:
        write_json(analyze_document(report), json_out)


CriterionOpt = Annotated[Optional[str], typer.Option("--criterion", metavar="NAME", help="Channel-importance criterion (see [b]chanprune score --help[/b] for the list).", show_default=False)]
OutOpt = Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Output file (safetensors).", rich_help_panel=_OUTPUT, show_default=False)]


def _validate_common(input_shape: str | None, mean: str | None, std: str | None, json_out: str | None,
                     force: bool) -> tuple[tuple[int, int, int] | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """Parse the shared options and check the JSON destination before any slow step."""
    from .data import parse_floats, parse_shape

    shape = parse_shape(input_shape) if input_shape is not None else None
    mean_t = parse_floats(mean, name="mean") if mean is not None else None
    std_t = parse_floats(std, name="std") if std is not None else None
    _check_json_out(json_out, force)
    return shape, mean_t, std_t


def _calibration_loader(data: str | None, shape: tuple[int, int, int], mean: tuple[float, ...] | None,
                        std: tuple[float, ...] | None, batch_size: int, workers: int, seed: int,
                        calib_batches: int | None) -> DataLoader | None:
    return None if data is None else _make_loader(data, input_shape=shape, mean=mean, std=std, batch_size=batch_size,
                                                  workers=workers, seed=seed, max_batches=calib_batches)


@app.command(
    epilog=_examples(
        ("remove half of every layer's channels by L1 norm, verified, as a chanprune file",
         "chanprune prune resnet56.th --arch cifar_resnet56 --criterion l1 --ratio 0.5 --out r56-half.safetensors"),
        ("remove 50 % of the MACs with one global ranking, keeping widths multiples of 8",
         "chanprune prune model.pt --arch torchvision:resnet50 --criterion fpgm --target-flops 0.5 --round-to 8 --out r50.safetensors"),
        ("prune with scores made earlier by `chanprune score`, report as JSON",
         "chanprune prune resnet56.th --arch cifar_resnet56 --scores r56.taylor.safetensors --target-flops 0.5 --out p.safetensors --json p.json"),
        ("keep the classifier head and the stem untouched",
         "chanprune prune model.pt --arch torchvision:mobilenet_v2 --ratio 0.3 --ignore 'features.0.*' --ignore classifier.1 --out m.safetensors"),
    ),
)
def prune(
    ckpt: CkptArg = None,
    criterion: CriterionOpt = None,
    scores_path: Annotated[Optional[str], typer.Option("--scores", metavar="S", help="Scores from [b]chanprune score[/b] (instead of --criterion).", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", metavar="R", help="Remove this fraction of the channels of every prunable group (0 < R < 1).", show_default=False)] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", metavar="F", help="Remove this fraction of the MACs by one global ranking (0 < F < 1).", show_default=False)] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", metavar="GLOB", help="Never remove channels produced by modules matching GLOB (repeatable).", show_default=False)] = None,
    min_keep: Annotated[float, typer.Option("--min-keep", metavar="X", help="Every layer keeps at least X of its channels: a fraction (<1) or a count.")] = 0.1,
    round_to: Annotated[int, typer.Option("--round-to", metavar="N", min=1, help="Kept widths are multiples of N (fast kernels like multiples of 8).")] = 1,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the equivalence check of pruned vs masked original.")] = False,
    out: OutOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    calib_batches: CalibBatchesOpt = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove channels physically, prove the result equals the masked original, save it."""
    if ckpt is None:
        raise UserError("give a checkpoint to prune: chanprune prune CKPT --ratio 0.5 --out pruned.safetensors")
    if out is None:
        raise UserError("give an output file: --out pruned.safetensors")
    if criterion is not None and scores_path is not None:
        raise UserError("give either --criterion or --scores, not both")
    if (ratio is None) == (target_flops is None):
        raise UserError("give exactly one of --ratio (fraction of channels) or --target-flops (fraction of MACs)")
    for name, value in (("--ratio", ratio), ("--target-flops", target_flops)):
        if value is not None and not 0 < value < 1:
            raise UserError(f"{name} must be between 0 and 1 (exclusive), got {value:g}")
    criterion_name = criterion or ("l1" if scores_path is None else None)
    shape, mean_t, std_t = _validate_common(input_shape, mean, std, json_out, force)
    from .allocate import parse_min_keep
    from .criteria import check_requirements, get_criterion
    from .fsutil import check_output

    parse_min_keep(min_keep)
    check_output(out, force)
    if criterion_name is not None:
        check_requirements(get_criterion(criterion_name), data is not None)
    _seed_everything(seed)

    from . import pruning
    from .checkpoint import save_chanprune, tool_version
    from .device import resolve_device
    from .graph import build_graph, match_ignored
    from .report import PruneReport, group_rows, make_console, prune_document, render_prune, write_json
    from .scoring import compute_scores, load_scores

    loaded = _load_model(ckpt, arch, arch_kwargs, trust_pickle)
    if loaded.arch is None:
        raise UserError("this pickled model has no architecture to rebuild it from; pass --arch as well")
    shape = _resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    console = make_console(stderr=json_out == "-")
    graph = build_graph(model, shape, ignore=ignore or ())
    for pattern in match_ignored((n for n, _ in model.named_modules()), ignore or ()):
        typer.echo(f"warning: --ignore {pattern!r} matches no module", err=True)
    if scores_path is not None:
        scores, info = load_scores(scores_path, graph, model)
        criterion_name = str(info.get("criterion"))
    else:
        assert criterion_name is not None
        loader = _calibration_loader(data, shape, mean_t, std_t, batch_size, workers, seed, calib_batches)
        scores = compute_scores(model, graph, criterion_name, loader, resolve_device(device), seed=seed)
    outcome = pruning.prune(model, graph, scores, shape, criterion=criterion_name, ratio=ratio,
                            target_flops=target_flops, min_keep=min_keep, round_to=round_to, check=not no_verify)
    verify = None if outcome.verify is None else {
        "max_abs_diff": outcome.verify.max_abs_diff, "tolerance": outcome.verify.tolerance, "passed": outcome.verify.passed}
    history_entry = {"command": "prune", "criterion": criterion_name, "requested": outcome.allocation.requested,
                     "data": data, "seed": seed, "before": outcome.before, "after": outcome.after,
                     "verify": verify, "tool_version": tool_version()}
    save_chanprune(out, outcome.model, loaded.arch, input_shape=shape, history=[*loaded.history, history_entry],
                   plans=[*loaded.plans, outcome.plan_record], meta=loaded.meta, force=force)
    blocked = [{"name": g["name"], "channels": g["channels"], "reason": g["reason"]} for g in group_rows(graph) if not g["prunable"]]
    report = PruneReport(ckpt, out, criterion_name, outcome.allocation.requested, outcome.before, outcome.after,
                         outcome.layers, verify, blocked, seed=seed)
    render_prune(report, console)
    if json_out is not None:
        write_json(prune_document(report), json_out)


@app.command(
    epilog=_examples(
        ("second-order sensitivity on 20 calibration batches",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion sensitivity --data train.tar.gz --calib-batches 20 --out r56.sens.safetensors"),
        ("a weight-only criterion needs no data",
         "chanprune score model.pt --arch torchvision:resnet18 --criterion fpgm --out r18.fpgm.safetensors"),
        ("then prune with those scores", "chanprune prune resnet56.th --arch cifar_resnet56 --scores r56.sens.safetensors --target-flops 0.5 --out p.safetensors"),
    ),
)
def score(
    ckpt: CkptArg = None,
    criterion: CriterionOpt = None,
    out: OutOpt = None,
    ratio: Annotated[float, typer.Option("--ratio", metavar="R", help="For the summary: how many channels of each layer this ratio would remove.")] = 0.5,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    calib_batches: CalibBatchesOpt = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score every prunable channel with a criterion and save the scores for `prune --scores`."""
    if ckpt is None or criterion is None or out is None:
        raise UserError("usage: chanprune score CKPT --criterion NAME --out SCORES.safetensors (see --help)")
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be between 0 and 1 (exclusive), got {ratio:g}")
    shape, mean_t, std_t = _validate_common(input_shape, mean, std, json_out, force)
    from .criteria import check_requirements, get_criterion
    from .fsutil import check_output

    check_requirements(get_criterion(criterion), data is not None)
    check_output(out, force)
    _seed_everything(seed)

    from .allocate import allocate
    from .device import resolve_device
    from .graph import build_graph
    from .report import make_console, render_scores, score_document, write_json
    from .scoring import compute_scores, save_scores

    loaded = _load_model(ckpt, arch, arch_kwargs, trust_pickle)
    shape = _resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    graph = build_graph(model, shape)
    loader = _calibration_loader(data, shape, mean_t, std_t, batch_size, workers, seed, calib_batches)
    scores = compute_scores(model, graph, criterion, loader, resolve_device(device), seed=seed)
    data_record = None if data is None else {"source": data, "batches": calib_batches, "batch_size": batch_size, "seed": seed}
    save_scores(out, scores, graph, model, criterion=criterion, options={}, data=data_record, force=force)
    removal = allocate(graph, scores, ratio=ratio).plan
    rows = [{"group": g.name, "channels": g.channels, "min": float(scores[g.id].min()), "median": float(scores[g.id].median()),
             "max": float(scores[g.id].max()), "removed_at_ratio": len(removal.get(g.id, []))} for g in graph.prunable_groups()]
    console = make_console(stderr=json_out == "-")
    render_scores(criterion, out, ratio, rows, console)
    if json_out is not None:
        write_json(score_document(ckpt, out, criterion, ratio, rows, data_record, seed), json_out)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (DESIGN §8)."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="chanprune")
    except SystemExit as exc:  # Typer's standalone mode always exits; turn it into a return value
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

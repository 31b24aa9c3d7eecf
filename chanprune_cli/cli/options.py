"""The options several commands share, declared once: the same names, help text and help panel
everywhere. Options that only one command has (or whose help differs per command) live with it.

Groups of them reach a command as one object each: a parameter `model: ModelOptions = MODEL` of a
`@shared_options` command stands for the model options (`MODEL`) in the signature Typer reads, and
receives the `ModelOptions` built from them; likewise `DATA` (`DataOptions`) and `OUTPUTS`
(`Outputs`).

Also `examples()`, the "Examples" epilog of every command's help.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
from rich.markup import escape

from .configfiles import get_current_context
from .failures import debug_callback

if TYPE_CHECKING:  # the objects of the groups below, imported when built: they import torch
    from ..recipes.opening import ModelOptions
    from ..recipes.steps import DataOptions

# Help panels group the options of long commands the same way everywhere.
MODEL_PANEL = "Model"
DATA_PANEL = "Data"
OUTPUT_PANEL = "Output"


# ctx.meta (shared by nested contexts): set while `chanprune run` runs its stages
IN_RUN_KEY = "chanprune.in_run"


def in_run() -> bool:
    """Whether the command runs as a stage of `chanprune run` (which says itself how to continue)."""
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(IN_RUN_KEY))


def examples(*pairs: tuple[str, str]) -> str:
    """An 'Examples' epilog: (what it does, command line) pairs."""
    lines = [f"  [dim]# {escape(what)}[/dim]\n  $ {escape(cmd)}" for what, cmd in pairs]
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(lines)


CkptArg = Annotated[Optional[str], typer.Argument(metavar="CKPT", help="Checkpoint file (state dict, safetensors, chanprune file, or a pickled module with --trust-pickle).", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", metavar="ARCH", help="Architecture: a built-in name (chanprune analyze --list-archs lists them), torchvision:NAME, timm:NAME (needs timm), or package.module:factory. Not needed for chanprune files.", rich_help_panel=MODEL_PANEL, show_default=False)]
ArchKwargsOpt = Annotated[Optional[str], typer.Option("--arch-kwargs", metavar="JSON", help="Factory keyword arguments as a JSON object, e.g. '{\"num_classes\": 10}'.", rich_help_panel=MODEL_PANEL, show_default=False)]
InputShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W|C,L|L", help="Model input shape: C,H,W for images, C,L or L for 1-D signals (Conv1d models; L: inputs N×L). Default: recorded in the checkpoint or known for the architecture, else the size of the samples of --data. Images are resized to it; signals are used as given.", rich_help_panel=MODEL_PANEL, show_default=False)]
TaskOutputOpt = Annotated[Optional[str], typer.Option("--output", metavar="INDEX|KEY", help="Which output is the task output (the logits accuracy, data-driven criteria and fine-tuning use) of a model that returns several: an index or key, nested with dots (e.g. 0, out, 1.logits). Default: the one the checkpoint records, else the only output or a field named logits or out; otherwise the command stops and names the outputs. Recorded in the files prune and finetune write.", rich_help_panel=MODEL_PANEL, show_default=False)]
ThroughLayerNormOpt = Annotated[bool, typer.Option("--through-layernorm", help="Make channels that a LayerNorm normalises together removable (give it to score, prune and analyze alike: it changes the channel groups). Removing them changes the LayerNorm's statistics, so the pruned model is approximate: its deviation is measured and reported, not proven; fine-tune it afterwards. Default: such channels stay.")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled objects. Pickles run code: only for files you trust.", rich_help_panel=MODEL_PANEL)]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="Where to run the model (auto: CUDA when available).", rich_help_panel=MODEL_PANEL)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", metavar="N", min=1, help="CPU threads torch runs the model on (default: torch's count, one per core). On a busy machine or for a small model, fewer threads are often faster. Recorded in the JSON report where it times something.", rich_help_panel=MODEL_PANEL, show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option("--data", metavar="DATA", help="Dataset: ImageFolder directory, .tar/.tar.gz of one, MNIST IDX directory, NumPy .npz of images and labels (or .npy of images), synthetic:CxHxW[:K[:N]], or digits:train/digits:test.", rich_help_panel=DATA_PANEL, show_default=False)]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", metavar="M[,M,M]", help="Per-channel normalisation mean; one value applies to every channel (default: ImageNet statistics for RGB images, the data set's own for digits and MNIST).", rich_help_panel=DATA_PANEL, show_default=False)]
StdOpt = Annotated[Optional[str], typer.Option("--std", metavar="S[,S,S]", help="Per-channel normalisation std (default: as --mean).", rich_help_panel=DATA_PANEL, show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size for data passes.", rich_help_panel=DATA_PANEL)]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Data loading worker processes (0: load in the main process).", rich_help_panel=DATA_PANEL)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (sampling, shuffling), recorded in JSON reports.", rich_help_panel=DATA_PANEL)]
CalibBatchesOpt = Annotated[Optional[int], typer.Option("--calib-batches", min=1, metavar="N", help="Use at most N batches of --data, drawn at random with --seed (default: all).", rich_help_panel=DATA_PANEL, show_default=False)]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", metavar="NAMES", help="The model's class names in output order (comma-separated, or @FILE with one per line): data classes (folder names) are labelled by their place in this list, so a folder holding some of the classes is scored right. Default: the names the checkpoint records, else the data's sorted order.", rich_help_panel=DATA_PANEL, show_default=False)]
CriterionOpt = Annotated[Optional[str], typer.Option("--criterion", metavar="NAME", help="Channel-importance criterion (chanprune score --list-criteria lists them).", show_default=False)]
CriterionOptionOpt = Annotated[Optional[list[str]], typer.Option(
    "--criterion-opt", metavar="KEY=VALUE",
    help="A criterion option (repeatable), e.g. --criterion-opt sigma=0.5; typed like its default. "
         "chanprune score --list-criteria lists each criterion's options and defaults.", show_default=False)]
JsonOpt = Annotated[Optional[str], typer.Option("--json", metavar="PATH", help="Also write the report as JSON to PATH ('-': stdout, the table then goes to stderr).", rich_help_panel=OUTPUT_PANEL, show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.", rich_help_panel=OUTPUT_PANEL)]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", metavar="FILE", help="Read option defaults from this TOML file (keys named like the options; a [COMMAND] table for command-specific ones). Flags override it; it overrides a discovered chanprune.toml.", rich_help_panel=OUTPUT_PANEL, show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors (also: CHANPRUNE_DEBUG=1).", callback=debug_callback, is_eager=True, rich_help_panel=OUTPUT_PANEL)]


# --------------------------------------------------------------------------------------------
# groups of shared options, handed to a command as one object

Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass(frozen=True)
class OptionGroup:
    """Options a command receives as one object: (parameter name, option type, default) each, and
    `build`, which makes the object from their values (keyword arguments named like the parameters)."""

    params: tuple[tuple[str, Any, Any], ...]
    build: Callable[..., Any]

    def only(self, *names: str, **defaults: Any) -> OptionGroup:
        """This group with only the options `names`, and the given defaults instead of the usual."""
        kept = tuple((n, kind, defaults.get(n, default)) for n, kind, default in self.params if n in names)
        return replace(self, params=kept)


@dataclass(frozen=True)
class Outputs:
    """Where a command's JSON report goes (`--json`; "-": stdout, the tables then go to stderr) and
    whether its outputs may replace existing files (`--force`)."""

    json_report: str | None = None
    force: bool = False


def _model_options(**values: Any) -> ModelOptions:
    from ..recipes.opening import ModelOptions

    return ModelOptions(output=values.pop("task_output", None), **values)


def _data_options(**values: Any) -> DataOptions:
    from ..recipes.steps import DataOptions

    return DataOptions(**values)


MODEL = OptionGroup((("arch", ArchOpt, None), ("arch_kwargs", ArchKwargsOpt, None), ("input_shape", InputShapeOpt, None),
                     ("trust_pickle", TrustPickleOpt, False), ("device", DeviceOpt, "auto"), ("threads", ThreadsOpt, None),
                     ("mean", MeanOpt, None), ("std", StdOpt, None), ("classes", ClassesOpt, None),
                     ("task_output", TaskOutputOpt, None)),
                    _model_options)
DATA = OptionGroup((("data", DataOpt, None), ("batch_size", BatchSizeOpt, 64), ("workers", WorkersOpt, 0),
                    ("seed", SeedOpt, 0), ("calib_batches", CalibBatchesOpt, None)), _data_options)
OUTPUTS = OptionGroup((("json_out", JsonOpt, None), ("force", ForceOpt, False)),
                      lambda json_out, force: Outputs(json_out, force))
# The order of the shared options in every command's --help and `chanprune config COMMAND` (the
# model's and the data's interleave where their placeholders stand together).
_ORDER = ("arch", "arch_kwargs", "input_shape", "trust_pickle", "device", "threads", "data", "mean", "std", "batch_size", "workers",
          "seed", "calib_batches", "classes", "task_output", "json_out", "force")


def shared_options(command: Command) -> Command:
    """Give `command` the options of every group that is a parameter's default (`model:
    ModelOptions = MODEL`): in the signature Typer reads, the group's options stand where that
    parameter stands, in `_ORDER` (the options of adjacent groups together), and the parameter
    receives the object the group builds from their values."""
    signature = inspect.signature(command)
    groups = {p.name: p.default for p in signature.parameters.values() if isinstance(p.default, OptionGroup)}
    params: list[inspect.Parameter] = []
    block: list[inspect.Parameter] = []  # the options of the groups met in a row
    for p in signature.parameters.values():
        if p.name in groups:
            block += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind, default=default)
                      for name, kind, default in groups[p.name].params]
            continue
        params += sorted(block, key=lambda q: _ORDER.index(q.name))
        block = []
        params.append(p.replace(annotation=_evaluated(p.annotation, command)))
    params += sorted(block, key=lambda q: _ORDER.index(q.name))

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for target, group in groups.items():
            values[target] = group.build(**{name: values.pop(name) for name, _, _ in group.params})
        return command(**values)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run  # type: ignore[return-value]


def _evaluated(annotation: Any, command: Callable[..., Any]) -> Any:
    """A parameter's annotation as an object (Typer reads the signature as given; the modules use
    postponed annotations, so they are strings)."""
    return eval(annotation, command.__globals__) if isinstance(annotation, str) else annotation

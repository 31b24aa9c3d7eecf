"""Project-directory commands: `chanprune config` (what applies, from where) and `chanprune init`."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ..errors import UserError
from . import options as opt
from .app import app
from .configfiles import command_keys, config_files, configurable_commands, option_keys


@app.command(
    name="config",
    epilog=opt.examples(
        ("every value the config files set, and where it comes from", "chanprune config"),
        ("all of prune's options as a plain `chanprune prune` here would use them", "chanprune config prune"),
        ("with another file on top, as JSON", "chanprune config prune --config ci.toml --json -"),
    ),
)
def show_config(
    ctx: typer.Context,
    command: Annotated[Optional[str], typer.Argument(metavar="[COMMAND]", help="Show every option of this command (default: only what the files set, for every command).", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", metavar="FILE", help="A config file to apply on top of the discovered one, as the commands' --config does.", show_default=False)] = None,
    json_out: opt.JsonOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Show the resolved settings (flag > --config > chanprune.toml > default) and where each comes from."""
    from ..project.config import resolve
    from ..project.state import read_state, state_path
    from ..report import config as report

    group = ctx.find_root().command
    commands = configurable_commands(group)
    if command is not None and command not in commands:
        raise UserError(f"'{command}' reads no config; choose one of: {', '.join(commands)}")
    files = config_files(group, config)
    keys = command_keys(group)
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in [command] if command else list(commands):
        settings = resolve(name, files, keys)
        if command is None:
            rows[name] = [{"key": k, "value": s.value, "source": s.source} for k, s in sorted(settings.items())]
        else:
            rows[name] = [{"key": k, "value": settings[k].value if k in settings else _default(p),
                           "source": settings[k].source if k in settings else "default"}
                          for k, p in option_keys(commands[name]).items()]
    last = read_state()
    report.show(files, rows, last, str(state_path()), json_out)


def _default(param: Any) -> Any:
    value = param.default
    return None if callable(value) else value


TEMPLATE = """\
# chanprune project settings: every chanprune command run in this directory (or below) reads them.
# Keys are named like the command-line options (--arch-kwargs -> arch_kwargs). Precedence:
# flag > --config FILE > this file > built-in default. `chanprune config` shows what applies.
# Relative paths are relative to this file.

# --- shared by every command ----------------------------------------------------------------
{checkpoint}
{arch}
{arch_kwargs}
{input_shape}
# mean = [0.485, 0.456, 0.406]    # default: the data's own statistics (ImageNet for RGB images)
# std = [0.229, 0.224, 0.225]
# device = "auto"                 # auto | cpu | cuda
# Data is set per table, never shared: training images for score, prune and finetune; held-out
# images for analyze, validation and bench (accuracy measured on training images is too high).

[analyze]
{analyze_data}

[score]
{criterion}
{score_data}
{calib_batches}

[prune]
{amount}
{prune_data}
{val_data}
# round_to = 8                    # kept widths multiples of 8 (faster kernels)

[finetune]
{finetune_data}
{finetune_val_data}
# epochs = 10
# lr = 0.01

[export]
# format = "onnx"                 # onnx | torchscript | safetensors

[bench]
# batch_sizes = "1,32"
{bench_data}
{max_acc_drop}
{min_speedup}

[run]                             # chanprune run chanprune.toml
# dir = "runs/main"
# stages = ["analyze", "score", "prune", "finetune", "export", "bench"]
"""


def _line(key: str, value: Any, example: str) -> str:
    """`key = value` in TOML when given, else the commented example."""
    import json

    if value is None:
        return f"# {key} = {example}"
    if isinstance(value, str):
        return f"{key} = {json.dumps(value)}"
    return f"{key} = {value}"


@app.command(
    epilog=opt.examples(
        ("a commented chanprune.toml to fill in", "chanprune init"),
        ("set up a CI job in one line: train on data/train, gate top-1 on the held-out data/val",
         "chanprune init --checkpoint model.pt --arch torchvision:resnet18 --data data/train --val-data data/val "
         "--criterion taylor --target-flops 0.5 --max-acc-drop 1 && chanprune run chanprune.toml"),
    ),
)
def init(
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", metavar="CKPT", help="The checkpoint the project prunes.", show_default=False)] = None,
    arch: opt.ArchOpt = None,
    arch_kwargs: opt.ArchKwargsOpt = None,
    input_shape: opt.InputShapeOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", metavar="TRAIN", help="Training data: [score], [prune] (BatchNorm re-estimation) and [finetune] data.", show_default=False)] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", metavar="VAL", help="Held-out evaluation data: [analyze] and [bench] data, [prune] and [finetune] val_data (needed by --max-acc-drop).", show_default=False)] = None,
    criterion: Annotated[Optional[str], typer.Option("--criterion", metavar="NAME", help="Criterion for [score].", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", metavar="R", help="[prune] ratio.", show_default=False)] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", metavar="F", help="[prune] target_flops.", show_default=False)] = None,
    max_acc_drop: Annotated[Optional[float], typer.Option("--max-acc-drop", metavar="PTS", help="[bench] gate.", show_default=False)] = None,
    min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", metavar="X", help="[bench] gate.", show_default=False)] = None,
    out: Annotated[str, typer.Option("--out", metavar="PATH", help="Where to write it.", rich_help_panel=opt.OUTPUT_PANEL)] = "chanprune.toml",
    force: opt.ForceOpt = False,
    debug: opt.DebugOpt = False,
) -> None:
    """Write a commented chanprune.toml for this directory (asks nothing; flags fill in the values,
    each checked as the command that reads it checks it: a bad one fails and nothing is written)."""
    import json

    from ..support.fsutil import check_output, write_text_atomic

    if ratio is not None and target_flops is not None:
        raise UserError("give either --ratio or --target-flops, not both")
    if max_acc_drop is not None and val_data is None:
        raise UserError("--max-acc-drop measures top-1 on held-out images: give them with --val-data "
                        "(the --data training images would overstate accuracy)")
    reads_data = _check_init_values(arch, arch_kwargs, input_shape, criterion, ratio, target_flops, max_acc_drop,
                                    min_speedup, val_data)
    check_output(out, force)
    kwargs = None if arch_kwargs is None else json.loads(arch_kwargs)
    from ..data import parse_shape

    shape = None if input_shape is None else "[" + ", ".join(str(n) for n in parse_shape(input_shape)) + "]"
    amount = (_line("target_flops", target_flops, "0.5") if target_flops is not None
              else _line("ratio", ratio if ratio is not None else 0.5, "0.5")
              + "                     # or target_flops = 0.5 (fraction of MACs removed)")
    text = TEMPLATE.format(
        checkpoint=_line("checkpoint", checkpoint, '"model.pt"'),
        arch=_line("arch", arch, '"torchvision:resnet18"    # not needed for chanprune files'),
        arch_kwargs="# arch_kwargs = { num_classes = 10 }" if kwargs is None
        else "arch_kwargs = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in kwargs.items()) + " }",
        input_shape=f"input_shape = {shape}" if shape else "# input_shape = [3, 224, 224]",
        analyze_data=_line("data", val_data, '"data/val"                # top-1 of the original model'),
        criterion=_line("criterion", criterion if criterion is not None else "l1", '"l1"'),
        score_data=_line("data", data, '"data/train"              # data-driven criteria (taylor, ...)'),
        calib_batches=("calib_batches = 20                # random batches a data-driven criterion reads (default: all)"
                       if reads_data else "# calib_batches = 20"),
        amount=amount,
        prune_data=_line("data", data, '"data/train"              # BatchNorm re-estimation'),
        val_data=_line("val_data", val_data, '"data/val"'),
        finetune_data=_line("data", data, '"data/train"'),
        finetune_val_data=_line("val_data", val_data, '"data/val"'),
        bench_data=_line("data", val_data, '"data/val"                # accuracy (needed by max_acc_drop)'),
        max_acc_drop=_line("max_acc_drop", max_acc_drop, "1.0                # exit 3 when top-1 drops more (points)"),
        min_speedup=_line("min_speedup", min_speedup, "1.3                 # exit 3 when less than 1.3x faster"),
    )
    write_text_atomic(out, text)
    typer.echo(f"wrote {out}; check it with 'chanprune config', then e.g. 'chanprune run {out}'")


def _check_init_values(arch: str | None, arch_kwargs: str | None, input_shape: str | None, criterion: str | None,
                       ratio: float | None, target_flops: float | None, max_acc_drop: float | None,
                       min_speedup: float | None, val_data: str | None) -> bool:
    """Every value `init` was given, checked as the command that reads it from the file checks it,
    with that command's message (naming the flag, as `init` takes the same ones). Returns whether
    the criterion reads data (then the file bounds its calibration batches)."""
    from ..criteria.base import NEEDS_WEIGHTS
    from ..engine.allocate import AllocationOptions
    from ..models import parse_arch
    from ..prune.scoring import resolve_criterion
    from ..recipes.bench import BenchOptions
    from ..recipes.opening import ModelOptions
    from ..recipes.steps import DataOptions

    if arch is not None:
        parse_arch(arch, arch_kwargs)
    elif arch_kwargs is not None:
        parse_arch("arch", arch_kwargs)  # the JSON alone
    ModelOptions(arch=arch, arch_kwargs=arch_kwargs, input_shape=input_shape)
    AllocationOptions(ratio=ratio if ratio is not None or target_flops is not None else 0.5, target_flops=target_flops)
    BenchOptions(max_acc_drop=max_acc_drop, min_speedup=min_speedup, data=DataOptions(data=val_data))
    resolved = resolve_criterion(criterion or "l1", None, has_data=True)  # the file may name its data later
    return resolved.criterion is not None and resolved.criterion.requires(resolved.options) != NEEDS_WEIGHTS

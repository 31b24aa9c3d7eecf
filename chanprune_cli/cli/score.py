"""`chanprune score`: score every prunable channel with a criterion and save the scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import options as opt
from .app import app


@app.command(
    epilog=opt.examples(
        ("second-order sensitivity on 20 calibration batches",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion sensitivity --data train.tar.gz --calib-batches 20 --out r56.sens.safetensors"),
        ("a weight-only criterion needs no data",
         "chanprune score model.pt --arch torchvision:resnet18 --criterion fpgm --out r18.fpgm.safetensors"),
        ("scores land in the working directory (resnet56.th.l1.scores.safetensors); a plain `prune` then uses them",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion l1 && chanprune prune --ratio 0.5"),
        ("then prune with those scores", "chanprune prune resnet56.th --arch cifar_resnet56 --scores r56.sens.safetensors --target-flops 0.5 --out p.safetensors"),
    ),
)
@opt.shared_options
def score(
    ckpt: opt.CkptArg = None,
    criterion: opt.CriterionOpt = None,
    criterion_opt: opt.CriterionOptionOpt = None,
    list_criteria: Annotated[bool, typer.Option("--list-criteria", help="List the criteria with what they need and their options (KEY=default), then exit.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Scores file (default: CKPT-NAME.CRITERION.scores.safetensors in the working directory).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    ratio: Annotated[float, typer.Option("--ratio", metavar="R", help="For the summary: how many channels of each layer this ratio would remove.")] = 0.5,
    model: opt.ModelOptions = opt.MODEL,
    data: opt.DataOptions = opt.DATA,
    through_layernorm: opt.ThroughLayerNormOpt = False,
    outputs: opt.Outputs = opt.OUTPUTS,
    config: opt.ConfigOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Score every prunable channel with a criterion and save the scores for `prune --scores`.

    --list-criteria shows every criterion with its options and defaults; set them with
    --criterion-opt KEY=VALUE (repeatable)."""
    if list_criteria:
        from ..report.score import show_criteria

        show_criteria()
        return
    if ckpt is None or criterion is None:
        raise UserError("give a checkpoint and a criterion: chanprune score CKPT --criterion NAME (see --help)")
    from ..project.state import absolute, record
    from ..recipes.score import ScoreOptions, score_checkpoint
    from ..report import score as report

    options = ScoreOptions(criterion, criterion_options=criterion_opt, out=out, ratio=ratio, model=model, data=data,
                           through_layernorm=through_layernorm, force=outputs.force, json_report=outputs.json_report)
    result = score_checkpoint(ckpt, options)
    if result is None:  # a torchrun process other than rank 0
        return
    record("score", {"checkpoint": absolute(ckpt), "arch": model.arch, "arch_kwargs": model.arch_kwargs,
                     "input_shape": _as_typed(model.input_shape), "trust_pickle": model.trust_pickle,
                     "criterion": criterion, "criterion_opts": result.criterion.options,
                     "scores": absolute(result.output), "data": data.data, "mean": _as_typed(model.mean),
                     "std": _as_typed(model.std), "output": model.output, "through_layernorm": through_layernorm})
    report.show(result, outputs.json_report)


def _as_typed(values: Sequence[float] | None) -> str | None:
    """A parsed --input-shape, --mean or --std as the flag takes it (for a later `chanprune prune`)."""
    return None if values is None else ",".join(str(v) for v in values)

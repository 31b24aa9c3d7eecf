"""`chanprune score`: score every prunable channel with a criterion and save the scores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from .common import (
    OUTPUT_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    BatchSizeOpt,
    CalibBatchesOpt,
    CkptArg,
    ConfigOpt,
    CriterionOpt,
    CriterionOptionOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    MeanOpt,
    SeedOpt,
    StdOpt,
    TrustPickleOpt,
    WorkersOpt,
    app,
    calibration_loader,
    check_distinct_outputs,
    examples,
    load_model,
    refuse_nonfinite,
    resolve_input_shape,
    seed_everything,
    validate_common,
)


@app.command(
    epilog=examples(
        ("second-order sensitivity on 20 calibration batches",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion sensitivity --data train.tar.gz --calib-batches 20 --out r56.sens.safetensors"),
        ("a weight-only criterion needs no data",
         "chanprune score model.pt --arch torchvision:resnet18 --criterion fpgm --out r18.fpgm.safetensors"),
        ("scores land next to the checkpoint (resnet56.th.l1.scores.safetensors); a plain `prune` then uses them",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion l1 && chanprune prune --ratio 0.5"),
        ("then prune with those scores", "chanprune prune resnet56.th --arch cifar_resnet56 --scores r56.sens.safetensors --target-flops 0.5 --out p.safetensors"),
    ),
)
def score(
    ckpt: CkptArg = None,
    criterion: CriterionOpt = None,
    criterion_opt: CriterionOptionOpt = None,
    list_criteria: Annotated[bool, typer.Option("--list-criteria", help="List the criteria with what they need and their options (KEY=default), then exit.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Scores file (default: CKPT.CRITERION.scores.safetensors next to the checkpoint).", rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
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
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Score every prunable channel with a criterion and save the scores for `prune --scores`.

    [b]--list-criteria[/b] shows every criterion with its options and defaults; set them with
    [b]--criterion-opt KEY=VALUE[/b] (repeatable)."""
    if list_criteria:
        print_criteria()
        return
    if ckpt is None or criterion is None:
        raise UserError("give a checkpoint and a criterion: chanprune score CKPT --criterion NAME (see --help)")
    if out is None:  # next to the checkpoint, named so that scores of several criteria can coexist
        out = f"{ckpt}.{criterion}.scores.safetensors"
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be between 0 and 1 (exclusive), got {ratio:g}")
    shape, mean_t, std_t = validate_common(input_shape, mean, std, json_out, force)
    from ..criteria import check_requirements, get_criterion
    from ..criteria.base import parse_criterion_opts
    from ..support.fsutil import check_output

    crit = get_criterion(criterion)
    options = parse_criterion_opts(crit, criterion_opt)
    check_requirements(crit, data is not None, options=options, data_source=data)
    check_output(out, force)
    check_distinct_outputs(("--out", out), ("--json", json_out))
    seed_everything(seed)

    from ..engine.allocate import allocate
    from ..support.device import resolve_device
    from ..engine.graph import build_graph
    from ..report import make_console, render_scores, score_document, write_json
    from ..prune.scoring import compute_scores, save_scores

    loaded = load_model(ckpt, arch, arch_kwargs, trust_pickle)
    shape = resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    refuse_nonfinite(model, "score")
    graph = build_graph(model, shape)
    loader = calibration_loader(data, shape, mean_t, std_t, batch_size, workers, seed, calib_batches)
    from ..support import distributed as D

    # Under torchrun the calibration batches are split over the processes and the scores reduced
    # (weighted by batches); rank 0 writes. A plain run is one process of one.
    with D.distributed_session(resolve_device(device)) as (env, run_device):
        if env.distributed and loader is not None:
            loader = D.ShardedBatches(loader, env)
        scores = compute_scores(model, graph, criterion, loader, run_device, seed=seed, options=options)
        if env.distributed:
            scores = D.reduce_scores(scores, loader.batches if loader is not None else 1, env)
    if not env.is_main:
        return
    data_record = None if data is None else {"source": data, "batches": calib_batches, "batch_size": batch_size, "seed": seed}
    save_scores(out, scores, graph, model, criterion=criterion, options={**crit.defaults, **options}, data=data_record, force=force)
    removal = allocate(graph, scores, ratio=ratio).plan
    rows = [{"group": g.name, "channels": g.channels, "min": float(scores[g.id].min()), "median": float(scores[g.id].median()),
             "max": float(scores[g.id].max()), "removed_at_ratio": len(removal.get(g.id, []))} for g in graph.prunable_groups()]
    from ..project.state import absolute, record

    record("score", {"checkpoint": absolute(ckpt), "arch": arch, "arch_kwargs": arch_kwargs, "input_shape": input_shape,
                     "trust_pickle": trust_pickle, "criterion": criterion, "criterion_opts": options, "scores": absolute(out), "data": data,
                     "mean": mean, "std": std})
    console = make_console(stderr=json_out == "-")
    render_scores(criterion, out, ratio, rows, console)
    if json_out is not None:
        write_json(score_document(ckpt, out, criterion, ratio, rows, data_record, seed), json_out)


def print_criteria() -> None:
    """The criteria, what each needs and its options with defaults (`score --list-criteria`)."""
    from rich.table import Table

    from ..criteria.base import criteria_table
    from ..report import make_console

    table = Table(title="criteria (set options with --criterion-opt KEY=VALUE)")
    for column in ("criterion", "needs", "options (defaults)", "what it measures"):
        table.add_column(column, overflow="fold")
    for row in criteria_table():
        table.add_row(*row)
    make_console().print(table)

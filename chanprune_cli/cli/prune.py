"""`chanprune prune`: remove channels, verify against the masked original, save a chanprune file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import UserError
from .common import (
    DATA_PANEL,
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
    make_eval_loader,
    prefer_flags,
    refuse_nonfinite,
    resolve_input_shape,
    seed_everything,
    validate_common,
)


@app.command(
    epilog=examples(
        ("remove half of every layer's channels by L1 norm, verified, as a chanprune file",
         "chanprune prune resnet56.th --arch cifar_resnet56 --criterion l1 --ratio 0.5 --out r56-half.safetensors"),
        ("remove 50 % of the MACs with one global ranking, keeping widths multiples of 8",
         "chanprune prune model.pt --arch torchvision:resnet50 --criterion fpgm --target-flops 0.5 --round-to 8 --out r50.safetensors"),
        ("prune with scores made earlier by `chanprune score`, report as JSON",
         "chanprune prune resnet56.th --arch cifar_resnet56 --scores r56.taylor.safetensors --target-flops 0.5 --out p.safetensors --json p.json"),
        ("reach the target in 10 rounds, rescoring between them (iterative pruning)",
         "chanprune prune resnet56.th --arch cifar_resnet56 --criterion l1 --target-flops 0.5 --rounds 10 --out r56.safetensors"),
        ("keep the classifier head and the stem untouched",
         "chanprune prune model.pt --arch torchvision:mobilenet_v2 --ratio 0.3 --ignore 'features.0.*' --ignore classifier.1 --out m.safetensors"),
    ),
)
def prune(
    ckpt: CkptArg = None,
    criterion: CriterionOpt = None,
    criterion_opt: CriterionOptionOpt = None,
    scores_path: Annotated[Optional[str], typer.Option("--scores", metavar="S", help="Scores from [b]chanprune score[/b] (instead of --criterion).", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", metavar="R", help="Remove this fraction of the channels of every prunable group (0 < R < 1).", show_default=False)] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", metavar="F", help="Remove this fraction of the MACs by one global ranking (0 < F < 1).", show_default=False)] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", metavar="GLOB", help="Never remove channels produced by modules matching GLOB (repeatable).", show_default=False)] = None,
    min_keep: Annotated[float, typer.Option("--min-keep", metavar="X", help="Every layer keeps at least X of its channels: a fraction (<1) or a count.")] = 0.1,
    round_to: Annotated[int, typer.Option("--round-to", metavar="N", min=1, help="Kept widths are multiples of N (fast kernels like multiples of 8).")] = 1,
    cost_exponent: Annotated[float, typer.Option("--cost-exponent", metavar="E", min=0.0, max=1.0, help="With --target-flops: rank channels by importance / (MACs a channel costs)^E. 0: importance only; 1: importance per MAC; 0.5 gave most criteria 1-9 points more top-1 on ResNet-56 when only the blocks' inner channels were prunable, fewer when the residual streams were too (BENCHMARKS.md).")] = 0.0,
    normalize: Annotated[str, typer.Option("--normalize", metavar="auto|mean|none", help="With --target-flops: divide each layer group's scores by their mean before the global ranking (mean) or rank them as they are (none). auto: none for scores in loss units (taylor, sensitivity with the Fisher Hessian), whose raw values compare across layers, mean for the others.")] = "auto",
    rounds: Annotated[int, typer.Option("--rounds", metavar="N", min=1, help="With --target-flops and --criterion: reach the target in N rounds, rescoring between them the model with the channels chosen so far masked (its BatchNorm statistics re-estimated on --data first, see --recalibrate-bn); each layer's scores are normalised over its surviving channels. Surgery and verification happen once. Helped l1/l2/bn/cac, hurt hrank/info/whitebox on ResNet-56 (BENCHMARKS.md).")] = 1,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the equivalence check of pruned vs masked original.")] = False,
    recalibrate_bn: Annotated[int, typer.Option("--recalibrate-bn", metavar="N", min=0, help="After surgery, re-estimate BatchNorm statistics on N batches of --data (0: off; needs --data).")] = 20,
    val_data: Annotated[Optional[str], typer.Option("--val-data", metavar="VAL", help="Report top-1 before pruning, after it, and after BN recalibration on this data.", rich_help_panel=DATA_PANEL, show_default=False)] = None,
    out: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Pruned checkpoint (default: CKPT-STEM.pruned.safetensors next to the checkpoint).", rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
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
    """Remove channels physically, prove the result equals the masked original, save it."""
    ratio, target_flops = prefer_flags(ratio=ratio, target_flops=target_flops).values()
    criterion, scores_path = prefer_flags(criterion=criterion, scores_path=scores_path).values()
    chained = _from_last_score(ckpt, criterion, scores_path)
    if chained is not None:
        ckpt, scores_path = chained["checkpoint"], chained["scores"]
        arch, arch_kwargs, input_shape = arch or chained.get("arch"), arch_kwargs or chained.get("arch_kwargs"), input_shape or chained.get("input_shape")
        mean, std = mean or chained.get("mean"), std or chained.get("std")
        trust_pickle = trust_pickle or bool(chained.get("trust_pickle"))
    if ckpt is None:
        raise UserError("no checkpoint given and no earlier 'chanprune score' in this directory; run e.g. "
                        "'chanprune score CKPT --criterion l1' then 'chanprune prune --ratio 0.5', "
                        "or 'chanprune prune CKPT --criterion l1 --ratio 0.5'")
    if out is None:
        out = str(Path(ckpt).with_name(Path(ckpt).stem + ".pruned.safetensors"))
    if criterion is not None and scores_path is not None:
        raise UserError("give either --criterion or --scores, not both")
    if rounds > 1 and scores_path is not None:
        raise UserError("--rounds rescores the model between rounds; give --criterion instead of --scores")
    from ..engine.allocate import check_target
    from ..prune.rounds import score_in_rounds

    check_target(ratio, target_flops, rounds)
    criterion_name = criterion or ("l1" if scores_path is None else None)
    shape, mean_t, std_t = validate_common(input_shape, mean, std, json_out, force)
    from ..engine.allocate import parse_min_keep
    from ..criteria import check_requirements, get_criterion
    from ..support.fsutil import check_output
    from ..prune.pruning import normalize_mode

    parse_min_keep(min_keep)
    check_output(out, force)
    check_distinct_outputs(("--out", out), ("--json", json_out))
    if scores_path is not None:
        from ..prune.scoring import read_scores_meta

        read_scores_meta(scores_path)  # a missing or foreign score file fails before the slow steps
    options: dict[str, Any] = {}
    if criterion_opt and criterion_name is None:
        raise UserError("--criterion-opt sets options of --criterion; scores from --scores were made with their own options")
    if criterion_name is not None:
        from ..criteria.base import parse_criterion_opts

        crit = get_criterion(criterion_name)
        options = parse_criterion_opts(crit, criterion_opt)
        check_requirements(crit, data is not None, options=options, data_source=data)
    normalize_mode(normalize, criterion_name or "")  # a bad value fails before the slow steps
    seed_everything(seed)

    from ..prune import pruning
    from ..checkpoint import save_chanprune, tool_version
    from ..support.device import resolve_device
    from ..engine.graph import build_graph, match_ignored
    from ..report import (
        PruneReport,
        group_rows,
        make_console,
        prune_document,
        render_prune,
        write_json,
    )
    from ..prune.scoring import compute_scores, load_scores

    loaded = load_model(ckpt, arch, arch_kwargs, trust_pickle)
    if loaded.arch is None:
        raise UserError("this pickled model has no architecture to rebuild it from; pass --arch as well")
    shape = resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    refuse_nonfinite(model, "prune")
    console = make_console(stderr=json_out == "-")
    graph = build_graph(model, shape, ignore=ignore or ())
    for pattern in match_ignored((n for n, _ in model.named_modules()), ignore or ()):
        typer.echo(f"warning: --ignore {pattern!r} matches no module", err=True)
    narrow = [g for g in graph.prunable_groups() if round_to > 1 and g.channels <= round_to]
    if narrow and len(narrow) < len(graph.prunable_groups()):
        typer.echo(f"warning: --round-to {round_to} is not below the width of {len(narrow)} layer group(s) "
                   f"(e.g. {narrow[0].name}: {narrow[0].channels} channels); they stay unpruned", err=True)
    dev = resolve_device(device)
    removed: dict[int, list[int]] = {}
    if scores_path is not None:
        scores, info = load_scores(scores_path, graph, model)
        criterion_name = str(info.get("criterion"))
        options = dict(info.get("options") or {})
        normalize = normalize_mode(normalize, criterion_name, options)
    else:
        assert criterion_name is not None
        from ..criteria.base import NEEDS_WEIGHTS
        from ..prune.recalibration import recalibrate_bn as recalibrate

        normalize = normalize_mode(normalize, criterion_name, options)
        loader = calibration_loader(data, shape, mean_t, std_t, batch_size, workers, seed, calib_batches)

        round_numbers = iter(range(1, rounds + 1))

        def score(m: Any) -> Any:
            if rounds > 1:
                typer.echo(f"round {next(round_numbers)}/{rounds}: scoring with {criterion_name}", err=True)
            return compute_scores(m, graph, criterion_name, loader, dev, seed=seed, options=options)

        # BN statistics matter only to criteria that read activations
        reads_activations = get_criterion(criterion_name).requires(options) != NEEDS_WEIGHTS

        def refresh(m: Any) -> None:
            # a fresh loader draws the same seeded batches every round (and as the final recalibration)
            recal = calibration_loader(data, shape, mean_t, std_t, batch_size, workers, seed, recalibrate_bn)
            recalibrate(m, recal, dev, recalibrate_bn)

        scores, removed = score_in_rounds(model, graph, score, rounds=rounds, target_flops=target_flops,
                                          refresh=refresh if data is not None and recalibrate_bn > 0 and reads_activations else None,
                                          min_keep=min_keep, round_to=round_to, cost_exponent=cost_exponent,
                                          normalize=normalize == "mean")
        options = {**get_criterion(criterion_name).defaults, **options}
    outcome = pruning.prune(model, graph, scores, shape, criterion=criterion_name, ratio=ratio,
                            target_flops=target_flops, min_keep=min_keep, round_to=round_to, cost_exponent=cost_exponent,
                            normalize=normalize, criterion_options=options, removed=removed, check=not no_verify)
    accuracy = _accuracy_and_recalibration(model, outcome.model, data, val_data, recalibrate_bn, dev, shape, mean_t, std_t,
                                           batch_size, workers, seed)
    verify = None if outcome.verify is None else {
        "max_abs_diff": outcome.verify.max_abs_diff, "tolerance": outcome.verify.tolerance, "passed": outcome.verify.passed}
    history_entry = {"command": "prune", "criterion": criterion_name, "criterion_options": options, "cost_exponent": cost_exponent,
                     "normalize": normalize, "rounds": rounds, "requested": outcome.allocation.requested,
                     "data": data, "seed": seed, "before": outcome.before, "after": outcome.after,
                     "verify": verify, "recalibrated_bn_batches": accuracy.get("recalibrated_bn_batches", 0),
                     "tool_version": tool_version()}
    save_chanprune(out, outcome.model, loaded.arch, input_shape=shape, history=[*loaded.history, history_entry],
                   plans=[*loaded.plans, outcome.plan_record], meta=loaded.meta, force=force)
    blocked = [{"name": g["name"], "channels": g["channels"], "reason": g["reason"]} for g in group_rows(graph) if not g["prunable"]]
    report = PruneReport(ckpt, out, criterion_name, outcome.allocation.requested, outcome.before, outcome.after,
                         outcome.layers, verify, blocked, seed=seed, accuracy=accuracy or None)
    from ..project.state import absolute, record

    record("prune", {"checkpoint": absolute(ckpt), "scores": absolute(scores_path), "criterion": criterion_name,
                     "out": absolute(out)})
    render_prune(report, console)
    if json_out is not None:
        document = prune_document(report)
        document["criterion_options"] = options
        document["normalize"] = normalize
        document["rounds"] = rounds
        write_json(document, json_out)


def _from_last_score(ckpt: str | None, criterion: str | None, scores_path: str | None) -> dict[str, Any] | None:
    """The last `chanprune score` here, when this prune should use it: no scores or criterion were
    given and either no checkpoint or the one that was scored. Says so in one line."""
    from ..project.state import read_state, same_file, shown

    last = read_state().get("score")
    if criterion is not None or scores_path is not None or not isinstance(last, dict):
        return None
    if not last.get("checkpoint") or not last.get("scores") or (ckpt is not None and not same_file(ckpt, last["checkpoint"])):
        return None
    typer.echo(f"using {shown(last['checkpoint'])} and its {last.get('criterion')} scores {shown(last['scores'])} "
               "from the last 'chanprune score' here (.chanprune/last.json)", err=True)
    return last


def _accuracy_and_recalibration(original: Any, pruned: Any, data: str | None, val_data: str | None, batches: int,
                                device: Any, shape: tuple[int, int, int], mean: Any, std: Any, batch_size: int,
                                workers: int, seed: int) -> dict[str, Any]:
    """BN recalibration of `pruned` on --data (in place), with top-1 before/after on --val-data."""
    from ..measure import evaluate
    from ..prune.recalibration import recalibrate_bn

    result: dict[str, Any] = {}

    def top1(model: Any, key: str) -> None:
        if val_data is not None:
            loader = make_eval_loader(val_data, input_shape=shape, mean=mean, std=std, batch_size=batch_size,
                                      workers=workers, seed=seed)
            result[key] = float(evaluate(model, loader, device, progress=True)["top1"])

    top1(original, "top1_before")
    top1(pruned, "top1_pruned")
    if data is not None and batches > 0:
        loader = calibration_loader(data, shape, mean, std, batch_size, workers, seed, batches)
        result["recalibrated_bn_batches"] = recalibrate_bn(pruned, loader, device, batches)
        top1(pruned, "top1_recalibrated")
    pruned.cpu().eval()
    return result

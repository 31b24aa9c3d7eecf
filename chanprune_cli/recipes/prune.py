"""The `prune` recipe: score (in one or more rounds) or read scores, remove channels, verify the
result against the masked original, re-estimate BatchNorm statistics, and save a chanprune file
whose history records how it was made."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..checkpoint import refuse_nonfinite, save_model, tool_version
from ..checkpoint.chanprune_format import resolve_normalization, with_normalization, with_task_output
from ..data import ClassesArg, make_loader, parse_classes
from ..engine.allocate import LayerRatioArg, check_target, parse_layer_ratios, parse_min_keep, unmatched_layer_ratios
from ..engine.graph import build_graph, match_ignored
from ..engine.scores import Scores
from ..engine.surgery import VerifyResult
from ..errors import UserError
from ..measure import evaluate
from ..prune import pruning
from ..prune.describe import group_rows
from ..prune.recalibration import recalibrate_bn as recalibrate
from ..prune.rounds import score_in_rounds
from ..prune.scoring import (
    CriterionOptions,
    ResolvedCriterion,
    compute_scores,
    load_scores,
    read_scores_meta,
    recorded_criterion,
    resolve_criterion,
)
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..support.progress import batches_total, progress_bar
from .steps import (
    FloatsArg,
    ShapeArg,
    Labels,
    calibration_loader,
    check_distinct_outputs,
    check_json_report,
    criterion_labels,
    load_model,
    model_labels,
    model_out_path,
    open_labelled,
    parse_inputs,
    parse_output,
    resolve_input_shape,
    say,
    seed_everything,
    select_task_output,
    warn,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader


@dataclass
class PruneResult:
    """What `prune_checkpoint` did: the saved file and the numbers its report shows."""

    checkpoint: str
    output: str | None  # the pruned model's file (None: a dry run wrote nothing)
    criterion: ResolvedCriterion  # what made the scores (with the options recorded)
    normalize: str  # "mean" | "none": how --target-flops compared groups
    rounds: int
    requested: dict[str, float]  # {"ratio": r} or {"target_flops": f}
    layer_ratio: dict[str, Any] | None  # {"patterns": {glob: r}, "groups": {group: r}} (None: no --layer-ratio)
    before: dict[str, int]  # params, macs
    after: dict[str, int]
    layers: list[dict[str, Any]]  # per conv/linear layer: widths, params and MACs before and after
    verify: dict[str, Any] | None  # max_abs_diff, tolerance, passed, approximate, relative_diff (None: skipped)
    blocked: list[dict[str, Any]]  # channel groups kept whole: name, channels, reason
    accuracy: dict[str, Any] | None  # top-1 before/after (and after BN recalibration), val_images, recalibrated_bn_batches
    seed: int
    model: nn.Module  # the pruned model (CPU, eval mode), as saved
    dry_run: bool = False
    # why the result is not exact (--through-layernorm removals): measured, not proven; empty when exact
    approximations: list[str] = field(default_factory=list)
    # set when MACs before and after count different workloads (a detector's proposals): which layers,
    # and the pruned model's MACs on the original's workload
    macs_workload: dict[str, Any] | None = None


def prune_checkpoint(
    checkpoint: str,
    *,
    criterion: str | None = None,
    criterion_options: CriterionOptions | None = None,
    scores: str | None = None,
    ratio: float | None = None,
    target_flops: float | None = None,
    ignore: Sequence[str] = (),
    through_layernorm: bool = False,
    layer_ratio: LayerRatioArg | None = None,
    min_keep: float = 0.1,
    round_to: int = 1,
    cost_exponent: float = 0.0,
    normalize: str = "auto",
    rounds: int = 1,
    verify: bool = True,
    recalibrate_bn: int = 20,
    val_data: str | None = None,
    val_images: int | None = None,
    out: str | None = None,
    arch: str | None = None,
    arch_kwargs: str | dict[str, Any] | None = None,
    input_shape: ShapeArg | None = None,
    trust_pickle: bool = False,
    device: str = "auto",
    data: str | None = None,
    mean: FloatsArg | None = None,
    std: FloatsArg | None = None,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    calib_batches: int | None = None,
    classes: ClassesArg | None = None,
    output: str | None = None,
    force: bool = False,
    json_report: str | None = None,
    dry_run: bool = False,
) -> PruneResult:
    """Prune `checkpoint` and save the result to `out` (default: CHECKPOINT-STEM.pruned.safetensors
    next to it, .pt for a whole pickled model, which is written back into its own container); the
    options mean what `chanprune prune`'s do.

    Scores come from `criterion` (default l1; `criterion_options` as {"key": value} or
    ["key=value"]) computed on `data`, or from a `scores` file of `score_checkpoint`. Give exactly
    one of `ratio` (of every group's channels) and `target_flops` (of the MACs); `rounds` > 1
    reaches `target_flops` in that many rescoring rounds. `layer_ratio` ("GLOB=R" strings or
    {GLOB: R}) gives the groups whose producer layers match GLOB their own ratio (with
    `target_flops`: fixed, outside the global ranking). With `data`, BatchNorm statistics are
    re-estimated on `recalibrate_bn` batches after surgery; with `val_data`, top-1 is measured (on
    a fixed random subset of `val_images` images, drawn with `seed`). `classes`: the model's class
    names in output order, which label the classes of `val_data` (and of `data` for a criterion that
    reads labels). `output` (an index or key, nested with dots) picks the model's task output where
    it returns several. Without `mean`/`std`/`input_shape`/`output`, those the checkpoint records
    are used (an input shape also from `data`); the output records them. `through_layernorm` makes
    channels behind a LayerNorm removable: the result is then approximate (measured, reported and
    warned about, not proven).
    `dry_run`: everything but writing the output (the result has the plan; `output` is None).
    `json_report` is where the caller will write the JSON report: checked before the slow steps."""
    if criterion is not None and scores is not None:
        raise UserError("give either --criterion or --scores, not both")
    if rounds > 1 and scores is not None:
        raise UserError("--rounds rescores the model between rounds; give --criterion instead of --scores")
    check_target(ratio, target_flops, rounds)
    ratios = parse_layer_ratios(layer_ratio)
    if val_images is not None and val_images < 1:
        raise UserError(f"--val-images must be at least 1, got {val_images}")
    if val_images is not None and val_data is None:
        raise UserError("--val-images sets how many images of --val-data to evaluate on; give --val-data too")
    shape, mean_t, std_t = parse_inputs(input_shape, mean, std)
    choice = parse_output(output)
    names = parse_classes(classes) if classes is not None else None
    check_json_report(json_report, force)
    parse_min_keep(min_keep)
    if out is not None and not dry_run:  # a dry run writes no output, so an existing file is no obstacle
        check_output(out, force)
    check_distinct_outputs(("--out", out), ("--json", json_report))
    if scores is not None:
        info = read_scores_meta(scores)  # a missing or foreign score file fails before the slow steps
        if criterion_options:
            raise UserError("--criterion-opt sets options of --criterion; scores from --scores were made with their own options")
        _check_scores_layernorm(scores, bool(info.get("through_layernorm")), through_layernorm)
        resolved = recorded_criterion(str(info.get("criterion")), info.get("options"))
    else:
        resolved = resolve_criterion(criterion or "l1", criterion_options, has_data=data is not None, data_source=data)
    mode = resolved.normalize_mode(normalize)  # a bad value fails before the slow steps
    seed_everything(seed)

    loaded = load_model(checkpoint, arch, arch_kwargs, trust_pickle)
    out = model_out_path(out, checkpoint, "pruned", loaded)  # a pickled model's output is a .pt
    if not dry_run:
        check_output(out, force)
    check_distinct_outputs(("--out", out), ("--json", json_report))
    shape = resolve_input_shape(shape, loaded, data or val_data)
    mean_t, std_t = resolve_normalization(loaded.meta, mean_t, std_t)  # a flag wins over what the checkpoint records
    choice = select_task_output(loaded, choice, shape)
    model = loaded.model.eval()
    refuse_nonfinite(model, "prune")
    with _busy("tracing the channel graph"):
        graph = build_graph(model, shape, ignore=ignore, through_layernorm=through_layernorm)
    for pattern in match_ignored((n for n, _ in model.named_modules()), ignore):
        warn(f"--ignore {pattern!r} matches no module")
    for pattern, partly in unmatched_layer_ratios(graph.prunable_groups(), ratios).items():
        why = (f"only some of the layers of group {partly}, whose channels are coupled (a glob selects a group when "
               "it matches all of its producer layers)") if partly else "no prunable layer group"
        warn(f"--layer-ratio {pattern!r} matches {why}; it has no effect (see `chanprune analyze` for the groups)")
    narrow = [g for g in graph.prunable_groups() if round_to > 1 and g.channels <= round_to]
    if narrow and len(narrow) < len(graph.prunable_groups()):
        warn(f"--round-to {round_to} is not below the width of {len(narrow)} layer group(s) "
             f"(e.g. {narrow[0].name}: {narrow[0].channels} channels); they stay unpruned")
    dev = resolve_device(device)
    # opened before the slow steps: validation labels the model cannot output fail here
    validation = None if val_data is None else _validation_loader(
        val_data, val_images, model_labels(loaded, shape, names), input_shape=shape, mean=mean_t, std=std_t,
        batch_size=batch_size, workers=workers, seed=seed)

    def batches(source: str | None, max_batches: int | None, labels: Labels | None = None) -> DataLoader | None:
        # a fresh loader draws the same seeded batches every time (every round, the final recalibration)
        return calibration_loader(source, input_shape=shape, mean=mean_t, std=std_t, batch_size=batch_size,
                                  workers=workers, seed=seed, max_batches=max_batches, labels=labels)

    removed: dict[int, list[int]] = {}
    if scores is not None:
        channel_scores, _ = load_scores(scores, graph, model)
    else:
        calibration = batches(data, calib_batches, criterion_labels(resolved, loaded, shape, names) if data else None)
        round_numbers = iter(range(1, rounds + 1))

        def rescore(m: nn.Module) -> Scores:
            if rounds > 1:
                say(f"round {next(round_numbers)}/{rounds}: scoring with {resolved.name}")
            return compute_scores(m, graph, resolved, calibration, dev, seed=seed)

        def refresh(m: nn.Module) -> None:
            recalibrate(m, batches(data, recalibrate_bn), dev, recalibrate_bn)

        # BN statistics matter only to criteria that read activations
        refreshing = data is not None and recalibrate_bn > 0 and resolved.reads_activations
        channel_scores, removed = score_in_rounds(model, graph, rescore, rounds=rounds, target_flops=target_flops,
                                                  refresh=refresh if refreshing else None, min_keep=min_keep,
                                                  round_to=round_to, cost_exponent=cost_exponent,
                                                  normalize=mode == "mean", layer_ratio=ratios)
    with _busy("removing channels and verifying the result against the masked original" if verify
               else "removing channels"):
        outcome = pruning.prune(model, graph, channel_scores, shape, criterion=resolved, ratio=ratio,
                                target_flops=target_flops, min_keep=min_keep, round_to=round_to,
                                cost_exponent=cost_exponent, normalize=mode, removed=removed, check=verify,
                                layer_ratio=ratios)
    accuracy = _accuracy_and_recalibration(model, outcome.model, batches, data, validation, recalibrate_bn, dev)
    if validation is not None and val_images is not None:
        accuracy["val_images"] = len(validation.dataset)  # type: ignore[arg-type]
    checked = None if outcome.verify is None else _verify_record(outcome.verify, outcome.approximations)
    if outcome.approximations:
        measured = (f"max relative deviation {checked['relative_diff']:.2g} on random inputs" if checked
                    else "not measured: --no-verify")
        warn(f"the pruned model is approximate: removing channels behind a LayerNorm changed its statistics ({measured}); "
             "re-estimate BatchNorm statistics (--data, --recalibrate-bn) and fine-tune it (chanprune finetune) before use")
    workload = None
    if outcome.workload is not None:
        workload = _workload_record(outcome.workload, outcome.before["macs"])
        name, factor = outcome.workload.changed[0]
        warn(f"this model's MACs depend on its input: after pruning {len(outcome.workload.changed)} layer(s) ran on a "
             f"different number of positions (e.g. {name}: {factor:.2f}x the MACs its kept channels explain; a "
             "detector's region proposals change with its weights), so 'MACs after' counts another workload. On the "
             f"original's workload the pruned model has {workload['macs_after']:,} MACs "
             f"(-{workload['macs_reduction_pct']:.1f} %); parameters compare exactly")
    by_id = {g.id: g.name for g in graph.groups}
    layer_ratios = {"patterns": ratios, "groups": {by_id[gid]: r for gid, r in outcome.allocation.layer_ratios.items()}} \
        if ratios else None
    history_entry = {"command": "prune", "criterion": resolved.name, "criterion_options": resolved.recorded_options,
                     "cost_exponent": cost_exponent, "normalize": mode, "rounds": rounds,
                     "requested": outcome.allocation.requested, "data": data, "seed": seed, "before": outcome.before,
                     "after": outcome.after, "verify": checked,
                     "recalibrated_bn_batches": accuracy.get("recalibrated_bn_batches", 0), "tool_version": tool_version()}
    if layer_ratios is not None:
        history_entry["layer_ratio"] = layer_ratios
    if workload is not None:
        history_entry["macs_workload"] = workload
    if through_layernorm:
        history_entry["through_layernorm"] = True
        history_entry["approximate"] = outcome.approximations
    if not dry_run:
        meta = with_task_output(with_normalization(loaded.meta, mean_t, std_t), choice)
        save_model(out, outcome.model, loaded, input_shape=shape, history=[*loaded.history, history_entry],
                   plans=[*loaded.plans, outcome.plan_record], meta=meta, force=force)
    blocked = [{"name": g["name"], "channels": g["channels"], "reason": g["reason"]}
               for g in group_rows(graph) if not g["prunable"]]
    return PruneResult(checkpoint, None if dry_run else out, resolved, mode, rounds, outcome.allocation.requested,
                       layer_ratios, outcome.before, outcome.after, outcome.layers, checked, blocked, accuracy or None,
                       seed, outcome.model, dry_run, outcome.approximations, workload)


def _workload_record(workload: pruning.Workload, macs_before: int) -> dict[str, Any]:
    return {"changed_layers": {name: round(factor, 4) for name, factor in workload.changed},
            "macs_after": workload.macs_same_workload,
            "macs_reduction_pct": round(100 * (1 - workload.macs_same_workload / macs_before), 2) if macs_before else 0.0}


def _check_scores_layernorm(path: str, scored: bool, pruning: bool) -> None:
    """--through-layernorm changes the channel groups: scores fit only a graph built the same way."""
    if scored and not pruning:
        raise UserError(f"{path} was scored with --through-layernorm (its groups reach behind LayerNorms); pass "
                        "--through-layernorm to prune with it too, or re-run chanprune score without it")
    if pruning and not scored:
        raise UserError(f"--through-layernorm changes the channel groups, but {path} was scored without it; re-run "
                        "chanprune score with --through-layernorm, or drop it")


def _verify_record(result: VerifyResult, approximations: Sequence[str]) -> dict[str, Any]:
    """The verification as reports and histories record it (`relative_diff`: see VerifyResult)."""
    return {"max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance, "passed": result.passed,
            "approximate": bool(approximations), "relative_diff": result.relative_diff}


def _validation_loader(source: str, images: int | None, labels: Labels, *, input_shape: tuple[int, int, int],
                       mean: tuple[float, ...] | None, std: tuple[float, ...] | None, batch_size: int, workers: int,
                       seed: int) -> DataLoader:
    """--val-data opened once for the three top-1 passes; with `images`, a fixed random subset of
    that many images drawn with `seed` (data sets are often sorted by class, so not the first ones)."""
    import torch
    from torch.utils.data import Subset

    dataset: Any = open_labelled(source, labels, input_shape=input_shape, mean=mean, std=std)
    if images is not None and images < len(dataset):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images]
        dataset = Subset(dataset, sorted(chosen.tolist()))
    return make_loader(dataset, batch_size=batch_size, workers=workers, seed=seed)


def _accuracy_and_recalibration(original: nn.Module, pruned: nn.Module,
                                batches: Callable[[str | None, int | None], DataLoader | None], data: str | None,
                                validation: DataLoader | None, recalibrate_bn: int,
                                device: torch.device) -> dict[str, Any]:
    """BN recalibration of `pruned` on `data` (in place), with top-1 before/after on `validation`."""
    result: dict[str, Any] = {}

    def top1(model: nn.Module, key: str, label: str) -> None:
        if validation is not None:
            with _counted(validation, label) as batches_seen:
                result[key] = float(evaluate(model, batches_seen, device, progress=False)["top1"])

    top1(original, "top1_before", "top-1 before pruning")
    top1(pruned, "top1_pruned", "top-1 after pruning")
    if data is not None and recalibrate_bn > 0:
        result["recalibrated_bn_batches"] = recalibrate(pruned, batches(data, recalibrate_bn), device, recalibrate_bn)
        top1(pruned, "top1_recalibrated", "top-1 after BN recalibration")
    pruned.cpu().eval()
    return result


# Progress on stderr, only on a terminal (support/progress.py): every step that can take more than
# a few seconds on a large model says what it is doing.

@contextlib.contextmanager
def _busy(label: str) -> Iterator[None]:
    """An indeterminate bar with elapsed time while one long call runs."""
    with progress_bar("info", eta=False) as bar:
        bar.add_task(label, total=None, info="")
        yield


@contextlib.contextmanager
def _counted(loader: DataLoader, label: str) -> Iterator[Iterable[Any]]:
    """`loader`'s batches, advancing a bar labelled `label` (with images/s) until the block ends."""
    import time

    with progress_bar("rate") as bar:
        task = bar.add_task(label, total=batches_total(loader, None), rate="")

        def batches() -> Iterator[Any]:
            started, images = time.perf_counter(), 0
            for batch in loader:
                yield batch
                images += len(batch[0])
                bar.update(task, advance=1, rate=f"{images / max(time.perf_counter() - started, 1e-9):,.0f} images/s")

        yield batches()

"""The `prune` recipe: score (in one or more rounds) or read scores, remove channels, verify the
result against the masked original, re-estimate BatchNorm statistics, and save a chanprune file
whose history records how it was made. Every plan is timed against the original on the latency
target before it is saved (a slower one is warned about); `--target-latency` plans with the
target's latency tables and corrects until the measured ratio meets it (`chanprune_cli.latency`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..checkpoint import save_model, tool_version
from ..checkpoint.chanprune_format import with_normalization, with_task_output
from ..data import make_loader
from ..deploy.runtimes import LatencyTarget
from ..engine.allocate import AllocationOptions, unmatched_layer_ratios
from ..engine.graph import ChannelGraph, build_graph, match_ignored
from ..engine.latency import LatencyBudget, LatencyGoal, module_macs
from ..engine.scores import Scores
from ..engine.surgery import VerifyResult
from ..errors import UserError
from ..latency.correction import CHECK_TIMING, LatencyResult, PairTimer, goal_ratio, prune_to_latency, slower_warning
from ..latency.steps import build_tables, check_batch, checked_target, latency_record, staircases
from ..latency.table import LatencyTables
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
from ..prune.workload import CountedWork, count_work, fit_costs
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..support.progress import batches_total, progress_bar
from .bench import check_plot
from .opening import ModelOptions, OpenedModel, model_out_path, open_model
from .steps import (
    DataOptions,
    Labels,
    check_distinct_outputs,
    check_json_report,
    open_labelled,
    recipe_entry,
    say,
    seed_everything,
    warn,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

__all__ = ["AllocationOptions", "PruneOptions", "PruneResult", "prune_checkpoint"]

TARGET_SLACK = 0.01  # --target-flops met within a point of the MACs


@dataclass(frozen=True)
class PruneOptions:
    """What `prune_checkpoint` does besides the checkpoint; names and defaults as the options of
    `chanprune prune` (see its --help).

    `allocation`: what to remove (a `ratio` or a `target_flops`, per-layer ratios, floors, rounds,
    ...; see `engine.allocate.AllocationOptions`). Scores come from `criterion` (default l1;
    `criterion_options` as {"key": value} or ["key=value"]) computed on `data.data`, or from a
    `scores` file of `score_checkpoint`. With data, BatchNorm statistics are re-estimated on
    `recalibrate_bn` batches after surgery; with `val_data`, top-1 is measured (on a fixed random
    subset of `val_images` images, drawn with the seed). `out` (None: CHECKPOINT-STEM.pruned.safetensors
    in the working directory, .pt for a whole pickled model, written back into its own container).
    `through_layernorm` makes channels behind a LayerNorm removable: the result is then approximate
    (measured, reported and warned about, not proven). `dry_run`: everything but writing the output.
    `json_report`: where the caller will write the JSON report, checked before the slow steps.
    `latency`: the target the plan is timed on against the original (`--latency-runtime`,
    `--latency-batch`, ...; its device is `model.device`, its threads, unless it sets them,
    `model.threads`); with `allocation.target_latency` also what
    the plan is made for. `plot`: where the caller will draw the latency staircases of the costliest
    groups (report/plots.py), checked before the slow steps."""

    allocation: AllocationOptions
    criterion: str | None = None
    criterion_options: CriterionOptions | None = None
    scores: str | None = None
    through_layernorm: bool = False
    verify: bool = True
    recalibrate_bn: int = 20
    val_data: str | None = None
    val_images: int | None = None
    out: str | None = None
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    force: bool = False
    json_report: str | None = None
    dry_run: bool = False
    latency: LatencyTarget = field(default_factory=LatencyTarget)
    plot: str | None = None

    def __post_init__(self) -> None:
        if self.criterion is not None and self.scores is not None:
            raise UserError("give either --criterion or --scores, not both")
        if self.allocation.rounds > 1 and self.scores is not None:
            raise UserError("--rounds rescores the model between rounds; give --criterion instead of --scores")
        if self.val_images is not None and self.val_images < 1:
            raise UserError(f"--val-images must be at least 1, got {self.val_images}")
        if self.val_images is not None and self.val_data is None:
            raise UserError("--val-images sets how many images of --val-data to evaluate on; give --val-data too")
        if self.scores is not None and self.criterion_options:
            raise UserError("--criterion-opt sets options of --criterion; scores from --scores were made with their own options")


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
    # set when the MACs depend on the input (a detector's proposals and detections): the original's
    # workload, on which before and after are counted, and the pruned model's MACs on its own
    macs_workload: dict[str, Any] | None = None
    # runtime, device, batch, threads, before_ms, after_ms, predicted_ms (see latency.steps.latency_record)
    latency: dict[str, Any] | None = None
    staircases: list[dict[str, Any]] | None = None  # with --plot: latency vs width of the costliest groups
    plot: str | None = None  # where the caller draws them (report/plots.py)
    warnings: list[str] = field(default_factory=list)  # e.g. a pruned model slower than the original
    target_missed: str | None = None  # --target-flops not met within a point: by how much, and what stopped it


@recipe_entry
def prune_checkpoint(checkpoint: str, options: PruneOptions) -> PruneResult:
    """Prune `checkpoint` as `options` say and save the result (see `PruneOptions`). Without
    `mean`/`std`/`input_shape`/`output`, those the checkpoint records are used (an input shape also
    from the data); the output records them. `model.classes` label the classes of `val_data` (and of
    the data, for a criterion that reads labels)."""
    o = options
    check_json_report(o.json_report, o.force)
    if o.out is not None and not o.dry_run:  # a dry run writes no output, so an existing file is no obstacle
        check_output(o.out, o.force)
    if o.plot is not None:
        check_plot(o.plot)
        check_output(o.plot, o.force)
    check_distinct_outputs(("--out", o.out), ("--json", o.json_report), ("--plot", o.plot))
    resolved = _criterion(o)
    dev = resolve_device(o.model.device)
    target = checked_target(o.latency if o.latency.threads is not None else
                            dataclasses.replace(o.latency, threads=o.model.threads), dev)
    round_to = target.favoured_multiple() if o.allocation.round_to == "auto" else o.allocation.round_to
    allocation = dataclasses.replace(o.allocation, normalize=resolved.normalize_mode(o.allocation.normalize),
                                     round_to=round_to)
    seed_everything(o.data.seed)

    data = o.data.data
    opened = open_model(checkpoint, o.model, data=data or o.val_data, refuse="prune")
    out = model_out_path(o.out, checkpoint, "pruned", opened.loaded)  # a pickled model's output is a .pt
    if not o.dry_run:
        check_output(out, o.force)
    check_distinct_outputs(("--out", out), ("--json", o.json_report), ("--plot", o.plot))
    model, shape = opened.model.eval(), opened.input_shape
    check_batch(model, shape, target.batch)
    graph = _channel_graph(model, shape, allocation, o.through_layernorm)
    with _busy("counting the original's MACs"):
        work = count_work(model, shape)
    fit_costs(graph, work)  # the allocation plans on the original's workload
    # opened before the slow steps: validation labels the model cannot output fail here
    validation = None if o.val_data is None else _validation_loader(opened, o.val_data, o.val_images, o.data)

    def batches(source: str | None, max_batches: int | None, labels: Labels | None = None) -> DataLoader | None:
        # a fresh loader draws the same seeded batches every time (every round, the final recalibration)
        return None if source is None else opened.loader(source, o.data, max_batches=max_batches, labels=labels)

    tables = None
    if allocation.target_latency is not None or o.plot is not None:
        with _busy(f"timing the layers on {target.runtime} for the latency tables"):
            tables = build_tables(model, graph, shape, target, say)
    channel_scores, removed = _scores(o, opened, graph, resolved, allocation, batches, dev, _first_budget(allocation, tables))
    outcome, latency, warnings = _prune(model, graph, channel_scores, shape, resolved, allocation, removed, o.verify,
                                        target, tables, work)
    accuracy = _accuracy_and_recalibration(model, outcome.model, batches, data, validation, o.recalibrate_bn, dev)
    if validation is not None and o.val_images is not None:
        accuracy["val_images"] = len(validation.dataset)  # type: ignore[arg-type]
    checked = None if outcome.verify is None else _verify_record(outcome.verify, outcome.approximations)
    workload = _warn_about(outcome, checked)
    missed = _target_missed(allocation, outcome, graph)
    by_id = {g.id: g.name for g in graph.groups}
    layer_ratios = {"patterns": allocation.layer_ratio,
                    "groups": {by_id[gid]: r for gid, r in outcome.allocation.layer_ratios.items()}} \
        if allocation.layer_ratio else None
    if not o.dry_run:
        entry = _history_entry(o, resolved, allocation, outcome, checked, accuracy, layer_ratios, workload)
        if allocation.target_latency is not None:  # what the plan was made for, and what it measured
            entry["latency"] = {k: latency[k] for k in ("runtime", "device", "batch", "threads", "dtype", "channels_last",
                                                        "before_ms", "after_ms", "predicted_ms", "target_ratio")}
        meta = with_task_output(with_normalization(opened.loaded.meta, opened.mean, opened.std), opened.task_output)
        save_model(out, outcome.model, opened.loaded, input_shape=shape, history=[*opened.loaded.history, entry],
                   plans=[*opened.loaded.plans, outcome.plan_record], meta=meta, force=o.force)
    blocked = [{"name": g["name"], "channels": g["channels"], "reason": g["reason"]}
               for g in group_rows(graph) if not g["prunable"]]
    curves = staircases(tables, outcome.allocation.plan) if tables is not None and o.plot is not None else None
    return PruneResult(checkpoint, None if o.dry_run else out, resolved, allocation.normalize, allocation.rounds,
                       outcome.allocation.requested, layer_ratios, outcome.before, outcome.after, outcome.layers, checked,
                       blocked, accuracy or None, o.data.seed, outcome.model, o.dry_run, outcome.approximations, workload,
                       latency, curves, o.plot, warnings, missed)


def _first_budget(allocation: AllocationOptions, tables: LatencyTables | None) -> LatencyBudget | None:
    """The predicted budget a latency target starts from (the rounds before the last plan to it)."""
    goal = allocation.target_latency
    if not isinstance(goal, LatencyGoal) or tables is None:
        return None
    return LatencyBudget(tables.model, goal_ratio(goal, tables.original_ms) * tables.model.predict({}))


def _prune(model: nn.Module, graph: ChannelGraph, scores: Scores, shape: tuple[int, int, int], resolved: ResolvedCriterion,
           allocation: AllocationOptions, removed: dict[int, list[int]], verify: bool, target: LatencyTarget,
           tables: LatencyTables | None, work: CountedWork) -> tuple[pruning.PruneOutcome, dict[str, Any], list[str]]:
    """The verified pruning, its latency record (timed against the original on `target`), and a
    warning when it runs slower than the original."""
    result: LatencyResult | None = None
    busy = "removing channels and verifying the result against the masked original" if verify else "removing channels"
    with _busy(f"timing the original on {target.runtime}"):
        timer = PairTimer(model, shape, target) if allocation.target_latency is not None else \
            PairTimer(model, shape, target, CHECK_TIMING)
    if allocation.target_latency is not None:
        assert tables is not None  # built for the target
        with _busy(f"pruning to the latency target, timing each candidate on {target.runtime}"):
            result = prune_to_latency(model, graph, scores, shape, criterion=resolved, options=allocation, tables=tables,
                                      time_candidate=timer, removed=removed, check=verify, work=work, progress=say)
        kept = result.attempt
        outcome, before_ms, after_ms, ratio, low = result.outcome, kept.before_ms, kept.after_ms, kept.ratio, None
    else:
        with _busy(busy):
            outcome = pruning.prune(model, graph, scores, shape, criterion=resolved, options=allocation, removed=removed,
                                    check=verify, work=work)
        with _busy(f"timing the pruned model against the original on {target.runtime}"):
            before_ms, after_ms, ratio, low = timer(outcome.model)
    warning = slower_warning(before_ms, after_ms, target, ratio, low)
    if warning is not None:
        warn(warning)
    record = latency_record(target, before_ms, after_ms, ratio, tables=tables, plan=outcome.allocation.plan, result=result)
    return outcome, record, [] if warning is None else [warning]


def _criterion(o: PruneOptions) -> ResolvedCriterion:
    """The criterion that scores (--criterion, default l1), or that made the --scores file (read
    now: a missing or foreign score file fails before the slow steps)."""
    if o.scores is None:
        data = o.data.data
        return resolve_criterion(o.criterion or "l1", o.criterion_options, has_data=data is not None, data_source=data)
    info = read_scores_meta(o.scores)
    _check_scores_layernorm(o.scores, bool(info.get("through_layernorm")), o.through_layernorm)
    return recorded_criterion(str(info.get("criterion")), info.get("options"))


def _channel_graph(model: nn.Module, shape: tuple[int, int, int], allocation: AllocationOptions,
                   through_layernorm: bool) -> ChannelGraph:
    """The channel graph, with a warning for every option that cannot do what it says on it."""
    with _busy("tracing the channel graph"):
        graph = build_graph(model, shape, ignore=allocation.ignore, through_layernorm=through_layernorm)
    for pattern in match_ignored((n for n, _ in model.named_modules()), allocation.ignore):
        warn(f"--ignore {pattern!r} matches no module")
    for pattern, partly in unmatched_layer_ratios(graph.prunable_groups(), allocation.layer_ratio).items():
        why = (f"only some of the layers of group {partly}, whose channels are coupled (a glob selects a group when "
               "it matches all of its producer layers)") if partly else "no prunable layer group"
        warn(f"--layer-ratio {pattern!r} matches {why}; it has no effect (see `chanprune analyze` for the groups)")
    round_to = allocation.round_to
    narrow = [g for g in graph.prunable_groups() if round_to > 1 and g.channels <= round_to]
    if narrow and len(narrow) < len(graph.prunable_groups()):
        warn(f"--round-to {round_to} is not below the width of {len(narrow)} layer group(s) "
             f"(e.g. {narrow[0].name}: {narrow[0].channels} channels); they stay unpruned")
    return graph


def _scores(o: PruneOptions, opened: OpenedModel, graph: ChannelGraph, resolved: ResolvedCriterion,
            allocation: AllocationOptions, batches: Callable[..., DataLoader | None],
            device: torch.device, latency: LatencyBudget | None) -> tuple[Scores, dict[int, list[int]]]:
    """The scores to prune by (read from --scores, or computed in `allocation.rounds` rounds) and the
    channels earlier rounds chose."""
    model = opened.model
    if o.scores is not None:
        return load_scores(o.scores, graph, model)[0], {}
    data, rounds, seed = o.data.data, allocation.rounds, o.data.seed
    calibration = batches(data, o.data.calib_batches, opened.criterion_labels(resolved) if data else None)
    round_numbers = iter(range(1, rounds + 1))

    def rescore(m: nn.Module) -> Scores:
        if rounds > 1:
            say(f"round {next(round_numbers)}/{rounds}: scoring with {resolved.name}")
        return compute_scores(m, graph, resolved, calibration, device, seed=seed)

    def refresh(m: nn.Module) -> None:
        recalibrate(m, batches(data, o.recalibrate_bn), device, o.recalibrate_bn)

    # BN statistics matter only to criteria that read activations
    refreshing = data is not None and o.recalibrate_bn > 0 and resolved.reads_activations
    return score_in_rounds(model, graph, rescore, allocation, refresh=refresh if refreshing else None, latency=latency)


def _warn_about(outcome: pruning.PruneOutcome, checked: dict[str, Any] | None) -> dict[str, Any] | None:
    """Warnings about a result that is approximate, or whose MACs count another workload; the
    latter's record (None: the MACs compare)."""
    if outcome.approximations:
        measured = (f"max relative deviation {checked['relative_diff']:.2g} on random inputs" if checked
                    else "not measured: --no-verify")
        warn(f"the pruned model is approximate: removing channels behind a LayerNorm changed its statistics ({measured}); "
             "re-estimate BatchNorm statistics (--data, --recalibrate-bn) and fine-tune it (chanprune finetune) before use")
    if checked is not None and checked.get("outputs") is not None and not checked.get("layers_compared"):
        warn(f"verification compared only {checked['outputs']} outputs (no detections on the random input) and no "
             "layer output: it proves nothing about this model; check the pruned model on inputs it detects in")
    if outcome.workload is None:
        return None
    workload = _workload_record(outcome.workload, outcome.before["macs"], outcome.after["macs"])
    if outcome.workload.changed:
        name, factor = outcome.workload.changed[0]
        warn(f"this model's MACs depend on its input: after pruning {len(outcome.workload.changed)} layer(s) ran on a "
             f"different number of positions (e.g. {name}: {factor:.2f}x the MACs its kept channels explain; a "
             f"detector's region proposals change with its weights). Before and after are counted "
             f"{outcome.workload.original.statement()}: {workload['macs_after']:,} MACs after pruning "
             f"({-workload['macs_reduction_pct']:+.1f} %); on its own workload the pruned model counts "
             f"{workload['own_macs_after']:,} ({-workload['own_macs_reduction_pct']:+.1f} %)")
    return workload


def _target_missed(allocation: AllocationOptions, outcome: pruning.PruneOutcome, graph: ChannelGraph) -> str | None:
    """--target-flops not met within a point: a warning line saying by how much and what stopped it
    (None: met, or another target)."""
    target = allocation.target_flops
    before, after = outcome.before["macs"], outcome.after["macs"]
    if target is None or not before:
        return None
    achieved = 1 - after / before
    if achieved >= target - TARGET_SLACK:
        return None
    costed = _costed_macs(graph)
    planned = 1 - outcome.allocation.estimated_macs_after / outcome.allocation.estimated_macs_before \
        if outcome.allocation.estimated_macs_before else 0.0
    uncosted = 1 - costed / before
    if planned >= target - TARGET_SLACK and uncosted > 0:
        why = (f"the plan removes {planned:.1%} of the MACs the channel graph costs, but {uncosted:.1%} of the model's "
               f"MACs are in modules it does not cost (pooling, upsampling, ops outside layers)")
    else:
        blocked = [g.name for g in graph.groups if not g.prunable]
        why = (f"the allocation stopped at {planned:.1%}: the channel groups' --min-keep {allocation.min_keep:g} and "
               f"--round-to {allocation.round_to} floors" + (f", and {len(blocked)} group(s) kept whole (e.g. "
                                                             f"{blocked[0]}; see chanprune analyze)" if blocked else ""))
    text = (f"--target-flops {target:g} missed: {achieved:.1%} of the MACs removed, {100 * (target - achieved):.1f} points "
            f"short; {why}")
    warn(text)
    return text


def _costed_macs(graph: ChannelGraph) -> int:
    """The original's MACs in the modules the channel graph costs (fitted to the original's workload)."""
    return sum(int(module_macs(cost, name, {})) for name, cost in graph.costs.items())


def _history_entry(o: PruneOptions, resolved: ResolvedCriterion, allocation: AllocationOptions,
                   outcome: pruning.PruneOutcome, checked: dict[str, Any] | None, accuracy: dict[str, Any],
                   layer_ratios: dict[str, Any] | None, workload: dict[str, Any] | None) -> dict[str, Any]:
    """How the pruned file was made, as its history records it."""
    entry = {"command": "prune", "criterion": resolved.name, "criterion_options": resolved.recorded_options,
             "cost_exponent": allocation.cost_exponent, "normalize": allocation.normalize, "rounds": allocation.rounds,
             "requested": outcome.allocation.requested, "data": o.data.data, "seed": o.data.seed,
             "before": outcome.before, "after": outcome.after, "verify": checked,
             "recalibrated_bn_batches": accuracy.get("recalibrated_bn_batches", 0), "tool_version": tool_version()}
    if layer_ratios is not None:
        entry["layer_ratio"] = layer_ratios
    if workload is not None:
        entry["macs_workload"] = workload
    if o.through_layernorm:
        entry["through_layernorm"] = True
        entry["approximate"] = outcome.approximations
    return entry


def _workload_record(workload: pruning.Workload, macs_before: int, macs_after: int) -> dict[str, Any]:
    """`macs_workload` in the JSON and the history: the workload both counts are on, and the pruned
    model's MACs on its own workload beside them."""
    def pct(after: int) -> float:
        return round(100 * (1 - after / macs_before), 2) if macs_before else 0.0

    return {**workload.original.record(),
            "changed_layers": {name: round(factor, 4) for name, factor in workload.changed},
            "macs_after": macs_after, "macs_reduction_pct": pct(macs_after),
            "own_macs_after": workload.own.total, "own_macs_reduction_pct": pct(workload.own.total),
            "own_proposals": workload.own.proposals, "own_detections": workload.own.detections}


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
            "approximate": bool(approximations), "relative_diff": result.relative_diff,
            "outputs": result.outputs_degenerate, "layers_compared": result.layers_compared}


def _validation_loader(opened: OpenedModel, source: str, images: int | None, data: DataOptions) -> DataLoader:
    """--val-data opened once for the three top-1 passes; with `images`, a fixed random subset of
    that many images drawn with the seed (data sets are often sorted by class, so not the first ones)."""
    import torch
    from torch.utils.data import Subset

    dataset: Any = open_labelled(source, opened.labels(), input_shape=opened.input_shape, mean=opened.mean,
                                 std=opened.std)
    if images is not None and images < len(dataset):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(data.seed))[:images]
        dataset = Subset(dataset, sorted(chosen.tolist()))
    return make_loader(dataset, batch_size=data.batch_size, workers=data.workers, seed=data.seed)


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
        if result["recalibrated_bn_batches"]:  # 0: the model has no BatchNorm to re-estimate
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

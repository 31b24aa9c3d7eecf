"""The `prune` recipe: score (in one or more rounds) or read scores, remove channels, verify the
result against the masked original, re-estimate BatchNorm statistics, and save a chanprune file
whose history records how it was made."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import refuse_nonfinite, save_chanprune, tool_version
from ..engine.allocate import check_target, parse_min_keep
from ..engine.graph import build_graph, match_ignored
from ..engine.scores import Scores
from ..errors import UserError
from ..measure import evaluate
from ..prune import pruning
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
from ..report import group_rows
from ..support.device import resolve_device
from ..support.fsutil import check_output
from .steps import (
    FloatsArg,
    ShapeArg,
    calibration_loader,
    check_distinct_outputs,
    check_json_report,
    load_model,
    parse_inputs,
    require_arch,
    resolve_input_shape,
    say,
    seed_everything,
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
    output: str  # the pruned chanprune file
    criterion: ResolvedCriterion  # what made the scores (with the options recorded)
    normalize: str  # "mean" | "none": how --target-flops compared groups
    rounds: int
    requested: dict[str, float]  # {"ratio": r} or {"target_flops": f}
    before: dict[str, int]  # params, macs
    after: dict[str, int]
    layers: list[dict[str, Any]]  # per conv/linear layer: widths, params and MACs before and after
    verify: dict[str, Any] | None  # max_abs_diff, tolerance, passed (None: verification skipped)
    blocked: list[dict[str, Any]]  # channel groups kept whole: name, channels, reason
    accuracy: dict[str, Any] | None  # top-1 before/after (and after BN recalibration), recalibrated_bn_batches
    seed: int
    model: nn.Module  # the pruned model (CPU, eval mode), as saved


def prune_checkpoint(
    checkpoint: str,
    *,
    criterion: str | None = None,
    criterion_options: CriterionOptions | None = None,
    scores: str | None = None,
    ratio: float | None = None,
    target_flops: float | None = None,
    ignore: Sequence[str] = (),
    min_keep: float = 0.1,
    round_to: int = 1,
    cost_exponent: float = 0.0,
    normalize: str = "auto",
    rounds: int = 1,
    verify: bool = True,
    recalibrate_bn: int = 20,
    val_data: str | None = None,
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
    force: bool = False,
    json_report: str | None = None,
) -> PruneResult:
    """Prune `checkpoint` and save the result to `out` (default: CHECKPOINT-STEM.pruned.safetensors
    next to it); the options mean what `chanprune prune`'s do.

    Scores come from `criterion` (default l1; `criterion_options` as {"key": value} or
    ["key=value"]) computed on `data`, or from a `scores` file of `score_checkpoint`. Give exactly
    one of `ratio` (of every group's channels) and `target_flops` (of the MACs); `rounds` > 1
    reaches `target_flops` in that many rescoring rounds. With `data`, BatchNorm statistics are
    re-estimated on `recalibrate_bn` batches after surgery; with `val_data`, top-1 is measured.
    `json_report` is where the caller will write the JSON report: checked before the slow steps."""
    if out is None:
        out = str(Path(checkpoint).with_name(Path(checkpoint).stem + ".pruned.safetensors"))
    if criterion is not None and scores is not None:
        raise UserError("give either --criterion or --scores, not both")
    if rounds > 1 and scores is not None:
        raise UserError("--rounds rescores the model between rounds; give --criterion instead of --scores")
    check_target(ratio, target_flops, rounds)
    shape, mean_t, std_t = parse_inputs(input_shape, mean, std)
    check_json_report(json_report, force)
    parse_min_keep(min_keep)
    check_output(out, force)
    check_distinct_outputs(("--out", out), ("--json", json_report))
    if scores is not None:
        info = read_scores_meta(scores)  # a missing or foreign score file fails before the slow steps
        if criterion_options:
            raise UserError("--criterion-opt sets options of --criterion; scores from --scores were made with their own options")
        resolved = recorded_criterion(str(info.get("criterion")), info.get("options"))
    else:
        resolved = resolve_criterion(criterion or "l1", criterion_options, has_data=data is not None, data_source=data)
    mode = resolved.normalize_mode(normalize)  # a bad value fails before the slow steps
    seed_everything(seed)

    loaded = load_model(checkpoint, arch, arch_kwargs, trust_pickle)
    arch_spec = require_arch(loaded)
    shape = resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    refuse_nonfinite(model, "prune")
    graph = build_graph(model, shape, ignore=ignore)
    for pattern in match_ignored((n for n, _ in model.named_modules()), ignore):
        warn(f"--ignore {pattern!r} matches no module")
    narrow = [g for g in graph.prunable_groups() if round_to > 1 and g.channels <= round_to]
    if narrow and len(narrow) < len(graph.prunable_groups()):
        warn(f"--round-to {round_to} is not below the width of {len(narrow)} layer group(s) "
             f"(e.g. {narrow[0].name}: {narrow[0].channels} channels); they stay unpruned")
    dev = resolve_device(device)

    def batches(source: str | None, max_batches: int | None) -> DataLoader | None:
        # a fresh loader draws the same seeded batches every time (every round, the final recalibration)
        return calibration_loader(source, input_shape=shape, mean=mean_t, std=std_t, batch_size=batch_size,
                                  workers=workers, seed=seed, max_batches=max_batches)

    removed: dict[int, list[int]] = {}
    if scores is not None:
        channel_scores, _ = load_scores(scores, graph, model)
    else:
        calibration = batches(data, calib_batches)
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
                                                  normalize=mode == "mean")
    outcome = pruning.prune(model, graph, channel_scores, shape, criterion=resolved, ratio=ratio,
                            target_flops=target_flops, min_keep=min_keep, round_to=round_to,
                            cost_exponent=cost_exponent, normalize=mode, removed=removed, check=verify)
    accuracy = _accuracy_and_recalibration(model, outcome.model, batches, data, val_data, recalibrate_bn, dev)
    checked = None if outcome.verify is None else {
        "max_abs_diff": outcome.verify.max_abs_diff, "tolerance": outcome.verify.tolerance, "passed": outcome.verify.passed}
    history_entry = {"command": "prune", "criterion": resolved.name, "criterion_options": resolved.recorded_options,
                     "cost_exponent": cost_exponent, "normalize": mode, "rounds": rounds,
                     "requested": outcome.allocation.requested, "data": data, "seed": seed, "before": outcome.before,
                     "after": outcome.after, "verify": checked,
                     "recalibrated_bn_batches": accuracy.get("recalibrated_bn_batches", 0), "tool_version": tool_version()}
    save_chanprune(out, outcome.model, arch_spec, input_shape=shape, history=[*loaded.history, history_entry],
                   plans=[*loaded.plans, outcome.plan_record], meta=loaded.meta, force=force)
    blocked = [{"name": g["name"], "channels": g["channels"], "reason": g["reason"]}
               for g in group_rows(graph) if not g["prunable"]]
    return PruneResult(checkpoint, out, resolved, mode, rounds, outcome.allocation.requested, outcome.before,
                       outcome.after, outcome.layers, checked, blocked, accuracy or None, seed, outcome.model)


def _accuracy_and_recalibration(original: nn.Module, pruned: nn.Module,
                                batches: Callable[[str | None, int | None], DataLoader | None], data: str | None,
                                val_data: str | None, recalibrate_bn: int, device: torch.device) -> dict[str, Any]:
    """BN recalibration of `pruned` on `data` (in place), with top-1 before/after on `val_data`."""
    result: dict[str, Any] = {}

    def top1(model: nn.Module, key: str) -> None:
        if val_data is not None:
            result[key] = float(evaluate(model, batches(val_data, None), device, progress=True)["top1"])

    top1(original, "top1_before")
    top1(pruned, "top1_pruned")
    if data is not None and recalibrate_bn > 0:
        result["recalibrated_bn_batches"] = recalibrate(pruned, batches(data, recalibrate_bn), device, recalibrate_bn)
        top1(pruned, "top1_recalibrated")
    pruned.cpu().eval()
    return result

"""The `score` recipe: score every prunable channel of a checkpoint with a criterion and save the scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.allocate import allocate, check_target
from ..engine.graph import build_graph
from ..engine.scores import Scores
from ..prune.scoring import (
    CriterionOptions,
    ResolvedCriterion,
    compute_scores,
    resolve_criterion,
    save_scores,
)
from ..support import distributed as D
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..checkpoint import refuse_nonfinite
from ..data import ClassesArg, parse_classes
from ..checkpoint.chanprune_format import resolve_normalization
from .steps import (
    FloatsArg,
    ShapeArg,
    calibration_loader,
    check_distinct_outputs,
    check_json_report,
    criterion_labels,
    load_model,
    parse_inputs,
    parse_output,
    resolve_input_shape,
    seed_everything,
    select_task_output,
)


@dataclass
class ScoreResult:
    """What `score_checkpoint` made: the score file and a per-group summary."""

    checkpoint: str
    output: str  # the score file (for `prune_checkpoint(scores=...)`)
    criterion: ResolvedCriterion
    ratio: float  # the summary's per-group ratio
    rows: list[dict[str, Any]]  # per prunable group: group, channels, min, median, max, removed_at_ratio
    data: dict[str, Any] | None  # source, batches, batch_size, seed (None: scored without data)
    seed: int
    scores: Scores


def score_checkpoint(
    checkpoint: str,
    criterion: str,
    *,
    criterion_options: CriterionOptions | None = None,
    out: str | None = None,
    ratio: float = 0.5,
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
    through_layernorm: bool = False,
    force: bool = False,
    json_report: str | None = None,
) -> ScoreResult | None:
    """Score every prunable channel with `criterion` (on `data` when it needs calibration data) and
    save the scores to `out` (default: CHECKPOINT-NAME.CRITERION.scores.safetensors in the working
    directory: checkpoints often sit in read-only shared folders). Without `mean`/`std`, those a
    chanprune checkpoint records are used.

    `criterion_options`: {"key": value} or ["key=value", ...]. `ratio` only shapes the summary (how
    many channels of each group it would remove). `classes`: the model's class names in output order,
    which label the data's classes when the criterion reads labels; `output` picks the task output of
    a model with several (else the recorded one). `through_layernorm` builds the channel groups as
    `prune_checkpoint(through_layernorm=True)` does (recorded in the file). Under torchrun the calibration batches are split
    over the processes and only rank 0 writes and gets a result (the others get None).
    `json_report` is where the caller will write the JSON report: checked before the slow steps."""
    if out is None:  # named so that scores of several checkpoints and criteria can coexist
        out = f"{Path(checkpoint).name}.{criterion}.scores.safetensors"
    check_target(ratio, None)
    shape, mean_t, std_t = parse_inputs(input_shape, mean, std)
    choice = parse_output(output)
    names = parse_classes(classes) if classes is not None else None
    check_json_report(json_report, force)
    resolved = resolve_criterion(criterion, criterion_options, has_data=data is not None, data_source=data)
    check_output(out, force)
    check_distinct_outputs(("--out", out), ("--json", json_report))
    seed_everything(seed)

    loaded = load_model(checkpoint, arch, arch_kwargs, trust_pickle)
    shape = resolve_input_shape(shape, loaded, data)
    mean_t, std_t = resolve_normalization(loaded.meta, mean_t, std_t)  # a flag wins over what the checkpoint records
    select_task_output(loaded, choice, shape)
    model = loaded.model.eval()
    refuse_nonfinite(model, "score")
    graph = build_graph(model, shape, through_layernorm=through_layernorm)
    labels = criterion_labels(resolved, loaded, shape, names) if data is not None else None
    loader = calibration_loader(data, input_shape=shape, mean=mean_t, std=std_t, batch_size=batch_size,
                                workers=workers, seed=seed, max_batches=calib_batches, labels=labels)
    # Under torchrun the calibration batches are split over the processes and the scores reduced
    # (weighted by batches); rank 0 writes. A plain run is one process of one.
    with D.distributed_session(resolve_device(device)) as (env, run_device):
        if env.distributed and loader is not None:
            loader = D.ShardedBatches(loader, env)
        scores = compute_scores(model, graph, resolved, loader, run_device, seed=seed)
        if env.distributed:
            scores = D.reduce_scores(scores, loader.batches if loader is not None else 1, env)
    if not env.is_main:
        return None
    data_record = None if data is None else {"source": data, "batches": calib_batches, "batch_size": batch_size, "seed": seed}
    save_scores(out, scores, graph, model, criterion=criterion, options=resolved.recorded_options, data=data_record,
                force=force, through_layernorm=through_layernorm)
    removal = allocate(graph, scores, ratio=ratio).plan
    rows = [{"group": g.name, "channels": g.channels, "min": float(scores[g.id].min()), "median": float(scores[g.id].median()),
             "max": float(scores[g.id].max()), "removed_at_ratio": len(removal.get(g.id, []))} for g in graph.prunable_groups()]
    return ScoreResult(checkpoint, out, resolved, ratio, rows, data_record, seed, scores)

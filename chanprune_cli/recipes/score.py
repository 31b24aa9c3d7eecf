"""The `score` recipe: score every prunable channel of a checkpoint with a criterion and save the scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..criteria.base import NEEDS_WEIGHTS
from ..engine.allocate import AllocationOptions, allocate
from ..engine.graph import build_graph
from ..engine.scores import Scores
from ..prune.scoring import CriterionOptions, ResolvedCriterion, compute_scores, resolve_criterion, save_scores
from ..support import distributed as D
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..support.progress import batches_total, busy
from .opening import ModelOptions, open_model
from .steps import DataOptions, check_distinct_outputs, check_json_report, recipe_entry, say, seed_everything

__all__ = ["ResolvedCriterion", "ScoreOptions", "ScoreResult", "score_checkpoint"]


@dataclass(frozen=True)
class ScoreOptions:
    """What `score_checkpoint` does besides the checkpoint; names and defaults as the options of
    `chanprune score`. `criterion_options`: {"key": value} or ["key=value", ...]. `out` (None:
    CHECKPOINT-NAME.CRITERION.scores.safetensors in the working directory: checkpoints often sit in
    read-only shared folders). `ratio` only shapes the summary (how many channels of each group it
    would remove). `through_layernorm` builds the channel groups as prune's does (recorded in the
    file). `json_report`: where the caller will write the JSON report, checked before the slow steps."""

    criterion: str
    criterion_options: CriterionOptions | None = None
    out: str | None = None
    ratio: float = 0.5
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    through_layernorm: bool = False
    force: bool = False
    json_report: str | None = None

    def __post_init__(self) -> None:
        AllocationOptions(ratio=self.ratio)  # the summary's ratio is checked as --ratio
        # the name, its options and whether it gets the data it needs (the recipe checks the data's labels)
        resolve_criterion(self.criterion, self.criterion_options, has_data=self.data.data is not None)


@dataclass
class ScoreResult:
    """What `score_checkpoint` made: the score file and a per-group summary."""

    checkpoint: str
    output: str  # the score file (for `PruneOptions(scores=...)`)
    criterion: ResolvedCriterion
    ratio: float  # the summary's per-group ratio
    rows: list[dict[str, Any]]  # per prunable group: group, channels, min, median, max, removed_at_ratio
    data: dict[str, Any] | None  # source, batches, batch_size, seed (None: scored without data)
    seed: int
    scores: Scores


@recipe_entry
def score_checkpoint(checkpoint: str, options: ScoreOptions) -> ScoreResult | None:
    """Score every prunable channel with `options.criterion` (on the data when it needs calibration
    data) and save the scores. Without `mean`/`std`, those a chanprune checkpoint records are used;
    `classes` label the data's classes when the criterion reads labels. Under torchrun the
    calibration batches are split over the processes and only rank 0 writes and gets a result (the
    others get None)."""
    o, data = options, options.data
    # named so that scores of several checkpoints and criteria can coexist
    out = o.out if o.out is not None else f"{Path(checkpoint).name}.{o.criterion}.scores.safetensors"
    check_json_report(o.json_report, o.force)
    resolved = resolve_criterion(o.criterion, o.criterion_options, has_data=data.data is not None,
                                 data_source=data.data)
    check_output(out, o.force)
    check_distinct_outputs(("--out", out), ("--json", o.json_report))
    seed_everything(data.seed)

    opened = open_model(checkpoint, o.model, data=data.data, refuse="score")
    model = opened.model.eval()
    with busy("tracing the channel graph"):
        graph = build_graph(model, opened.input_shape, through_layernorm=o.through_layernorm)
    loader = None if data.data is None else opened.loader(data.data, data, max_batches=data.calib_batches,
                                                          labels=opened.criterion_labels(resolved))
    if loader is not None and resolved.criterion is not None and resolved.criterion.requires(resolved.options) != NEEDS_WEIGHTS:
        say(_scoring_line(o.criterion, loader, data))
    # Under torchrun the calibration batches are split over the processes and the scores reduced
    # (weighted by batches); rank 0 writes. A plain run is one process of one.
    with D.distributed_session(resolve_device(o.model.device)) as (env, run_device):
        if env.distributed and loader is not None:
            loader = D.ShardedBatches(loader, env)
        scores = compute_scores(model, graph, resolved, loader, run_device, seed=data.seed)
        if env.distributed:
            scores = D.reduce_scores(scores, loader.batches if loader is not None else 1, env)
    if not env.is_main:
        return None
    data_record = None if data.data is None else {"source": data.data, "batches": data.calib_batches,
                                                  "batch_size": data.batch_size, "seed": data.seed}
    save_scores(out, scores, graph, model, criterion=o.criterion, options=resolved.recorded_options, data=data_record,
                force=o.force, through_layernorm=o.through_layernorm)
    removal = allocate(graph, scores, AllocationOptions(ratio=o.ratio)).plan
    rows = [{"group": g.name, "channels": g.channels, "min": float(scores[g.id].min()),
             "median": float(scores[g.id].median()), "max": float(scores[g.id].max()),
             "removed_at_ratio": len(removal.get(g.id, []))} for g in graph.prunable_groups()]
    return ScoreResult(checkpoint, out, resolved, o.ratio, rows, data_record, data.seed, scores)


def _scoring_line(criterion: str, loader: Any, data: DataOptions) -> str:
    """What a data-driven criterion is about to read: every image of the data unless --calib-batches
    bounds it (a whole training set takes a long while)."""
    batches = batches_total(loader, data.calib_batches)
    images = len(loader.dataset) if batches is None or data.calib_batches is None else batches * data.batch_size
    if data.calib_batches is None:
        return (f"scoring with {criterion} on all {images:,} images of {data.data} ({batches} batches of "
                f"{data.batch_size}); --calib-batches N scores on N random batches")
    return f"scoring with {criterion} on {batches} random batches of {data.batch_size} images of {data.data}"

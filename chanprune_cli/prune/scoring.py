"""Scoring channels and keeping the scores: resolve a criterion, compute with it, save, load and check.

A criterion is looked up once (`resolve_criterion`, or `recorded_criterion` for scores made
earlier) into a `ResolvedCriterion` that scoring, pruning and the reports share.

A score file is one safetensors file: a tensor per channel group (keyed by the group's name) and
JSON metadata naming the criterion, its options, the data and a fingerprint of the model, so that
`prune --scores` can refuse scores made for a different model.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import load_state_dict_file, safetensors_metadata, tool_version
from ..criteria import Criterion, available, check_requirements, get_criterion
from ..criteria.base import NEEDS_LABELS, NEEDS_WEIGHTS, Batch, parse_criterion_opts
from ..data.base import DataWarning
from ..engine.graph import ChannelGraph
from ..engine.scores import Scores, WeightedScores, channel_scales, group_weights
from ..errors import UserError
from ..support.fsutil import atomic_path, check_output

SCORES_FORMAT = "chanprune-scores"
SCORES_VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter/buffer names, shapes and values: equal only for the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


CriterionOptions = Mapping[str, Any] | Sequence[str]  # {"sigma": 0.5} or ["sigma=0.5"] (`--criterion-opt`)


@dataclass(frozen=True)
class ResolvedCriterion:
    """A criterion looked up once, with its options: what scoring, pruning and the reports use."""

    name: str
    criterion: Criterion | None  # None: scores recorded by a criterion this chanprune does not know
    options: dict[str, Any]  # as given (typed); what the criterion is called with
    recorded_options: dict[str, Any]  # as score files, histories and reports record them (defaults filled in)

    def normalize_mode(self, choice: str) -> str:
        """`--normalize` (checked by `engine.allocate.AllocationOptions`): "mean" or "none" as given;
        "auto" is "none" for scores in loss units (comparable across layers as they are) and "mean"
        for the others."""
        if choice != "auto":
            return choice
        return "none" if self.criterion is not None and self.criterion.in_loss_units(dict(self.options)) else "mean"

    @property
    def reads_activations(self) -> bool:
        """Whether the scores depend on activations (and so on BatchNorm statistics), not weights alone."""
        return self.criterion is not None and self.criterion.requires(self.options) != NEEDS_WEIGHTS


def resolve_criterion(name: str, options: CriterionOptions | None = None, *, has_data: bool,
                      data_source: str | None = None) -> ResolvedCriterion:
    """Look `name` up, parse its options (typed like their defaults) and check that it gets the data
    it needs (`data_source`, a `--data` string, is also checked for labels where they are needed)."""
    crit = get_criterion(name)
    parsed = parse_criterion_opts(crit, options)
    check_requirements(crit, has_data, options=parsed, data_source=data_source)
    return ResolvedCriterion(name, crit, parsed, {**crit.defaults, **parsed})


def recorded_criterion(name: str, options: Mapping[str, Any] | None = None) -> ResolvedCriterion:
    """The criterion that made existing scores, with the options recorded with them; an unknown
    name (scores from another version) is kept as it is."""
    registry = available()
    recorded = dict(options or {})
    return ResolvedCriterion(name, registry[name]() if name in registry else None, recorded, recorded)


def compute_scores(model: nn.Module, graph: ChannelGraph, criterion: str | ResolvedCriterion,
                   data: Iterable[Batch] | None, device: torch.device, *, seed: int = 0,
                   options: CriterionOptions | None = None) -> Scores:
    """Score every prunable group with `criterion` (a name with `options`, or resolved); the model
    is left as it was. Synthetic data given to a criterion that reads data is used with a warning."""
    if isinstance(criterion, ResolvedCriterion):
        if options is not None:
            raise TypeError("compute_scores: a resolved criterion carries its options; pass options=None")
        crit = criterion
    else:
        crit = resolve_criterion(criterion, options, has_data=data is not None)
    scorer = crit.criterion or get_criterion(crit.name)  # a recorded, unknown name fails here
    _warn_if_synthetic(scorer, crit.options, data)
    was_training = model.training
    try:
        scores = scorer.score(model, graph, data, device, seed=seed, **crit.options)
    finally:
        model.train(was_training)
    result = WeightedScores({gid: s.detach().double().cpu() for gid, s in scores.items()})
    result.group_weights = group_weights(scores)
    scales = channel_scales(scores)
    if scales:
        result.channel_scale = {gid: s.detach().double().cpu() for gid, s in scales.items()}
    return result


def _warn_if_synthetic(scorer: Criterion, options: Mapping[str, Any], data: Iterable[Batch] | None) -> None:
    # Here, where data meets the criterion, rather than in resolve_criterion: a --data that then
    # fails to open must fail with its one error line alone.
    dataset = getattr(data, "dataset", None)
    needs = scorer.requires(dict(options))
    if needs == NEEDS_WEIGHTS or getattr(dataset, "kind", None) != "synthetic":
        return
    noise = "random noise with random labels" if needs == NEEDS_LABELS else "random noise"
    warnings.warn(DataWarning(
        f"{dataset.source} is {noise}: criterion {scorer.name!r} ranks channels by how they respond to it, not to "  # type: ignore[union-attr]
        "the model's task; pass images of the task with --data for scores worth pruning by"), stacklevel=3)


def save_scores(path: str, scores: Scores, graph: ChannelGraph, model: nn.Module, *, criterion: str,
                options: dict[str, Any], data: dict[str, Any] | None, force: bool = False,
                through_layernorm: bool = False) -> None:
    """Write a score file; `through_layernorm` records how `graph` was built (prune --scores must
    build the same groups)."""
    check_output(path, force)
    names = {g.id: g.name for g in graph.groups}
    tensors = {f"group/{names[gid]}": s.contiguous() for gid, s in scores.items()}
    tensors.update({f"scale/{names[gid]}": s.double().contiguous() for gid, s in channel_scales(scores).items()})
    meta = {
        "format": SCORES_FORMAT,
        "format_version": SCORES_VERSION,
        "criterion": criterion,
        "options": options,
        "data": data,
        "model_fingerprint": model_fingerprint(model),
        "input_shape": list(graph.input_shape),
        "groups": {names[gid]: int(s.numel()) for gid, s in scores.items()},
        "group_weights": {names[gid]: w for gid, w in group_weights(scores).items()},
        "through_layernorm": through_layernorm,
        "tool_version": tool_version(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"chanprune_scores": json.dumps(meta, default=str)})


def read_scores_meta(path: str) -> dict[str, Any]:
    from pathlib import Path

    if not Path(path).exists():
        raise UserError(f"score file {path} does not exist; make one with `chanprune score` or check the path")
    meta = safetensors_metadata(path)
    raw = (meta or {}).get("chanprune_scores")
    if raw is None:
        raise UserError(f"{path} is not a chanprune score file (make one with `chanprune score`)")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: score metadata is not valid JSON ({exc.msg}); re-run `chanprune score`") from exc
    except RecursionError:
        raise UserError(f"{path}: score metadata is not valid JSON (nested too deeply); re-run `chanprune score`") from None
    version = info.get("format_version", 0) if isinstance(info, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"{path}: score metadata is malformed (no integer format_version); re-run `chanprune score`")
    if version > SCORES_VERSION:
        raise UserError(f"{path} was made by a newer chanprune (score format {info.get('format_version')}); upgrade chanprune")
    return info


def load_scores(path: str, graph: ChannelGraph, model: nn.Module) -> tuple[Scores, dict[str, Any]]:
    """Scores for `graph`'s groups; UserError when they were made for another model."""
    info = read_scores_meta(path)
    if info.get("model_fingerprint") != model_fingerprint(model):
        raise UserError(f"{path} holds scores for a different model (weights differ); re-run `chanprune score` on this checkpoint")
    tensors = load_state_dict_file(path)  # validates the safetensors header first
    scores = WeightedScores()
    weights = info.get("group_weights") or {}
    scores.group_weights = {g.id: float(weights[g.name]) for g in graph.prunable_groups() if g.name in weights}
    for g in graph.prunable_groups():
        s = tensors.get(f"group/{g.name}")
        if s is None or s.numel() != g.channels:
            raise UserError(f"{path} has no scores matching channel group {g.name}; re-run `chanprune score` on this checkpoint")
        scores[g.id] = s.double()
    scales = {g.id: tensors[f"scale/{g.name}"].double() for g in graph.prunable_groups()
              if f"scale/{g.name}" in tensors and tensors[f"scale/{g.name}"].numel() == g.channels}
    if scales:
        scores.channel_scale = scales
    return scores, info

"""The `analyze` recipe: layers, params, MACs, channel groups and (with data) accuracy of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import measure
from ..checkpoint import nonfinite_summary
from ..engine.graph import build_graph
from ..measure import model_size_bytes
from ..prune.describe import LayerRow, group_rows, layer_rows
from ..support.device import resolve_device
from ..support.progress import busy
from .opening import ModelOptions, open_model
from .steps import DataOptions, chance_warning, check_json_report, recipe_entry, seed_everything, warn

if TYPE_CHECKING:
    from ..models import ArchSpec

__all__ = ["AnalyzeOptions", "AnalyzeResult", "analyze_checkpoint"]


@dataclass(frozen=True)
class AnalyzeOptions:
    """What `analyze_checkpoint` does besides the checkpoint; names and defaults as the options of
    `chanprune analyze`. With `data.data`, accuracy is measured on (at most `data.calib_batches`
    random batches of) it. `through_layernorm`: the channel groups `prune --through-layernorm`
    would use. `json_report`: where the caller will write the JSON report, checked (with `force`)
    before the slow steps, not written here."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    through_layernorm: bool = False
    force: bool = False
    json_report: str | None = None


@dataclass
class AnalyzeResult:
    """What `analyze_checkpoint` found: the model's structure, size and (with data) accuracy."""

    checkpoint: str
    source_format: str
    arch: ArchSpec | None
    input_shape: tuple[int, int, int]
    params: int
    macs: int
    size_bytes: int
    layers: list[LayerRow]
    seed: int | None = None
    accuracy: dict[str, Any] | None = None  # top1, top5 (0-100), images, data, max_batches, normalization
    groups: list[dict[str, Any]] | None = None  # prune.describe.group_rows(graph)
    warnings: list[str] = field(default_factory=list)  # e.g. data converted to the model's input, top-1 at chance

    @property
    def size_mb(self) -> float:
        return self.size_bytes / float(1 << 20)  # MiB, labelled MB as most tools do (measure.file_size_mb)


@recipe_entry
def analyze_checkpoint(checkpoint: str, options: AnalyzeOptions | None = None) -> AnalyzeResult:
    """Describe a checkpoint's model; with data, also its top-1/top-5, the data's classes matched to
    the model's outputs (by `options.model.classes`, else the recorded names; see `data.fit_classes`).
    NaN/Inf weights are reported with a warning, not refused; so is a top-1 no better than chance."""
    o = options or AnalyzeOptions()
    data = o.data.data
    check_json_report(o.json_report, o.force)
    dev = resolve_device(o.model.device)  # a device this machine lacks fails here, data or not
    seed_everything(o.data.seed)

    opened = open_model(checkpoint, o.model, data=data)
    model, shape = opened.model.eval(), opened.input_shape
    bad = nonfinite_summary(model)
    if bad is not None:  # analyze still reports the structure; score and prune refuse such a model
        warn(f"the model has NaN/Inf weights in {bad}; score and prune will refuse it")
    # Open the data before the slow analysis steps, so that bad data fails first.
    labels = opened.labels() if data is not None else None
    loader = None if data is None else opened.loader(data, o.data, max_batches=o.data.calib_batches, labels=labels)
    with busy("counting MACs per layer"):
        macs = measure.count_macs(model, shape)
        rows = layer_rows(model, measure.per_module_macs(model, shape))
    with busy("tracing the channel graph"):
        groups = group_rows(build_graph(model, shape, through_layernorm=o.through_layernorm))

    accuracy: dict[str, Any] | None = None
    if loader is not None:
        result = measure.evaluate(model, loader, dev, max_batches=o.data.calib_batches, progress=True)
        accuracy = {"top1": float(result["top1"]), "top5": float(result["top5"]), "images": int(result["images"]),
                    "data": data, "max_batches": o.data.calib_batches,
                    "normalization": {"mean": list(loader.dataset.mean), "std": list(loader.dataset.std)}}
        at_chance = chance_warning(accuracy["top1"], accuracy["images"], labels.outputs if labels else None, data)
        if at_chance is not None:
            warn(at_chance)
    return AnalyzeResult(checkpoint=checkpoint, source_format=opened.loaded.source_format, arch=opened.loaded.arch,
                         input_shape=shape, params=measure.count_params(model), macs=macs,
                         size_bytes=model_size_bytes(model), layers=rows, seed=o.data.seed, accuracy=accuracy,
                         groups=groups)

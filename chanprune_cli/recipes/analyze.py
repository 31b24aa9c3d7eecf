"""The `analyze` recipe: layers, params, MACs, channel groups and (with data) accuracy of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import measure
from ..engine.graph import build_graph
from ..measure import model_size_bytes
from ..prune.describe import LayerRow, group_rows, layer_rows
from ..support.device import resolve_device
from ..checkpoint import nonfinite_summary
from ..checkpoint.chanprune_format import resolve_normalization
from ..data import ClassesArg, parse_classes
from .steps import (
    FloatsArg,
    ShapeArg,
    check_json_report,
    eval_loader,
    load_model,
    model_labels,
    parse_inputs,
    parse_output,
    resolve_input_shape,
    seed_everything,
    select_task_output,
    warn,
)

if TYPE_CHECKING:
    from ..models import ArchSpec


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
    accuracy: dict[str, Any] | None = None  # top1, top5 (0-100), images, data, max_batches
    groups: list[dict[str, Any]] | None = None  # prune.describe.group_rows(graph)

    @property
    def size_mb(self) -> float:
        return self.size_bytes / float(1 << 20)  # MiB, labelled MB as most tools do (measure.file_size_mb)


def analyze_checkpoint(
    checkpoint: str,
    *,
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
) -> AnalyzeResult:
    """Describe a checkpoint's model; with `data`, also its top-1/top-5 on (at most `calib_batches`
    random batches of) it, its classes matched to the model's outputs by `classes` (the model's
    class names in output order; see `data.fit_classes`). NaN/Inf weights are reported with a
    warning, not refused. `output` picks the task output of a model with several; without
    `mean`/`std`/`input_shape`/`output`, those the checkpoint records are used (an input shape also
    from `data`). `through_layernorm` shows the channel groups `prune --through-layernorm` would use.

    `json_report` is where the caller will write the JSON report: checked (with `force`) before
    the slow steps, not written here."""
    # Validate every option before the slow steps (loading, tracing, evaluating).
    shape, mean_t, std_t = parse_inputs(input_shape, mean, std)
    choice = parse_output(output)
    names = parse_classes(classes) if classes is not None else None
    check_json_report(json_report, force)
    dev = None
    if data is not None:
        dev = resolve_device(device)
    seed_everything(seed)

    loaded = load_model(checkpoint, arch, arch_kwargs, trust_pickle)
    shape = resolve_input_shape(shape, loaded, data)
    mean_t, std_t = resolve_normalization(loaded.meta, mean_t, std_t)  # a flag wins over what the checkpoint records
    select_task_output(loaded, choice, shape)
    model = loaded.model.eval()
    bad = nonfinite_summary(model)
    if bad is not None:  # analyze still reports the structure; score and prune refuse such a model
        warn(f"the model has NaN/Inf weights in {bad}; score and prune will refuse it")
    # Open --data before the slow analysis steps, so that bad data fails first.
    loader = None if data is None else eval_loader(data, input_shape=shape, mean=mean_t, std=std_t,
                                                   batch_size=batch_size, workers=workers, seed=seed,
                                                   max_batches=calib_batches, labels=model_labels(loaded, shape, names))
    macs = measure.count_macs(model, shape)
    rows = layer_rows(model, measure.per_module_macs(model, shape))
    groups = group_rows(build_graph(model, shape, through_layernorm=through_layernorm))

    accuracy: dict[str, Any] | None = None
    if loader is not None:
        result = measure.evaluate(model, loader, dev, max_batches=calib_batches, progress=True)
        accuracy = {
            "top1": float(result["top1"]),
            "top5": float(result["top5"]),
            "images": int(result["images"]),
            "data": data,
            "max_batches": calib_batches,
        }
    return AnalyzeResult(
        checkpoint=checkpoint,
        source_format=loaded.source_format,
        arch=loaded.arch,
        input_shape=shape,
        params=measure.count_params(model),
        macs=macs,
        size_bytes=model_size_bytes(model),
        layers=rows,
        seed=seed,
        accuracy=accuracy,
        groups=groups,
    )

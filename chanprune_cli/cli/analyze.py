"""`chanprune analyze`: layers, params, MACs, channel groups and accuracy of a checkpoint."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .common import (
    MODEL_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    BatchSizeOpt,
    CalibBatchesOpt,
    CkptArg,
    ConfigOpt,
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
    check_json_out,
    examples,
    load_model,
    make_eval_loader,
    print_archs,
    resolve_input_shape,
    seed_everything,
)


@app.command(
    epilog=examples(
        ("layers, params, MACs and accuracy of a CIFAR ResNet-56 state dict",
         "chanprune analyze resnet56.th --arch cifar_resnet56 --data cifar10-test.tar.gz --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"),
        ("a torchvision model with 10 classes, report as JSON",
         "chanprune analyze model.pt --arch torchvision:resnet18 --arch-kwargs '{\"num_classes\": 10}' --input-shape 3,224,224 --json report.json"),
        ("quick accuracy estimate on 5 random batches",
         "chanprune analyze model.pt --arch cifar_resnet20 --data test/ --calib-batches 5 --batch-size 100"),
        ("the built-in architectures", "chanprune analyze --list-archs"),
    ),
)
def analyze(
    ckpt: CkptArg = None,
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
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List the built-in architectures and exit.", rich_help_panel=MODEL_PANEL)] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show a model's layers, parameters, MACs, size and (with --data) top-1/top-5 accuracy."""
    if list_archs:
        print_archs()
        return
    if ckpt is None:
        raise typer.BadParameter("give a checkpoint path (or --list-archs)", param_hint="'CKPT'")

    # Validate every option before the slow steps (loading, tracing, evaluating).
    from ..data import parse_floats, parse_shape

    shape = parse_shape(input_shape) if input_shape is not None else None
    mean_t = parse_floats(mean, name="mean") if mean is not None else None
    std_t = parse_floats(std, name="std") if std is not None else None
    check_json_out(json_out, force)
    dev = None
    if data is not None:
        from ..support.device import resolve_device

        dev = resolve_device(device)
    seed_everything(seed)

    from .. import measure
    from ..report import (
        AnalyzeReport,
        analyze_document,
        layer_rows,
        make_console,
        model_size_bytes,
        render_analyze,
        write_json,
    )

    loaded = load_model(ckpt, arch, arch_kwargs, trust_pickle)
    shape = resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    from ..checkpoint import nonfinite_tensors

    bad = nonfinite_tensors(model)
    if bad:  # analyze still reports the structure; score and prune refuse such a model
        typer.echo(f"warning: the model has NaN/Inf weights in {', '.join(bad[:3])}"
                   f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}; score and prune will refuse it", err=True)
    # Open --data before the slow analysis steps, so that bad data fails first.
    loader = None if data is None else make_eval_loader(
        data, input_shape=shape, mean=mean_t, std=std_t, batch_size=batch_size, workers=workers, seed=seed,
        max_batches=calib_batches)
    macs = measure.count_macs(model, shape)
    rows = layer_rows(model, measure.per_module_macs(model, shape))
    from ..engine.graph import build_graph
    from ..report import group_rows

    groups = group_rows(build_graph(model, shape))

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

    report = AnalyzeReport(
        checkpoint=ckpt,
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
    # With `--json -` stdout carries only the JSON document, so the table goes to stderr.
    render_analyze(report, make_console(stderr=json_out == "-"))
    if json_out is not None:
        write_json(analyze_document(report), json_out)

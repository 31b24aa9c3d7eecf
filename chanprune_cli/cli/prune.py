"""`chanprune prune`: remove channels, verify against the masked original, save a chanprune file."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Optional

import typer

from ..errors import GateFailed, UserError
from . import options as opt
from .app import app
from .configfiles import prefer_flags

LATENCY_PANEL = "Latency (every plan is timed against the original on this target)"

def _layer_ratio_value(value: Any) -> Any:
    """A --layer-ratio value as given: a GLOB=R string, or a {GLOB = R} table from a config file
    (which Click would otherwise turn into its Python text). The recipe validates both."""
    return value


def _round_to_value(value: str) -> str:
    """--round-to: a whole number of channels (at least 1) or auto, checked as Click checks a value
    (so that a config file's bad value names the key that set it)."""
    text = str(value).strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise typer.BadParameter(f"{value!r} is neither a whole number of channels of at least 1 nor auto")
    return text


@app.command(
    epilog=opt.examples(
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
        ("half of every layer group's channels, but 70 % of the last stage's inner ones and none of the first block's",
         "chanprune prune resnet56.th --arch cifar_resnet56 --ratio 0.5 --layer-ratio 'layer3.*=0.7' --layer-ratio 'layer1.0.*=0'"),
        ("half the latency at batch 1 as PyTorch runs it on this CPU (measured, corrected until it holds)",
         "chanprune prune model.pt --arch torchvision:resnet50 --criterion l1 --target-latency 0.5 --out r50-fast.safetensors"),
        ("12 ms per image in ONNX Runtime on 4 threads, with the latency staircases of the costliest layers",
         "chanprune prune model.pt --arch torchvision:mobilenet_v2 --target-latency 12ms --latency-runtime onnxruntime --threads 4 --plot stairs.png"),
        ("see the plan (widths, MACs, params) without writing anything",
         "chanprune prune resnet56.th --arch cifar_resnet56 --target-flops 0.5 --dry-run --json -"),
        ("top-1 before, after pruning and after BN recalibration on 1000 random test images",
         "chanprune prune resnet56.th --arch cifar_resnet56 --ratio 0.5 --data train.tar.gz --val-data test.tar.gz --val-images 1000"),
        ("a YOLO checkpoint as ultralytics writes it (a whole pickled model): written back as a .pt that YOLO() loads",
         "chanprune prune yolov8n.pt --trust-pickle --input-shape 3,640,640 --target-flops 0.3 --out yolov8n-pruned.pt"),
    ),
)
@opt.shared_options
def prune(
    ckpt: opt.CkptArg = None,
    criterion: opt.CriterionOpt = None,
    criterion_opt: opt.CriterionOptionOpt = None,
    scores_path: Annotated[Optional[str], typer.Option("--scores", metavar="S", help="Scores from chanprune score (instead of --criterion).", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", metavar="R", help="Remove this fraction of the channels of every prunable group (0 < R < 1).", show_default=False)] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", metavar="F", help="Remove this fraction of the MACs by one global ranking (0 < F < 1).", show_default=False)] = None,
    target_latency: Annotated[Optional[str], typer.Option("--target-latency", metavar="R|TIME", help="Make the model run in this fraction R of the original's latency (0 < R < 1), or in TIME (e.g. 12ms), on the latency target (--latency-runtime, --latency-batch, --device): each layer is timed at a grid of widths (cached), channels go where they cost most time for least importance, and the pruned model is timed against the original and corrected until the measured ratio is within 0.02 of the target (an error when no attempt comes within 0.05).", show_default=False)] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", metavar="GLOB", help="Never remove channels produced by modules matching GLOB (repeatable).", show_default=False)] = None,
    through_layernorm: opt.ThroughLayerNormOpt = False,
    layer_ratio: Annotated[Optional[list[str]], typer.Option("--layer-ratio", metavar="GLOB=R", parser=_layer_ratio_value, help="Remove the fraction R (0 <= R < 1; 0 keeps them whole) of the channels of every layer group all of whose producer layers match GLOB, e.g. 'layer3.*=0.7' (repeatable; the last matching GLOB wins; a residual stream shared by several stages matches only a GLOB covering all of them, e.g. '*'). With --ratio: instead of it. With --target-flops: at that fixed ratio, outside the global ranking, which removes what the target still needs from the other groups. In a config file: a list of GLOB=R strings or a table {GLOB = R} (as a flag, also a JSON object). --min-keep and --round-to still apply.", show_default=False)] = None,
    min_keep: Annotated[float, typer.Option("--min-keep", metavar="X", help="Every layer keeps at least X of its channels: a fraction (<1) or a count.")] = 0.1,
    round_to: Annotated[str, typer.Option("--round-to", metavar="N|auto", callback=_round_to_value, help="Kept widths are multiples of N (fast kernels like multiples of 8). auto: the multiple the latency target's kernels favour (8 on CUDA and AVX2 CPUs, 16 with AVX-512), as its latency tables are measured.")] = "1",
    cost_exponent: Annotated[float, typer.Option("--cost-exponent", metavar="E", min=0.0, max=1.0, help="With --target-flops: rank channels by importance / (MACs a channel costs)^E. 0: importance only; 1: importance per MAC; values in between trade the two. Which value works best depends on the model and criterion (measurements: BENCHMARKS.md).")] = 0.0,
    normalize: Annotated[str, typer.Option("--normalize", metavar="auto|mean|none", help="With --target-flops: divide each layer group's scores by their mean before the global ranking (mean) or rank them as they are (none). auto: none for scores in loss units (taylor, sensitivity with the Fisher Hessian), whose raw values compare across layers, mean for the others.")] = "auto",
    rounds: Annotated[int, typer.Option("--rounds", metavar="N", min=1, help="With --target-flops and --criterion: reach the target in N rounds, rescoring between them the model with the channels chosen so far masked (its BatchNorm statistics re-estimated on --data first, see --recalibrate-bn); each layer's scores are normalised over its surviving channels. Surgery and verification happen once. Whether rounds help depends on the criterion (measurements: BENCHMARKS.md).")] = 1,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the equivalence check of pruned vs masked original.")] = False,
    recalibrate_bn: Annotated[int, typer.Option("--recalibrate-bn", metavar="N", min=0, help="After surgery, re-estimate BatchNorm statistics on N batches of --data (0: off; needs --data).")] = 20,
    val_data: Annotated[Optional[str], typer.Option("--val-data", metavar="VAL", help="Report top-1 before pruning, after it, and after BN recalibration on this data.", rich_help_panel=opt.DATA_PANEL, show_default=False)] = None,
    val_images: Annotated[Optional[int], typer.Option("--val-images", metavar="N", min=1, help="Evaluate --val-data on a fixed random subset of N images (drawn with --seed; the same images in all three passes).", rich_help_panel=opt.DATA_PANEL, show_default=False)] = None,
    out: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Pruned checkpoint (default: CKPT-STEM.pruned.safetensors in the working directory; a whole pickled model, e.g. a YOLO .pt, is written back into its own container: CKPT-STEM.pruned.pt).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    latency_runtime: Annotated[str, typer.Option("--latency-runtime", metavar="torch|onnxruntime|tensorrt", help="Where the model ships: PyTorch (as chanprune bench times it), ONNX Runtime's CPU provider (needs onnxruntime; the model is exported and checked as chanprune export does), or TensorRT (CUDA, needs torch_tensorrt).", rich_help_panel=LATENCY_PANEL)] = "torch",
    latency_batch: Annotated[int, typer.Option("--latency-batch", metavar="B", min=1, help="Batch size the latency is measured at.", rich_help_panel=LATENCY_PANEL)] = 1,
    latency_dtype: Annotated[str, typer.Option("--latency-dtype", metavar="fp32|fp16|bf16", help="Precision the model is timed in with --latency-runtime torch (fp16 also for tensorrt), as chanprune bench --dtype.", rich_help_panel=LATENCY_PANEL)] = "fp32",
    latency_channels_last: Annotated[bool, typer.Option("--latency-channels-last", help="Time in channels-last (NHWC) memory order, as GPU deployments usually run.", rich_help_panel=LATENCY_PANEL)] = False,
    plot: Annotated[Optional[str], typer.Option("--plot", metavar="PNG", help="Draw the latency-vs-width staircase of the costliest layer groups with the plan's widths (.png, .svg or .pdf; needs matplotlib; times the latency tables when --target-latency did not).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    model: opt.ModelOptions = opt.MODEL,
    data: opt.DataOptions = opt.DATA,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 when --target-flops is missed by more than a point of the MACs (the output and the report are still written; without it, a warning says by how much and what stopped it).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan (per-layer widths, params, MACs; verified, with BN recalibration and top-1 as asked) and write nothing: no --out file, no .chanprune/last.json entry; the report and --json still are.", rich_help_panel=opt.OUTPUT_PANEL)] = False,
    outputs: opt.Outputs = opt.OUTPUTS,
    config: opt.ConfigOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Remove channels physically, prove the result equals the masked original, save it."""
    ratio, target_flops, target_latency = prefer_flags(ratio=ratio, target_flops=target_flops,
                                                       target_latency=target_latency).values()
    criterion, scores_path = prefer_flags(criterion=criterion, scores_path=scores_path).values()
    chained = _from_last_score(ckpt, criterion, scores_path)
    if chained is not None:  # the scored checkpoint, loaded as it was scored (flags given here still win)
        ckpt, scores_path = chained["checkpoint"], chained["scores"]
        model = dataclasses.replace(
            model, arch=model.arch or chained.get("arch"), arch_kwargs=model.arch_kwargs or chained.get("arch_kwargs"),
            input_shape=model.input_shape or chained.get("input_shape"), mean=model.mean or chained.get("mean"),
            std=model.std or chained.get("std"), trust_pickle=model.trust_pickle or bool(chained.get("trust_pickle")),
            output=model.output or chained.get("output"))
        through_layernorm = through_layernorm or bool(chained.get("through_layernorm"))
    if ckpt is None:
        raise UserError("no checkpoint given and no earlier 'chanprune score' in this directory; run e.g. "
                        "'chanprune score CKPT --criterion l1' then 'chanprune prune --ratio 0.5', "
                        "or 'chanprune prune CKPT --criterion l1 --ratio 0.5'")
    from ..deploy.benchmark import Deployment
    from ..deploy.runtimes import LatencyTarget
    from ..project.state import absolute, record, record_model
    from ..recipes.prune import AllocationOptions, PruneOptions, prune_checkpoint
    from ..report import prune as report

    allocation = AllocationOptions(ratio=ratio, target_flops=target_flops, target_latency=target_latency,
                                   layer_ratio=layer_ratio, min_keep=min_keep, round_to=round_to,
                                   cost_exponent=cost_exponent, normalize=normalize, rounds=rounds, ignore=ignore or ())
    latency = LatencyTarget(runtime=latency_runtime, batch=latency_batch, threads=model.threads,
                            deployment=Deployment(dtype=latency_dtype, channels_last=latency_channels_last))
    options = PruneOptions(allocation, criterion=criterion, criterion_options=criterion_opt, scores=scores_path,
                           through_layernorm=through_layernorm, verify=not no_verify, recalibrate_bn=recalibrate_bn,
                           val_data=val_data, val_images=val_images, out=out, model=model, data=data, force=outputs.force,
                           json_report=outputs.json_report, dry_run=dry_run, latency=latency, plot=plot)
    result = prune_checkpoint(ckpt, options)
    if result.output is not None:  # a dry run leaves nothing for a later command to pick up
        record("prune", {"checkpoint": absolute(ckpt), "scores": absolute(scores_path),
                         "criterion": result.criterion.name, "out": absolute(result.output)})
        record_model("prune", ckpt, result.output)
    report.show(result, outputs.json_report)
    if strict and result.target_missed is not None:
        raise GateFailed(result.target_missed)


def _from_last_score(ckpt: str | None, criterion: str | None, scores_path: str | None) -> dict[str, Any] | None:
    """The last `chanprune score` here, when this prune names no checkpoint, scores or criterion.
    Says so in one line; so does a prune of the scored checkpoint, which scores with the default."""
    from ..project.state import read_state, same_file, shown

    last = read_state().get("score")
    if criterion is not None or scores_path is not None or not isinstance(last, dict):
        return None
    if not last.get("checkpoint") or not last.get("scores"):
        return None
    if ckpt is not None:
        if same_file(ckpt, last["checkpoint"]):
            typer.echo(f"scoring with l1, the default; the last 'chanprune score' here made {last.get('criterion')} "
                       f"scores of this checkpoint: pass --scores {shown(last['scores'])} to use them", err=True)
        return None
    typer.echo(f"using {shown(last['checkpoint'])} and its {last.get('criterion')} scores {shown(last['scores'])} "
               "from the last 'chanprune score' here (.chanprune/last.json)", err=True)
    return last

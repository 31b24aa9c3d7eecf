"""`chanprune bench`: params, MACs, size, latency, throughput and accuracy of models side by side, with CI gates."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import GateFailed
from . import options as opt
from .app import app

TIMING_PANEL = "Timing"
GATES_PANEL = "Gates (exit code 3 when one is not met)"

CheckpointsArg = Annotated[list[str] | None, typer.Argument(
    metavar="CKPT...", show_default=False,
    help="Checkpoints to compare; the first is the reference. Each is a state dict, safetensors, chanprune file, "
         "or a pickled module with --trust-pickle.")]


@app.command(
    epilog=opt.examples(
        ("a model and its pruned version: speed-up next to the MACs ratio, accuracy change",
         "chanprune bench resnet56.th pruned.safetensors --arch cifar_resnet56 --data cifar10-test.tar.gz"),
        ("CI: fail (exit 3) when the pruned model loses more than 1 point or is less than 1.5x faster at batch 32",
         "chanprune bench base.th ft.safetensors --arch cifar_resnet56 --data test/ --max-acc-drop 1 --min-speedup 1.5 --json bench.json"),
        ("CI: the pruned model as ONNX Runtime runs it must take at most 60 % of the original's time at batch 1",
         "chanprune bench r50.pt r50-fast.safetensors --arch torchvision:resnet50 --runtime onnxruntime --batch-sizes 1 --max-latency-ratio 0.6"),
        ("latency only, at batch 1, 8 and 64 on 4 threads, with a chart",
         "chanprune bench model.pt pruned.safetensors --arch torchvision:resnet50 --batch-sizes 1,8,64 --threads 4 --plot bench.png"),
        ("GPU latency as deployed: fp16, channels-last (cuDNN autotuning is on by default on CUDA); prune with "
         "--round-to 8 so that the kept widths suit the GPU's kernels",
         "chanprune bench r50.pt r50-pruned.safetensors --arch torchvision:resnet50 --device cuda --dtype fp16 --channels-last --batch-sizes 1,64,256"),
    ),
)
@opt.shared_options
def bench(
    checkpoints: CheckpointsArg = None,
    model: opt.ModelOptions = opt.MODEL,
    data: opt.DataOptions = opt.DATA,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", metavar="B,B", help="Batch sizes to time, comma-separated.", rich_help_panel=TIMING_PANEL)] = "1,32",
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Untimed runs before timing (fewer when --max-time is short).", rich_help_panel=TIMING_PANEL)] = 10,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", min=1, help="Timed runs per model and batch size; the median is reported.", rich_help_panel=TIMING_PANEL)] = 50,
    max_time: Annotated[float, typer.Option("--max-time", metavar="SECONDS", min=0.0, help="Stop timing one model at one batch size after about this long (at least 5 timed runs); 0: always --repeats.", rich_help_panel=TIMING_PANEL)] = 10.0,
    dtype: Annotated[str, typer.Option("--dtype", metavar="fp32|fp16|bf16", help="Precision the models are timed in (weights and input converted, as a half-precision export runs). fp16 is for GPUs: on the CPU it warns. On a GPU, pruned widths that are not multiples of 8 miss the fastest (tensor-core) kernels, which can make a pruned model slower at small batches: prune with --round-to 8. Accuracy is measured in fp32.", rich_help_panel=TIMING_PANEL)] = "fp32",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Time the models and inputs in channels-last (NHWC) memory order, as GPU deployments usually run.", rich_help_panel=TIMING_PANEL)] = False,
    cudnn_benchmark: Annotated[bool | None, typer.Option("--cudnn-benchmark/--no-cudnn-benchmark", help="On CUDA, let cuDNN time its kernels during the warm-up and keep the fastest per layer (torch.backends.cudnn.benchmark, only while timing). Default: on with CUDA.", rich_help_panel=TIMING_PANEL, show_default=False)] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="Time the models through torch.compile (compiled during the warm-up, once per batch size).", rich_help_panel=TIMING_PANEL)] = False,
    runtime: Annotated[str, typer.Option("--runtime", metavar="torch|onnxruntime|tensorrt", help="Where the models are timed: PyTorch, ONNX Runtime's CPU provider (each model exported to a temporary ONNX file and checked as chanprune export checks it; needs onnxruntime) or TensorRT (CUDA, needs torch_tensorrt). The models' timed runs alternate (A, B, A, B, ...) so that a busy machine slows every model alike.", rich_help_panel=TIMING_PANEL)] = "torch",
    max_acc_drop: Annotated[float | None, typer.Option("--max-acc-drop", metavar="PTS", help="Fail when a model's top-1 is more than PTS percentage points below the reference's (needs --data).", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    min_speedup: Annotated[float | None, typer.Option("--min-speedup", metavar="X", help="Fail when a model is less than X times as fast as the reference (median latency at --gate-batch).", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    max_latency_ratio: Annotated[float | None, typer.Option("--max-latency-ratio", metavar="R", help="Fail when a model takes more than R times the reference's latency (median at --gate-batch), e.g. 0.6.", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    gate_batch: Annotated[int | None, typer.Option("--gate-batch", metavar="B", help="Batch size --min-speedup compares at (default: the largest of --batch-sizes).", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    plot: Annotated[str | None, typer.Option("--plot", metavar="PNG", help="Also draw channel widths before/after and, with several models, accuracy and latency vs MACs (.png, .svg or .pdf; needs matplotlib).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    outputs: opt.Outputs = opt.OUTPUTS,
    config: opt.ConfigOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Compare models: params, MACs, size, latency and throughput per batch size, top-1/top-5; CI gates."""
    from ..deploy.benchmark import Deployment, gate_failure
    from ..recipes.bench import BenchOptions, bench_checkpoints
    from ..report import bench as report

    deployment = Deployment(dtype=dtype, channels_last=channels_last, cudnn_benchmark=cudnn_benchmark,
                            compile=compile_model)
    options = BenchOptions(batch_sizes=batch_sizes, threads=model.threads, warmup=warmup, repeats=repeats, max_time=max_time,
                           deployment=deployment, max_acc_drop=max_acc_drop, min_speedup=min_speedup,
                           gate_batch=gate_batch, model=model, data=data, plot=plot, force=outputs.force,
                           json_report=outputs.json_report, runtime=runtime, max_latency_ratio=max_latency_ratio)
    if not checkpoints:  # the original and the newest model made here, if any
        from ..project.state import follow_last_model

        followed = follow_last_model("bench")
        checkpoints = [followed["original"], followed["path"]] if followed is not None else []
    result = bench_checkpoints(checkpoints, options)
    report.show(result, outputs.json_report)  # every output is written before a gate fails the command
    failure = gate_failure(result.gates)
    if failure is not None:
        raise GateFailed(failure)

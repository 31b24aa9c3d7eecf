"""`prune --target-latency` measured: how close each pruned model lands, re-timed by `bench`.

Three parts, each printed as a markdown table with its provenance and written to --out as JSON:

* ``targets``: for each model and runtime, prune to each latency target (l1 scores; random weights
  for the torchvision models, whose latency does not depend on them), then `bench` the original and
  the pruned model in the same run, their timed runs interleaved, at the latency batch and at
  batch 1 and 32. Reports the measured ratio (goal: within ±0.05 of the target), the predicted vs
  measured latency (goal: median error ≤ 10 %: the prediction's fraction of the original's predicted
  latency against bench's measured ratio, so a machine whose load changed between the tables and
  the bench does not count as error; the raw milliseconds are in the JSON too) and whether any
  pruned model is slower than its
  original at batch 1 or 32 (goal: none). The first ResNet-50 row also times the table build from
  an empty cache and the load of the cached tables.
* ``tables``: the ResNet-50 (160 px, batch 1) table built from an empty cache and loaded again.
* ``compare``: the trained CIFAR ResNet-56 at batch 32: the latency-aware plan (target 0.5), the
  chanprune `--target-flops` plan and Torch-Pruning's FLOPs-targeted plans (l1 and taylor,
  round_to 8, inner channels: it cannot prune the option-A streams) that reach the same measured
  latency (the FLOPs target found by bisection on the measured ratio), each BN-recalibrated on
  training batches, top-1 on test images; with --finetune-epochs N, also after N distilled epochs.

    .venv/bin/python bench/latency_target.py targets --targets 0.3,0.5,0.7 --out latency_targets.json
    .venv/bin/python bench/latency_target.py tables
    .venv/bin/python bench/latency_target.py compare --out latency_compare.json

Timings need a quiet machine: the script prints `uptime`'s load before each model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from chanprune_cli.deploy.runtimes import LatencyTarget  # noqa: E402
from chanprune_cli.engine.allocate import AllocationOptions  # noqa: E402
from chanprune_cli.engine.graph import build_graph  # noqa: E402
from chanprune_cli.latency.correction import PairTimer  # noqa: E402
from chanprune_cli.latency.table import build_latency_model  # noqa: E402
from chanprune_cli.measure import evaluate  # noqa: E402
from chanprune_cli.prune.recalibration import recalibrate_bn  # noqa: E402
from chanprune_cli.recipes import (  # noqa: E402
    BenchOptions,
    DataOptions,
    ModelOptions,
    PruneOptions,
    bench_checkpoints,
    prune_checkpoint,
)
from provenance import describe, provenance  # noqa: E402

R56 = SHARED / "checkpoints" / "resnet56-cifar10jpeg.pt"
TRAIN, TEST = SHARED / "data" / "cifar10-jpeg-train.tar.gz", SHARED / "data" / "cifar10-jpeg-test.tar.gz"
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
# name -> (arch, input shape, latency batch, torchvision factory or None for the trained ResNet-56)
MODELS: dict[str, tuple[str, str, int, Callable[[], nn.Module] | None]] = {
    "resnet56": ("cifar_resnet56", "3,32,32", 32, None),
    "resnet50": ("torchvision:resnet50", "3,160,160", 1, torchvision.models.resnet50),
    "mobilenet_v2": ("torchvision:mobilenet_v2", "3,224,224", 1, torchvision.models.mobilenet_v2),
    "efficientnet_b0": ("torchvision:efficientnet_b0", "3,224,224", 1, torchvision.models.efficientnet_b0),
}
RUNS = "resnet56:torch,resnet50:torch,mobilenet_v2:torch,efficientnet_b0:torch,resnet50:onnxruntime,mobilenet_v2:onnxruntime"


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def checkpoint(name: str, folder: Path) -> Path:
    arch, _, _, factory = MODELS[name]
    if factory is None:
        return R56
    path = folder / f"{name}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(factory().state_dict(), path)
    return path


def model_options(name: str, threads: int) -> ModelOptions:
    arch, shape, _, _ = MODELS[name]
    return ModelOptions(arch=arch, input_shape=shape, mean=MEAN, std=STD, device="cpu", threads=threads)


# --------------------------------------------------------------------------------------------
# targets


def one_target(name: str, runtime: str, target: float, folder: Path, threads: int) -> dict[str, Any]:
    ckpt = checkpoint(name, folder)
    batch = MODELS[name][2]
    out = folder / f"{name}-{runtime}-{target}.safetensors"
    row: dict[str, Any] = {"model": name, "runtime": runtime, "batch": batch, "target": target, "load_before": load()}
    latency = LatencyTarget(runtime=runtime, batch=batch, threads=threads)
    start = time.perf_counter()
    result = prune_checkpoint(str(ckpt), PruneOptions(AllocationOptions(target_latency=target), criterion="l1",
                                                      out=str(out), model=model_options(name, threads), force=True,
                                                      latency=latency))
    row["prune_s"] = round(time.perf_counter() - start, 1)
    record = result.latency or {}
    row.update({"predicted_ms": record.get("predicted_ms"), "predicted_ratio": record.get("predicted_ratio"),
                "prune_before_ms": record.get("before_ms"),
                "prune_after_ms": record.get("after_ms"), "prune_ratio": record.get("ratio"),
                "attempts": len(record.get("attempts", [])), "tables": record.get("tables"),
                "macs_ratio": result.after["macs"] / result.before["macs"]})
    sizes = sorted({batch, 1, 32})
    bench = bench_checkpoints([str(ckpt), str(out)], BenchOptions(batch_sizes=sizes, threads=threads, warmup=5,
                                                                    repeats=60, max_time=8.0, runtime=runtime,
                                                                    model=model_options(name, threads)))
    ref, pruned = bench.models
    row["bench"] = {str(b): {"before_ms": ref.latency[b]["median_ms"], "after_ms": pruned.latency[b]["median_ms"],
                             "ratio": pruned.latency[b]["median_ms"] / ref.latency[b]["median_ms"]} for b in sizes}
    measured = row["bench"][str(batch)]
    row["ratio"] = measured["ratio"]
    row["predicted_error"] = row["predicted_ratio"] / measured["ratio"] - 1 if row["predicted_ratio"] else None
    row["predicted_ms_error"] = (row["predicted_ms"] - measured["after_ms"]) / measured["after_ms"] if row["predicted_ms"] else None
    row["slower"] = [b for b in sizes if row["bench"][str(b)]["ratio"] > 1]
    row["load_after"] = load()
    return row


def targets(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="latency-targets-") as tmp:
        for run in args.runs.split(","):
            name, runtime = run.split(":")
            for target in (float(t) for t in args.targets.split(",")):
                print(f"{name} {runtime} {target}: load {load()}", file=sys.stderr, flush=True)
                try:
                    rows.append(one_target(name, runtime, target, Path(tmp), args.threads))
                except Exception as exc:  # noqa: BLE001  (a failed row is recorded, the others still run)
                    rows.append({"model": name, "runtime": runtime, "target": target, "error": str(exc).splitlines()[0]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    errors = [abs(r["predicted_error"]) for r in rows if r.get("predicted_error") is not None]
    return {"rows": rows, "median_abs_predicted_error": statistics.median(errors) if errors else None}


def targets_markdown(doc: dict[str, Any]) -> str:
    lines = ["| model | runtime | batch | target | measured (bench) | prune's own | predicted vs measured ratio | attempts | "
             "b1 ratio | b32 ratio | MACs ratio | prune s | load before/after |", "|" + "---|" * 13]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['runtime']} | | {r['target']} | error: {r['error']} |" + " |" * 8)
            continue
        b = r["bench"]
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['target']} | **{r['ratio']:.3f}** | "
                     f"{r['prune_ratio']:.3f} | {r['predicted_ratio']:.3f} vs {r['ratio']:.3f} "
                     f"({100 * r['predicted_error']:+.1f} %) | {r['attempts']} | {b['1']['ratio']:.3f} | "
                     f"{b['32']['ratio']:.3f} | {r['macs_ratio']:.3f} | {r['prune_s']} | {r['load_before']}/{r['load_after']} |")
    if doc["median_abs_predicted_error"] is not None:
        lines.append(f"\nMedian |predicted − measured| / measured (ratios): {100 * doc['median_abs_predicted_error']:.1f} %")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# tables


def tables(args: argparse.Namespace) -> dict[str, Any]:
    """ResNet-50 (160 px, batch 1): its tables built into an empty cache, then read from it."""
    with tempfile.TemporaryDirectory(prefix="latency-cache-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        model = torchvision.models.resnet50().eval()
        shape = (3, 160, 160)
        graph = build_graph(model, shape)
        target = LatencyTarget(batch=1, threads=args.threads)
        rows = {}
        for label in ("empty cache", "cached"):
            print(f"tables ({label}): load {load()}", file=sys.stderr, flush=True)
            built = build_latency_model(model, graph, shape, target)
            rows[label] = {"tables_s": round(built.table_seconds, 3), "total_s": round(built.seconds, 3),
                           "timed": built.measured, "cached": built.cached, "layers": built.layers, "load": load()}
    return {"resnet50_160_b1": rows}


# --------------------------------------------------------------------------------------------
# compare


def top1(model: nn.Module, test: Any) -> float:
    return float(evaluate(model, test, torch.device("cpu"), progress=False)["top1"])


def recalibrated(model: nn.Module, train: Callable[[], Any], batches: int) -> nn.Module:
    model = copy.deepcopy(model)
    recalibrate_bn(model, train(), torch.device("cpu"), batches)
    return model.eval()


def closest_by_bisection(make: Callable[[float], nn.Module], timer: PairTimer, ratio: float, low: float, high: float,
                         steps: int) -> tuple[float, nn.Module, float]:
    """The FLOPs target in [low, high] whose model's measured latency ratio is closest to `ratio`."""
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(steps):
        mid = (low + high) / 2
        model = make(mid)
        measured = timer(model).ratio or 1.0
        print(f"  flops target {mid:.3f}: measured {measured:.3f} (want {ratio:.3f})", file=sys.stderr, flush=True)
        if best is None or abs(measured - ratio) < abs(best[2] - ratio):
            best = (mid, model, measured)
        if abs(measured - ratio) <= 0.01:
            break
        low, high = (mid, high) if measured > ratio else (low, mid)
    assert best is not None
    return best


def torch_pruning(model: nn.Module, importance: str, flops: float, calib: Any) -> nn.Module:
    """Torch-Pruning's global ranking to `flops` of the MACs removed, round_to 8, the inner channels
    of the CIFAR ResNet (it cannot prune the option-A streams)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    ignored = [pruned.linear, pruned.conv1] + [m for n, m in pruned.named_modules() if n.endswith(".conv2")]
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else tp.importance.TaylorImportance()
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(pruned, example, imp, global_pruning=True, pruning_ratio=0.95, iterative_steps=400,
                                  ignored_layers=ignored, round_to=8)
    base = tp.utils.count_ops_and_params(model, example)[0]
    for _ in range(400):
        if importance == "taylor":
            images, labels = next(iter(calib))
            pruned.zero_grad()
            nn.functional.cross_entropy(pruned(images), labels).backward()
        pruner.step()
        if 1 - tp.utils.count_ops_and_params(pruned, example)[0] / base >= flops:
            break
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def compare(args: argparse.Namespace) -> dict[str, Any]:
    from chanprune_cli.checkpoint import load_checkpoint
    from chanprune_cli.data import make_loader

    threads = args.threads
    model_opts = ModelOptions(arch="cifar_resnet56", mean=MEAN, std=STD, device="cpu", threads=threads)
    data = DataOptions(data=str(TRAIN), batch_size=128, calib_batches=args.calib_batches, seed=0)
    target = LatencyTarget(batch=32, threads=threads)
    mean, std = tuple(float(v) for v in MEAN.split(",")), tuple(float(v) for v in STD.split(","))

    def train() -> Any:
        return make_loader(str(TRAIN), batch_size=128, shuffle=True, seed=0, max_batches=args.recal_batches,
                           input_shape=(3, 32, 32), mean=mean, std=std)

    test = make_loader(str(TEST), batch_size=256, input_shape=(3, 32, 32), mean=mean, std=std, seed=0,
                       shuffle=True, max_batches=args.test_images // 256)
    original = load_checkpoint(str(R56), arch="cifar_resnet56").model.eval()
    timer = PairTimer(original, (3, 32, 32), target)
    rows: dict[str, Any] = {"baseline": {"top1": top1(original, test)}}
    with tempfile.TemporaryDirectory(prefix="latency-compare-") as tmp:
        out = Path(tmp) / "latency.safetensors"
        print(f"latency plan: load {load()}", file=sys.stderr, flush=True)
        result = prune_checkpoint(str(R56), PruneOptions(AllocationOptions(target_latency=args.target), criterion="l1",
                                                         out=str(out), model=model_opts, data=data,
                                                         recalibrate_bn=0, latency=target))
        latency_model = result.model.eval()
        ratio = timer(latency_model).ratio or 1.0
        rows["latency"] = {"measured": ratio, "top1": top1(recalibrated(latency_model, train, args.recal_batches), test)}

        def ours(flops: float) -> nn.Module:
            path = Path(tmp) / f"flops-{flops:.4f}.safetensors"
            done = prune_checkpoint(str(R56), PruneOptions(AllocationOptions(target_flops=flops), criterion="l1",
                                                           out=str(path), model=model_opts, recalibrate_bn=0,
                                                           latency=target, force=True))
            return done.model.eval()

        flops, model, measured = closest_by_bisection(ours, timer, ratio, 0.2, 0.9, args.steps)
        rows["flops"] = {"target_flops": flops, "measured": measured,
                         "top1": top1(recalibrated(model, train, args.recal_batches), test)}
        for importance in ("l1", "taylor"):
            calib = train()
            found = closest_by_bisection(lambda f, imp=importance, c=calib: torch_pruning(original, imp, f, c), timer,
                                         ratio, 0.2, 0.9, args.steps)
            rows[f"torch-pruning {importance}"] = {"target_flops": found[0], "measured": found[2],
                                                   "top1": top1(recalibrated(found[1], train, args.recal_batches), test)}
    return rows


def compare_markdown(rows: dict[str, Any]) -> str:
    lines = ["| plan | MACs target | measured latency ratio (batch 32) | top-1 after BN recalibration |", "|---|---|---|---|"]
    for name, r in rows.items():
        target = f"{r['target_flops']:.3f}" if "target_flops" in r else ""
        measured = f"{r['measured']:.3f}" if "measured" in r else "1"
        lines.append(f"| {name} | {target} | {measured} | {r['top1']:.2f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("targets", "tables", "compare"))
    ap.add_argument("--runs", default=RUNS, help="model:runtime pairs")
    ap.add_argument("--targets", default="0.3,0.5,0.7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.5, help="compare: the latency target")
    ap.add_argument("--steps", type=int, default=6, help="compare: bisection steps per FLOPs-targeted plan")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--recal-batches", type=int, default=20)
    ap.add_argument("--test-images", type=int, default=5120)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prov = provenance(threads=args.threads)
    print(describe(prov), flush=True)
    doc = {"targets": targets, "tables": tables, "compare": compare}[args.part](args)
    text = {"targets": targets_markdown, "compare": compare_markdown}.get(args.part, lambda d: json.dumps(d, indent=2))(doc)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"provenance": prov, **doc}, indent=2) + "\n")


if __name__ == "__main__":
    main()

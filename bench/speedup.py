"""Measured speed-up vs MACs ratio: how close channel pruning gets to the speed-up its MACs promise.

For each model, prune to `--target-flops` of the MACs removed (L1 criterion, one global ranking)
with each `--round-to` (kept widths multiples of N: 1 = exact, 8/16 suit vectorised kernels), then
time the unpruned and the pruned model at each batch size on the CPU with a fixed thread count
(`chanprune_cli.deploy.benchmark.time_model`: warm-up, median of timed runs, bounded by `--max-time`).
Prints a markdown table: MACs ratio (reference MACs / pruned MACs, the speed-up MACs alone
predict), latency reference → pruned, measured speed-up, and speed-up ÷ MACs ratio (100 % = the
pruned model is exactly as much faster as the work removed).

Models: `r56` = the CIFAR ResNet-56 of ../shared (3x32x32), `r50` = torchvision resnet50 with
random weights (3x224x224; weights do not change latency). Timings need a quiet machine: nothing
else running, the same thread count for every model. The recorded run:

    nice -n 0 .venv/bin/python bench/speedup.py --threads 2 --repeats 30 --max-time 30 \\
        --json bench/out/speedup.json | tee bench/out/speedup.md

As deployed on a CPU with native bf16 (AVX512-BF16/AMX), converted like `chanprune bench --dtype bf16
--channels-last`:

    .venv/bin/python bench/speedup.py --dtype bf16 --channels-last --threads 2 --json bench/out/speedup-bf16.json

A quick check that the script works (seconds to a minute, numbers meaningless):

    .venv/bin/python bench/speedup.py --models r56 --round-to 1,8 --warmup 1 --repeats 2 --max-time 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from chanprune_cli.checkpoint import load_checkpoint  # noqa: E402
from chanprune_cli.deploy.benchmark import Deployment, deployed, time_model  # noqa: E402
from chanprune_cli.engine.allocate import AllocationOptions  # noqa: E402
from chanprune_cli.engine.graph import build_graph  # noqa: E402
from chanprune_cli.measure import count_macs, count_params  # noqa: E402
from chanprune_cli.models import build_model, parse_arch  # noqa: E402
from chanprune_cli.prune import pruning  # noqa: E402
from chanprune_cli.prune.scoring import compute_scores  # noqa: E402
from provenance import describe, provenance  # noqa: E402

R56_CHECKPOINT = SHARED / "checkpoints" / "resnet56-cifar10jpeg.pt"


def load(name: str, args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int], str]:
    if name == "r56":
        if not Path(args.r56_checkpoint).exists():
            raise SystemExit(f"{args.r56_checkpoint} does not exist; pass --r56-checkpoint or --models r50")
        return load_checkpoint(args.r56_checkpoint, arch="cifar_resnet56").model.eval(), (3, 32, 32), "CIFAR ResNet-56"
    if name == "r50":
        torch.manual_seed(args.seed)
        return build_model(parse_arch("torchvision:resnet50", None)).eval(), (3, 224, 224), "torchvision resnet50"
    raise SystemExit(f"unknown model {name!r}; choose r56 or r50")


def timings(model: nn.Module, shape: tuple[int, int, int], args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    settings = Deployment(dtype=args.dtype, channels_last=args.channels_last)
    model = deployed(model, settings, torch.device("cpu"), shape)  # a converted copy, as `chanprune bench` times it
    return {b: time_model(model, shape, b, "cpu", warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                          max_time=args.max_time, settings=settings) for b in args.batch_sizes}


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, shape, title = load(name, args)
    ref_macs = count_macs(model, shape)
    started = time.perf_counter()
    ref = timings(model, shape, args)
    print(f"{title}: {ref_macs / 1e6:.1f} M MACs, reference timed in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    graph = build_graph(model, shape)
    scores = compute_scores(model, graph, "l1", None, torch.device("cpu"), seed=args.seed)
    rows = []
    for round_to in args.round_to:
        outcome = pruning.prune(model, graph, scores, shape, criterion="l1",
                                options=AllocationOptions(target_flops=args.target_flops, round_to=round_to), check=args.verify)
        pruned = outcome.model.eval()
        macs = count_macs(pruned, shape)
        started = time.perf_counter()
        lat = timings(pruned, shape, args)
        print(f"  round_to {round_to}: {macs / 1e6:.1f} M MACs, timed in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
        row: dict[str, Any] = {"model": title, "round_to": round_to, "params": count_params(pruned),
                               "params_ref": count_params(model), "macs": macs, "macs_ref": ref_macs,
                               "macs_ratio": ref_macs / macs, "latency": {}}
        for b in args.batch_sizes:
            speedup = ref[b]["median_ms"] / lat[b]["median_ms"]
            row["latency"][str(b)] = {
                "ref_ms": ref[b]["median_ms"], "pruned_ms": lat[b]["median_ms"],
                "ref_p90_ms": ref[b]["p90_ms"], "pruned_p90_ms": lat[b]["p90_ms"],
                "ref_runs": ref[b]["repeats"], "pruned_runs": lat[b]["repeats"],
                "speedup": speedup, "speedup_vs_macs_ratio": speedup / row["macs_ratio"]}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    head = ["model", "round_to", "MACs ratio"]
    for b in batch_sizes:
        head += [f"b{b} ms ref → pruned", f"b{b} speed-up", f"b{b} speed-up ÷ MACs ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["round_to"]), f"{r['macs_ratio']:.2f}×"]
        for b in batch_sizes:
            lat = r["latency"][str(b)]
            cells += [f"{lat['ref_ms']:.2f} → {lat['pruned_ms']:.2f}", f"{lat['speedup']:.2f}×",
                      f"{100 * lat['speedup_vs_macs_ratio']:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="r56,r50", help="comma-separated: r56, r50 (default: both)")
    parser.add_argument("--round-to", type=_ints, default=[1, 8, 16], help="kept widths multiples of N (default 1,8,16)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 32], help="default 1,32")
    parser.add_argument("--target-flops", type=float, default=0.5, help="fraction of the MACs to remove (default 0.5)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads, fixed for every run (default 2)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="as `chanprune bench --dtype`")
    parser.add_argument("--channels-last", action="store_true", help="as `chanprune bench --channels-last`")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs (median reported; default 30)")
    parser.add_argument("--max-time", type=float, default=30.0,
                        help="seconds of timed runs per model and batch size, at least 5 runs (default 30; 0: no bound)")
    parser.add_argument("--verify", action="store_true", help="also check every pruned model against the masked original")
    parser.add_argument("--r56-checkpoint", default=str(R56_CHECKPOINT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows and settings as JSON here")
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += run_model(name, args)
    table = markdown(rows, args.batch_sizes)
    prov = provenance(threads=args.threads)
    print(describe(prov))
    print(f"{args.dtype}{' channels-last' if args.channels_last else ''}, "
          f"target {args.target_flops:g} of the MACs removed (l1), median of ≤{args.repeats} runs "
          f"(≤{args.max_time:g} s per model and batch), {args.warmup} warm-up\n")
    print(table)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"settings": settings, "provenance": prov, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

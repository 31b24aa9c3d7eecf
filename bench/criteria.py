"""Quality benchmark: every criterion, ours and Torch-Pruning's, at the same MACs target, one run.

For each criterion: score on calibration batches of the training split, prune to the MACs target,
then top-1 on the test split (a) right after pruning and (b) after BatchNorm recalibration on
training batches. Two protocols:

* ``inner``: only the inner channel of each residual block may be pruned (the protocol of
  White-Box and HRank on CIFAR ResNets). Torch-Pruning cannot prune the option-A shortcut
  channels correctly, so its side-by-side rows use this protocol.
* ``all``: every prunable group, residual streams included (chanprune only; Torch-Pruning is
  attempted and its failure recorded).

MACs are counted by fvcore for both tools. Example (the recorded run, see BENCHMARKS.md):

    python bench/criteria.py --arch cifar_resnet56 \\
        --checkpoint ../shared/checkpoints/resnet56-cifar10jpeg.pt --target-flops 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from chanprune_cli.checkpoint import load_checkpoint  # noqa: E402
from chanprune_cli.criteria import available, get_criterion  # noqa: E402
from chanprune_cli.criteria.base import NEEDS_WEIGHTS  # noqa: E402
from chanprune_cli.data import make_loader  # noqa: E402
from chanprune_cli.engine.allocate import AllocationOptions  # noqa: E402
from chanprune_cli.engine.graph import build_graph  # noqa: E402
from chanprune_cli.measure import count_macs, count_params, evaluate  # noqa: E402
from chanprune_cli.prune import pruning  # noqa: E402
from chanprune_cli.prune.recalibration import recalibrate_bn  # noqa: E402
from chanprune_cli.prune.rounds import score_in_rounds  # noqa: E402
from chanprune_cli.prune.scoring import compute_scores  # noqa: E402
from provenance import describe, provenance  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE = (3, 32, 32)
# Producers of the residual streams of a CIFAR ResNet: ignoring them leaves the inner channels.
INNER_IGNORE = ("conv1", "layer*.*.conv2")
TP_CRITERIA = ("tp-l1", "tp-l2", "tp-bn", "tp-lamp", "tp-fpgm", "tp-taylor", "tp-hessian", "tp-random")


def loaders(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Calibration, recalibration and test loaders over *fixed* random subsets, iterated in order:
    every criterion sees the same calibration and recalibration batches and the same test images
    (a shuffling loader would draw a new subset on each pass, adding several points of noise)."""
    from torch.utils.data import Subset

    from chanprune_cli.data import open_dataset

    train = open_dataset(args.train, input_shape=SHAPE, mean=MEAN, std=STD)
    test_set = open_dataset(args.test, input_shape=SHAPE, mean=MEAN, std=STD)

    def subset(dataset: Any, n: int, seed: int) -> Any:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        return Subset(dataset, order[:min(n, len(dataset))].tolist())

    common = {"input_shape": SHAPE, "mean": MEAN, "std": STD, "batch_size": args.batch_size, "seed": args.seed}
    calib_set = subset(train, args.calib_batches * args.batch_size, args.seed)
    recal_set = subset(train, args.recal_batches * args.batch_size, args.seed + 1)
    calib = make_loader(calib_set, **common)
    recal = make_loader(recal_set, **common)
    if args.evaluate_on == "validation":  # tuning: training images neither calibration nor recalibration saw
        seen = set(calib_set.indices) | set(recal_set.indices)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234)).tolist()
        test_set = Subset(train, [i for i in order if i not in seen][:args.eval_images])
    else:
        test_set = subset(test_set, args.eval_images, 1234)
    test = make_loader(test_set, **{**common, "batch_size": 200})
    return calib, recal, test


def top1(model: nn.Module, test: Any) -> float:
    return round(float(evaluate(model, test, torch.device("cpu"), progress=False)["top1"]), 2)


def finish(model: nn.Module, pruned: nn.Module, recal: Any, test: Any, row: dict[str, Any], args: argparse.Namespace) -> None:
    base = count_macs(model, SHAPE)
    row["macs_reduction_pct"] = round(100 * (1 - count_macs(pruned, SHAPE) / base), 2)
    row["params"] = count_params(pruned)
    row["top1_pruned"] = None if args.after_recalibration_only else top1(pruned, test)
    recalibrated = copy.deepcopy(pruned)
    recalibrate_bn(recalibrated, recal, torch.device("cpu"), args.recal_batches)
    row["top1_recalibrated"] = top1(recalibrated, test)
    if args.finetune_steps > 0 and row["protocol"] in args.finetune_protocols.split(","):
        runs = [top1(finetuned(recalibrated, args, seed), test) for seed in seeds(args)]
        row["top1_finetuned"] = round(statistics.mean(runs), 2)
        if len(runs) > 1:
            row["top1_finetuned_runs"] = runs
            row["top1_finetuned_sd"] = round(statistics.stdev(runs), 2)


def seeds(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in str(args.finetune_seeds).split(",")]


@cache
def augmented_train_set(path: str) -> Any:
    """The training split with training augmentation, opened once for every (c) fine-tune."""
    from chanprune_cli.data import open_dataset

    return open_dataset(path, input_shape=SHAPE, mean=MEAN, std=STD, train=True)


def finetuned(model: nn.Module, args: argparse.Namespace, seed: int) -> nn.Module:
    """(c): the identical short fine-tune for every method (same steps, lr, batches, seed)."""
    from chanprune_cli.train import TrainConfig, Trainer

    train = augmented_train_set(args.train)
    cfg = TrainConfig(max_steps=args.finetune_steps, batch_size=args.batch_size, lr=args.finetune_lr, progress=False,
                      save_every=None, seed=seed)
    tuned = copy.deepcopy(model)
    Trainer(tuned, train, cfg, device=torch.device("cpu")).fit()
    return tuned.eval()


def ours(name: str, model: nn.Module, protocol: str, calib: Any, recal: Any, test: Any, args: argparse.Namespace,
         cost_exponent: float, rounds: int) -> dict[str, Any]:
    row: dict[str, Any] = {"tool": "chanprune" + (f" --cost-exponent {cost_exponent:g}" if cost_exponent else "")
                           + (f" --rounds {rounds}" if rounds > 1 else "")
                           + (f" --normalize {args.normalize}" if args.normalize != "auto" else ""),
                           "criterion": name, "protocol": protocol}
    start = time.perf_counter()
    graph = build_graph(model, SHAPE, ignore=INNER_IGNORE if protocol == "inner" else ())
    criterion, _, opt_text = name.partition(":")  # "l1:side=both" -> criterion options
    options = dict(kv.split("=", 1) for kv in opt_text.replace(";", ",").split(",") if kv)  # several: "KEY=V;KEY=V"
    seed = int(options.pop("seed", args.seed))  # "random:seed=1": a row per seed, the images unchanged
    normalize = pruning.normalize_mode(args.normalize, criterion, options)
    # as `prune --rounds`: rescore between rounds after BN re-estimation on the recalibration batches
    allocation = AllocationOptions(target_flops=args.target_flops, cost_exponent=cost_exponent, normalize=normalize,
                                   rounds=rounds)
    scores, removed = score_in_rounds(
        model, graph, lambda m: compute_scores(m, graph, criterion, calib, torch.device("cpu"), seed=seed, options=options),
        allocation, refresh=(lambda m: recalibrate_bn(m, recal, torch.device("cpu"), args.recal_batches))
        if get_criterion(criterion).requires(options) != NEEDS_WEIGHTS else None)
    outcome = pruning.prune(model, graph, scores, SHAPE, criterion=criterion, options=allocation, criterion_options=options,
                            removed=removed)
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["verified"] = bool(outcome.verify and outcome.verify.passed)
    finish(model, outcome.model, recal, test, row, args)
    return row


def _tp_importance(tp: Any, name: str) -> Any:
    imp = tp.importance
    return {"tp-l1": lambda: imp.MagnitudeImportance(p=1), "tp-l2": lambda: imp.MagnitudeImportance(p=2),
            "tp-bn": imp.BNScaleImportance, "tp-lamp": imp.LAMPImportance, "tp-fpgm": imp.FPGMImportance,
            "tp-taylor": imp.TaylorImportance, "tp-hessian": imp.HessianImportance,
            "tp-random": imp.RandomImportance}[name]()


def torch_pruning(name: str, model: nn.Module, protocol: str, calib: Any, recal: Any, test: Any,
                  args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    import torch_pruning as tp

    row: dict[str, Any] = {"tool": "torch-pruning " + version("torch-pruning"), "criterion": name, "protocol": protocol}
    pruned = copy.deepcopy(model).eval()
    ignored: list[nn.Module] = [pruned.linear]
    if protocol == "inner":
        ignored += [pruned.conv1] + [m for n, m in pruned.named_modules() if n.endswith(".conv2")]
    importance = _tp_importance(tp, name)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    pruner = tp.pruner.MetaPruner(pruned, torch.randn(1, *SHAPE), importance, global_pruning=True,
                                  pruning_ratio=0.9, iterative_steps=args.tp_steps, ignored_layers=ignored)
    example = torch.randn(1, *SHAPE)
    base, _ = tp.utils.count_ops_and_params(model, example)  # TP's own counter: cheap enough to call every step
    batches = iter(calib)
    for _ in range(args.tp_steps):
        if name in ("tp-taylor", "tp-hessian"):
            images, labels = next(batches, None) or next(iter(calib))
            pruned.zero_grad()
            if name == "tp-hessian":
                importance.zero_grad()
                for loss in nn.functional.cross_entropy(pruned(images), labels, reduction="none")[:16]:
                    pruned.zero_grad()
                    loss.backward(retain_graph=True)
                    importance.accumulate_grad(pruned)
            else:
                nn.functional.cross_entropy(pruned(images), labels).backward()
        pruner.step()
        if 1 - tp.utils.count_ops_and_params(pruned, example)[0] / base >= args.target_flops:
            break
    row["seconds"] = round(time.perf_counter() - start, 1)
    pruned.zero_grad(set_to_none=True)
    row["verified"] = None  # Torch-Pruning has no equivalence check
    finish(model, pruned, recal, test, row, args)
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, baseline: float, prov: dict[str, Any]) -> str:
    lines = [describe(prov), "",
             f"Baseline top-1 {baseline:.2f} % on {args.eval_images} {args.evaluate_on} images; "
             f"target {args.target_flops:.0%} MACs removed; "
             f"calibration {args.calib_batches}×{args.batch_size} images, BN recalibration {args.recal_batches} batches.", "",
             f"(c) = {args.finetune_steps} fine-tune steps × {args.batch_size}, lr {args.finetune_lr}, "
             f"seed(s) {args.finetune_seeds} (mean ± sd over seeds), identical for every method.", "",
             "| protocol | tool | criterion | MACs ↓ % | params | (a) top-1 pruned | (b) + BN recal | (c) + fine-tune | verified | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['protocol']} | {r['tool']} | {r['criterion']} | – | – | failed: {r['error']} | – | – | – | – |")
        else:
            tuned = f"{r['top1_finetuned']:.2f}" if "top1_finetuned" in r else "–"
            tuned += f" ± {r['top1_finetuned_sd']:.2f}" if "top1_finetuned_sd" in r else ""
            lines.append(f"| {r['protocol']} | {r['tool']} | {r['criterion']} | {r['macs_reduction_pct']:.1f} | {r['params']:,} | "
                         f"{_pct(r['top1_pruned'])} | {r['top1_recalibrated']:.2f} | {tuned} | {r['verified']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet56")
    parser.add_argument("--checkpoint", default=str(SHARED / "checkpoints" / "resnet56-cifar10jpeg.pt"))
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg-train.tar.gz"))
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10-jpeg-test.tar.gz"))
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--recal-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-images", type=int, default=2000, help="test images (a fixed random subset; 10000 = all)")
    parser.add_argument("--evaluate-on", choices=("test", "validation"), default="test",
                        help="validation: a fixed subset of the training split that calibration and recalibration do "
                             "not use (for tuning defaults; report on test)")
    parser.add_argument("--after-recalibration-only", action="store_true",
                        help="measure (b) alone, not (a) right after pruning (half the evaluation time)")
    parser.add_argument("--protocols", default="inner,all")
    parser.add_argument("--criteria", default="all", help="comma list of ours, or 'all'")
    parser.add_argument("--tp-criteria", default=",".join(TP_CRITERIA), help="comma list, or 'none'")
    parser.add_argument("--tp-steps", type=int, default=60)
    parser.add_argument("--finetune-steps", type=int, default=100, help="(c): steps of the identical short fine-tune (0: skip)")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-protocols", default="inner", help="protocols that get (c)")
    parser.add_argument("--finetune-seeds", default="0", help="comma list: (c) is repeated per seed, mean ± sd reported")
    parser.add_argument("--cost-exponent", default="0", help="ours: prune --cost-exponent E (a comma list: a row per E)")
    parser.add_argument("--rounds", default="1", help="ours: prune --rounds N (a comma list: a row per N)")
    parser.add_argument("--normalize", choices=("auto", "mean", "none"), default="auto", help="ours: prune --normalize")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "criteria"))
    parser.add_argument("--report-from", metavar="LOG",
                        help="only rebuild criteria.md/json from the JSON lines a run printed (e.g. an interrupted run)")
    args = parser.parse_args()
    if args.report_from:
        lines = Path(args.report_from).read_text().splitlines()
        baseline = float(lines[0].split()[2])
        rows = [json.loads(line) for line in lines if line.startswith("{")]
        write_report(rows, args, baseline)
        return
    torch.manual_seed(args.seed)
    model = load_checkpoint(args.checkpoint, arch=args.arch).model.eval()
    ours_names = list(available()) if args.criteria == "all" else args.criteria.split(",")
    calib, recal, test = loaders(args)
    baseline = top1(model, test)
    print(f"baseline top-1 {baseline:.2f} %", flush=True)
    tp_names = [] if args.tp_criteria == "none" else args.tp_criteria.split(",")
    exponents = [float(e) for e in str(args.cost_exponent).split(",")]
    jobs = [(partial(ours, cost_exponent=e, rounds=int(r)), n)
            for r in str(args.rounds).split(",") for e in exponents for n in ours_names]
    jobs += [(torch_pruning, n) for n in tp_names]
    rows: list[dict[str, Any]] = []
    for protocol in args.protocols.split(","):
        for fn, name in jobs:
            try:
                row = fn(name, model, protocol, calib, recal, test, args)
            except Exception as exc:  # noqa: BLE001 -- a failing method is a result, not the end of the run
                row = {"tool": "torch-pruning" if fn is torch_pruning else "chanprune", "criterion": name, "protocol": protocol,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_report(rows, args, baseline)


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, baseline: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    meta = {"provenance": prov, "baseline_top1": baseline, **vars(args)}
    (out / "criteria.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(rows, args, baseline, prov)
    (out / "criteria.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Training throughput of label-free distillation against the classifier path, same model size.

One pruned model (a CIFAR ResNet with half of every prunable group's channels removed, random
initialisation: throughput does not depend on the weights) and its unpruned original as the
teacher, trained by `train.Trainer` on the same synthetic images, batch, seed and threads:

  ce          the classifier path: cross-entropy on labels, no teacher
  kd          the classifier path with a teacher: (1-α)·CE + α·T²·KL (`finetune --teacher` on labels)
  free-logits label-free distillation of a classifier (the KD term alone: images without labels)
  free-leaves label-free distillation as a detector gets it: every output leaf's relative squared
              error, norms with frozen statistics (the path YOLO takes)

Rounds interleave the paths (the machine may be shared); each path's best round is kept and the
ratios are of best images/s. The label-free paths run a teacher forward per step that `ce` does
not: `kd` is the like-for-like comparison, `ce` the upper bound.

Usage (the recorded run, see BENCHMARKS.md):
    python bench/distill_speed.py --steps 30 --rounds 3 --threads 2 --out bench/out/distill-speed
Quick smoke run:
    python bench/distill_speed.py --depth 20 --steps 2 --rounds 1 --out /tmp/distill-speed
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chanprune_cli.data import open_dataset  # noqa: E402
from chanprune_cli.engine.graph import build_graph  # noqa: E402
from chanprune_cli.engine.surgery import prune_model  # noqa: E402
from chanprune_cli.measure import count_macs  # noqa: E402
from chanprune_cli.models import build_model, parse_arch  # noqa: E402
from chanprune_cli.train import TrainConfig, Trainer  # noqa: E402
from chanprune_cli.train.distill import Distillation  # noqa: E402
from provenance import describe, provenance  # noqa: E402

PATHS = ("ce", "kd", "free-logits", "free-leaves")
SHAPE = (3, 32, 32)


def models(depth: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the pruned student, the unpruned teacher)."""
    torch.manual_seed(0)
    teacher = build_model(parse_arch(f"cifar_resnet{depth}")).eval()
    graph = build_graph(teacher, SHAPE)
    plan = {g.id: g.prunable_classes[1::2] for g in graph.prunable_groups()}
    student = copy.deepcopy(teacher)
    prune_model(student, graph, plan)
    return student, teacher


def run(path: str, student: torch.nn.Module, teacher: torch.nn.Module, data: Any, args: argparse.Namespace) -> float:
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, seed=0, save_every=None, progress=False,
                      amp=args.amp, workers=0, augment=False)
    model = copy.deepcopy(student)
    distillation = None
    if path.startswith("free"):
        distillation = Distillation(logits=path == "free-logits", temperature=cfg.kd_temperature)
        distillation.prepare(model, teacher, torch.zeros(2, *SHAPE))
    trainer = Trainer(model, data, cfg, device=torch.device("cpu"), teacher=None if path == "ce" else copy.deepcopy(teacher),
                      distillation=distillation)
    return trainer.fit().images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", default="off", help="off | bf16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prov = provenance(threads=args.threads)
    student, teacher = models(args.depth)
    data = open_dataset(f"synthetic:3x32x32:10:{args.batch * (args.steps + 1)}", train=False)
    rows: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(args.rounds):
        for path in PATHS:
            rows[path].append(run(path, student, teacher, data, args))
            print(f"round {r + 1}  {path:<12} {rows[path][-1]:8.1f} images/s", flush=True)
    best = {p: max(v) for p, v in rows.items()}
    ratios = {f"{p}/{base}": best[p] / best[base] for p in ("free-logits", "free-leaves") for base in ("kd", "ce")}
    result = {"provenance": prov, "args": {k: str(v) for k, v in vars(args).items()},
              "macs": {"student": count_macs(student, SHAPE), "teacher": count_macs(teacher, SHAPE)},
              "images_per_second": rows, "best": best, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill_speed.json").write_text(json.dumps(result, indent=2))
    print(describe(prov))
    print("| path | best images/s | " + " | ".join(ratios) + " |")
    for p in PATHS:
        print(f"| {p} | {best[p]:.1f} | " + " | ".join(
            f"{ratios[k]:.2f}" if k.startswith(p + "/") else "" for k in ratios) + " |")


if __name__ == "__main__":
    main()

"""The seed methods' CIFAR-10 protocols, end to end, at a chosen fraction of their epochs.

Each method's protocol is the list of chanprune commands (score, prune, finetune) that does what
its paper's CIFAR-10 ResNet-56 run did, with the authors' settings where their code or paper gives
them (the file read is named in PROTOCOLS); `--fraction` scales every epoch count, the mask-training
epochs included, so a GPU run at 1.0 reproduces the paper's table row and a CPU run at 0.01 its
trend. The commands run in-process (`chanprune_cli.cli.main`) and are recorded, so the report
reproduces itself. The pruned, fine-tuned model is then scored on the whole test split and the
paper's row is printed beside it.

`--protocol lossless` runs every method through the project's own recipe instead (score on 32
batches of 128, one global ranking to half the MACs, 10 epochs distilled from the unpruned model;
`asfp` soft-prunes inside those 10 epochs): the methods compared under one budget.

The model is the project's ResNet-56 (../shared/checkpoints/resnet56-cifar10jpeg.pt, 89.51 % on
the JPEG test split); the papers' baselines were ~93.3-93.6 % on the lossless CIFAR-10, so compare
drops (pruned - baseline), not accuracies. The papers' fine-tune schedules step the learning rate
down at fixed epochs; chanprune's `finetune` decays it by warm-up + cosine from the same initial lr
(the one departure every protocol shares).

    python bench/papers.py --method whitebox --fraction 1 --device cuda          # the paper's run
    python bench/papers.py --method asfp --fraction 0.01 --device cpu --amp bf16 # its trend on a CPU
    python bench/papers.py --method sensitivity --protocol lossless --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from chanprune_cli.checkpoint import load_checkpoint  # noqa: E402
from chanprune_cli.cli import main as chanprune  # noqa: E402
from chanprune_cli.data import open_dataset  # noqa: E402
from chanprune_cli.measure import count_macs, count_params  # noqa: E402
from chanprune_cli.train import validate  # noqa: E402
from provenance import describe, provenance  # noqa: E402

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
SHAPE = (3, 32, 32)
INNER = ("--ignore", "conv1", "--ignore", "layer*.*.conv2")  # the residual streams stay whole


@dataclass(frozen=True)
class Paths:
    checkpoint: str
    arch: str
    train: str
    test: str
    work: Path
    device: str
    amp: str
    seed: int
    max_steps: int | None = None  # a smoke run: every command bounded to this many steps or batches

    def common(self, batch_size: int, *, calibration: bool = True) -> list[str]:
        bound = ["--calib-batches", str(self.max_steps)] if self.max_steps and calibration else []
        return ["--arch", self.arch, "--mean", MEAN, "--std", STD, "--batch-size", str(batch_size),
                "--device", self.device, "--seed", str(self.seed), *bound]

    def tune(self, model: str, *, epochs: int, lr: float, batch_size: int, out: str, extra: list[str] | None = None,
             weight_decay: float = 5e-4, nesterov: bool = False) -> list[str]:
        bound = ["--max-steps", str(self.max_steps), "--val-images", "256"] if self.max_steps else ["--epochs", str(epochs)]
        return ["finetune", model, *self.common(batch_size, calibration=False), "--data", self.train, "--val-data", self.test, *bound,
                "--lr", str(lr), "--weight-decay", str(weight_decay),
                "--nesterov" if nesterov else "--no-nesterov", "--amp", self.amp, "--out", out, "--force", *(extra or [])]


@dataclass(frozen=True)
class Protocol:
    paper: str  # the paper's table row on CIFAR-10 ResNet-56
    source: str  # what was read for the settings
    commands: Callable[[Paths, float], list[list[str]]]


def epochs(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def whitebox(p: Paths, f: float) -> list[list[str]]:
    scores, pruned, out = str(p.work / "wb.scores.safetensors"), str(p.work / "wb.pruned.safetensors"), str(p.work / "wb.safetensors")
    return [
        # class-wise masks: chanprune's budget for a trained network with frozen weights (the authors
        # train masks and weights together from scratch for 30 epochs, see criteria/whitebox.py);
        # the BN rescale by sum_k M / 2 as the authors fold it in
        ["score", p.checkpoint, *p.common(256), "--data", p.train, "--criterion", "whitebox",
         "--criterion-opt", "rescale=true", *(["--criterion-opt", f"steps={p.max_steps}"] if p.max_steps else []),
         "--out", scores, "--force"],
        # global voting on |sum_k M|, inner channels only, every layer keeps 30 %, 55 % of the FLOPs
        ["prune", p.checkpoint, *p.common(256), "--data", p.train, "--scores", scores, "--target-flops", "0.556",
         "--min-keep", "0.3", *INNER, "--out", pruned, "--force"],
        # 300 epochs, lr 0.1 (the authors divide it by 10 at epochs 150 and 225), batch 256
        p.tune(pruned, epochs=epochs(300, f), lr=0.1, batch_size=256, out=out),
    ]


def soft(schedule: str) -> Callable[[Paths, float], list[list[str]]]:
    def commands(p: Paths, f: float) -> list[list[str]]:
        # From the pre-trained model: 200 epochs, lr 0.01 (steps at 60/120/160 ×0.2 in the authors'
        # scripts), batch 128, plain momentum; 40 % of every layer's filters zeroed by L2 norm at
        # the end of every epoch, removed at the end of the run.
        return [p.tune(p.checkpoint, epochs=epochs(200, f), lr=0.01, batch_size=128,
                       out=str(p.work / f"{schedule}.safetensors"),
                       extra=["--schedule", schedule, "--ratio", "0.4", "--prune-until", "1"])]
    return commands


def lossless(method: str) -> Callable[[Paths, float], list[list[str]]]:
    def commands(p: Paths, f: float) -> list[list[str]]:
        out = str(p.work / f"{method}.lossless.safetensors")
        kd = ["--teacher", p.checkpoint, "--teacher-arch", p.arch]
        if method in ("asfp", "cac", "sfp"):  # pruning while training
            return [p.tune(p.checkpoint, epochs=epochs(10, f), lr=0.05, batch_size=128, out=out, nesterov=True,
                           extra=["--schedule", method, "--target-flops", "0.5", *kd])]
        scores, pruned = str(p.work / f"{method}.scores.safetensors"), str(p.work / f"{method}.pruned.safetensors")
        return [["score", p.checkpoint, *p.common(128), "--data", p.train, "--calib-batches", "32", "--criterion", method,
                 "--out", scores, "--force"],
                ["prune", p.checkpoint, *p.common(128), "--data", p.train, "--scores", scores, "--target-flops", "0.5",
                 "--out", pruned, "--force"],
                p.tune(pruned, epochs=epochs(10, f), lr=0.05, batch_size=128, out=out, nesterov=True, extra=kd)]
    return commands


PROTOCOLS: dict[str, Protocol] = {
    "whitebox": Protocol("93.26 → 93.54 (+0.28), FLOPs ↓55.6 %",
                         "zyxxmu/White-Box scripts/resnet56.sh (lam 0.0005 as first published, 0 since 2021-07) and cifar.py",
                         whitebox),
    "asfp": Protocol("93.59 → 93.32 (−0.27), FLOPs ↓52.6 % (DESIGN §7)",
                     "he-y/soft-filter-pruning scripts/cifar10_resnet.sh and pruning_cifar10_resnet.py (SFP; the "
                     "asymptotic rate from the ASFP paper)", soft("asfp")),
    "sfp": Protocol("93.59 → 93.35 (−0.24), FLOPs ↓52.6 %", "he-y/soft-filter-pruning scripts/cifar10_resnet.sh",
                    soft("sfp")),
}
SEEDS = ("whitebox", "asfp", "sensitivity", "info", "cac")
NO_PUBLIC_PROTOCOL = ("sensitivity", "info", "cac")  # no released code; the lossless recipe runs them


def test_top1(path: str, test: str, device: str, images: int | None, arch: str | None = None) -> dict[str, Any]:
    model = load_checkpoint(path, arch=arch).model
    dataset = open_dataset(test, input_shape=SHAPE, mean=tuple(map(float, MEAN.split(","))),
                           std=tuple(map(float, STD.split(","))))
    result = validate(model, dataset, torch.device(device), batch_size=500, max_images=images)
    return {"top1": round(float(result["top1"]), 2), "macs": count_macs(model.cpu(), SHAPE), "params": count_params(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted({*SEEDS, *PROTOCOLS}), required=True)
    parser.add_argument("--protocol", choices=("paper", "lossless"), default="paper",
                        help="paper: the authors' CIFAR protocol (sensitivity, info and cac have none public: lossless)")
    parser.add_argument("--fraction", type=float, default=1.0, help="of every epoch count (at least one epoch each)")
    parser.add_argument("--arch", default="cifar_resnet56")
    parser.add_argument("--checkpoint", default=str(SHARED / "checkpoints" / "resnet56-cifar10jpeg.pt"))
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg-train.tar.gz"))
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10-jpeg-test.tar.gz"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="auto", help="finetune --amp (bf16 on a CPU with native bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", type=int, metavar="N",
                        help="a dry run: every command bounded to N steps or batches, 256 test images")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "papers"))
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    protocol = "lossless" if args.protocol == "lossless" or args.method in NO_PUBLIC_PROTOCOL else "paper"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="papers-") as work:
        paths = Paths(args.checkpoint, args.arch, args.train, args.test, Path(work), args.device, args.amp, args.seed,
                      args.smoke)
        commands = (lossless(args.method) if protocol == "lossless" else PROTOCOLS[args.method].commands)(paths, args.fraction)
        seconds = []
        for command in commands:
            print("$ chanprune " + " ".join(command), flush=True)
            start = time.perf_counter()
            if chanprune(command) != 0:
                raise SystemExit(f"`chanprune {command[0]}` failed")
            seconds.append(round(time.perf_counter() - start, 1))
        images = 256 if args.smoke else None
        baseline = test_top1(args.checkpoint, args.test, args.device, images, args.arch)
        final = test_top1(commands[-1][commands[-1].index("--out") + 1], args.test, args.device, images)
    row = {"method": args.method, "protocol": protocol, "fraction": args.fraction, "smoke": args.smoke,
           "baseline_top1": baseline["top1"], "top1": final["top1"], "drop": round(final["top1"] - baseline["top1"], 2),
           "macs_reduction_pct": round(100 * (1 - final["macs"] / baseline["macs"]), 1), "params": final["params"],
           "paper": PROTOCOLS[args.method].paper if protocol == "paper" else "–",
           "source": PROTOCOLS[args.method].source if protocol == "paper" else "the project's lossless recipe",
           "seconds": seconds, "commands": [" ".join(c) for c in commands]}
    prov = provenance()
    name = f"{args.method}-{protocol}-{args.fraction:g}"
    (out / f"{name}.json").write_text(json.dumps({"provenance": prov, "row": row}, indent=2))
    text = "\n".join([describe(prov), "",
                      "| method | protocol | fraction of epochs | baseline → pruned top-1 | drop | MACs ↓ % | params "
                      "| paper's row | wall s |",
                      "|---|---|---|---|---|---|---|---|---|",
                      f"| {row['method']} | {protocol} | {args.fraction:g} | {row['baseline_top1']:.2f} → {row['top1']:.2f} | "
                      f"{row['drop']:+.2f} | {row['macs_reduction_pct']:.1f} | {row['params']:,} | {row['paper']} | "
                      f"{sum(seconds):.0f} |", "", *[f"    chanprune {c}" for c in row["commands"]], ""])
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

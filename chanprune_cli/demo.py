"""The built-in demo: `python -m chanprune_cli.demo [--out DIR]` (what `make demo` runs).

Offline and quick on 2 CPU cores: train the small `digits_cnn` on scikit-learn's bundled 8×8
digits, save it as a plain state-dict checkpoint, then run the real `chanprune` commands on it.
The demo is a list of stages; later features (prune, finetune, bench) append theirs to STAGES.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

ARCH = "digits_cnn"
# data.py scales digit pixels to [0, 1]; these map them to [-1, 1]. Training and every
# `chanprune` call below must use the same statistics.
MEAN = "0.5"
STD = "0.5"
SEED = 0
EPOCHS = 12
BATCH_SIZE = 64
LR = 3e-3


@dataclass
class DemoContext:
    """What the stages share: the output directory and the files earlier stages made."""

    out: Path
    seed: int = SEED
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    describe: str
    run: Callable[[DemoContext], None]


def _say(text: str) -> None:
    print(text, flush=True)


def run_chanprune(args: list[str]) -> None:
    """Run a `chanprune` command through the real entry point, showing the command line first."""
    from .cli import main

    _say("$ chanprune " + shlex.join(args))
    code = main(args)
    if code != 0:
        raise SystemExit(f"demo: `chanprune {args[0]}` failed with exit code {code}")


def train_stage(ctx: DemoContext) -> None:
    """Train digits_cnn on digits:train with a fixed seed; save {'state_dict', 'arch'}."""
    import torch

    from .data import make_loader
    from .fsutil import atomic_path
    from .models import build_model, default_input_shape, parse_arch

    torch.manual_seed(ctx.seed)  # same weights, same data order, same result on every run
    spec = parse_arch(ARCH, None)
    model = build_model(spec)
    loader = make_loader(
        "digits:train",
        batch_size=BATCH_SIZE,
        seed=ctx.seed,
        shuffle=True,
        train=True,
        input_shape=default_input_shape(spec),
        mean=(float(MEAN),),
        std=(float(STD),),
    )
    # The model is tiny: with more than one thread, synchronisation costs more than the maths
    # (10-30x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(model, loader)
    finally:
        torch.set_num_threads(threads)

    path = ctx.out / f"{ARCH}.pt"
    with atomic_path(path) as tmp:  # a plain state dict, the most common checkpoint form
        torch.save({"state_dict": model.state_dict(), "arch": ARCH}, tmp)
    ctx.files["checkpoint"] = path
    _say(f"  saved {path}")


def _train(model: nn.Module, loader: DataLoader) -> None:
    """Adam with a one-cycle schedule; prints a few epoch summaries."""
    import torch
    from torch import nn

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=EPOCHS * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        total, correct, loss_sum = 0, 0, 0.0
        for images, labels in loader:
            optimizer.zero_grad()
            logits = model(images)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
        if epoch in (0, EPOCHS - 1) or (epoch + 1) % 4 == 0:
            _say(f"  epoch {epoch + 1:2d}/{EPOCHS}  loss {loss_sum / total:.3f}  train acc {100 * correct / total:.1f} %")
    model.eval()


def analyze_stage(ctx: DemoContext) -> None:
    """`chanprune analyze` on the trained checkpoint, with test accuracy and a JSON report."""
    report = ctx.out / "analyze.json"
    run_chanprune([
        "analyze", str(ctx.files["checkpoint"]), "--arch", ARCH,
        "--data", "digits:test", "--mean", MEAN, "--std", STD, "--seed", str(ctx.seed),
        "--json", str(report), "--force",
    ])
    ctx.files["analyze_json"] = report


def prune_stage(ctx: DemoContext) -> None:
    """`chanprune prune`: remove half of the MACs by L1 norm, verify, save a chanprune file."""
    pruned = ctx.out / f"{ARCH}.pruned.safetensors"
    run_chanprune([
        "prune", str(ctx.files["checkpoint"]), "--arch", ARCH, "--criterion", "l1",
        "--target-flops", "0.5", "--out", str(pruned), "--json", str(ctx.out / "prune.json"), "--force",
    ])
    ctx.files["pruned"] = pruned


def analyze_pruned_stage(ctx: DemoContext) -> None:
    """`chanprune analyze` on the pruned file: no --arch needed, accuracy right after pruning."""
    run_chanprune([
        "analyze", str(ctx.files["pruned"]), "--data", "digits:test", "--mean", MEAN, "--std", STD,
        "--seed", str(ctx.seed), "--json", str(ctx.out / "analyze-pruned.json"), "--force",
    ])


def finetune_stage(ctx: DemoContext) -> None:
    """`chanprune finetune`: recover the pruned model's accuracy in a few epochs (SGD, cosine lr)."""
    tuned = ctx.out / f"{ARCH}.finetuned.safetensors"
    run_chanprune([
        "finetune", str(ctx.files["pruned"]), "--data", "digits:train", "--val-data", "digits:test",
        "--mean", MEAN, "--std", STD, "--epochs", "3", "--lr", "0.05", "--threads", "1",
        "--seed", str(ctx.seed), "--out", str(tuned), "--json", str(ctx.out / "finetune.json"), "--force",
    ])
    ctx.files["finetuned"] = tuned


STAGES: list[Stage] = [
    Stage("train", "train a small CNN on the bundled 8×8 digits (a few seconds on CPU)", train_stage),
    Stage("analyze", "layers, params, MACs, size and test accuracy", analyze_stage),
    Stage("prune", "remove 50 % of the MACs (L1 norm), verify against the masked original", prune_stage),
    Stage("analyze pruned", "the pruned chanprune file reloads without --arch", analyze_pruned_stage),
    Stage("finetune", "fine-tune the pruned model for 3 epochs to recover its accuracy", finetune_stage),
]


def run_demo(out: Path, stages: list[Stage] | None = None) -> DemoContext:
    """Run the stages in order into `out` (created if missing); return the shared context."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out)
    todo = STAGES if stages is None else stages
    for i, stage in enumerate(todo, 1):
        _say(f"\n== [{i}/{len(todo)}] {stage.name}: {stage.describe}")
        start = time.perf_counter()
        stage.run(ctx)
        _say(f"   ({stage.name} took {time.perf_counter() - start:.1f} s)")
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chanprune_cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out/)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ctx = run_demo(args.out)
    _say(f"\ndemo finished in {time.perf_counter() - start:.1f} s; outputs in {ctx.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

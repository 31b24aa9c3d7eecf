"""The built-in demo: `python -m chanprune_cli.demo [--out DIR]` (what `make demo` runs).

Offline and quick on 2 CPU cores: train the small `digits_cnn` on scikit-learn's bundled 8×8
digits, save it as a plain state-dict checkpoint, then run the real `chanprune` commands on it.
Then `chanprune run` drives the whole pipeline from a config file the demo writes.
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
    """Train digits_cnn on digits:train with a fixed seed; save {'state_dict', 'arch'}. A checkpoint
    an earlier demo saved is kept: torch.save writes other bytes every time (a random archive id),
    so retraining would make every stage of `chanprune run` see a new checkpoint and run again."""
    path = ctx.out / f"{ARCH}.pt"
    ctx.files["checkpoint"] = path
    if path.is_file():
        _say(f"  {path} exists: kept (delete it to train again)")
        return
    import torch

    from .data import make_loader
    from .models import build_model, default_input_shape, parse_arch
    from .support.fsutil import atomic_path

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

    with atomic_path(path) as tmp:  # a plain state dict, the most common checkpoint form
        torch.save({"state_dict": model.state_dict(), "arch": ARCH}, tmp)
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


# The pipeline as a user would write it: `chanprune run` reads this, runs every stage into run/,
# and a re-run skips the stages whose inputs did not change.
PIPELINE_CONFIG = f"""\
# chanprune run demo.toml: analyze -> score -> prune -> finetune -> export -> bench
checkpoint = "{ARCH}.pt"
arch = "{ARCH}"
mean = {MEAN}
std = {STD}
seed = {SEED}
threads = 1                 # a tiny model: one CPU thread is fastest (every command takes --threads)

[analyze]
data = "digits:test"        # accuracy of the trained model

[score]
criterion = "l1"

[prune]
target_flops = 0.5          # remove half of the MACs, one global ranking
data = "digits:train"       # BatchNorm recalibration batches
val_data = "digits:test"    # top-1 before / after pruning / after recalibration

[finetune]
data = "digits:train"
val_data = "digits:test"
epochs = 3
lr = 0.05

[export]
format = "torchscript"      # checked with torch.jit.load before it is kept

[bench]
data = "digits:test"
batch_sizes = "1,32"
max_acc_drop = 3.0          # a CI gate: exit 3 if the fine-tuned model lost more than 3 points
"""


def pipeline_stage(ctx: DemoContext) -> None:
    """Write demo.toml and run the whole pipeline with `chanprune run`; the last table is bench's."""
    from .support.fsutil import write_text_atomic

    config = ctx.out / "demo.toml"
    write_text_atomic(config, PIPELINE_CONFIG)
    _say(f"  wrote {config}:")
    for line in PIPELINE_CONFIG.splitlines():
        _say("    " + line)
    run_chanprune(["run", str(config), "--dir", str(ctx.out / "run"), "--json", str(ctx.out / "run.json")])
    ctx.files["run"] = ctx.out / "run"


STAGES: list[Stage] = [
    Stage("train", "train a small CNN on the bundled 8×8 digits (a few seconds on CPU)", train_stage),
    Stage("pipeline", "chanprune run: analyze, score, prune (50 % MACs), finetune, export, bench", pipeline_stage),
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

"""Throughput of the data-driven criteria vs plain forward / forward+backward loops.

Model: the built-in cifar_resnet20 (random weights: speed does not depend on them), synthetic
CIFAR-shaped batches with labels. Every criterion scores the same `--batches` batches after one
warm-up call on a single batch; images/s include everything `score()` does (hook setup, the
BatchNorm pairing probe, statistics, final scoring). Baselines: eval-mode forward under
inference_mode, and eval-mode forward + cross-entropy + backward to every weight (a training
step without the optimizer). All methods are run `--repeats` times in interleaved rounds and the
best time is kept, which filters out noise from other processes sharing the CPU. Two clocks are
reported: wall time, and the CPU time of this process (`time.process_time`, all threads). On a
shared, oversubscribed machine the CPU-time column is the trustworthy one, best with
`--threads 1` (no OpenMP spin-waiting in it).

Usage:
    python bench/criteria_speed.py [--batches 8] [--batch-size 64] [--threads 2] [--device cpu]
                                   [--arch cifar_resnet20] [--criteria taylor,hrank,...]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from chanprune_cli.criteria import get_criterion
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.models import ArchSpec, build_model

DEFAULT = ("taylor", "taylor:per_sample=true", "hrank", "sensitivity", "sensitivity:hessian=activation",
           "info", "cac", "whitebox")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: object) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()  # type: ignore[operator]
    return time.perf_counter() - wall, time.process_time() - cpu


def _baseline(model: torch.nn.Module, data: list, device: torch.device, backward: bool) -> tuple[float, float]:
    model.eval()
    params = [p for p in model.parameters()]

    def run(batches: list) -> None:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if backward:
                loss = F.cross_entropy(model(x), y)
                torch.autograd.grad(loss, params)
            else:
                with torch.inference_mode():
                    model(x)

    run(data[:1])
    _sync(device)
    return _timed(lambda: (run(data), _sync(device)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--criteria", default=",".join(DEFAULT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ArchSpec(args.arch)).to(device)
    graph = build_graph(model, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.batch_size,), generator=gen))
            for _ in range(args.batches)]
    images = args.batches * args.batch_size

    specs = args.criteria.split(",")
    best: dict[str, tuple[float, float]] = {}

    def record(key: str, seconds: tuple[float, float]) -> None:
        old = best.get(key, (float("inf"), float("inf")))
        best[key] = (min(old[0], seconds[0]), min(old[1], seconds[1]))

    for _ in range(args.repeats):
        record("forward (inference_mode)", _baseline(model, data, device, backward=False))
        record("forward+backward (baseline)", _baseline(model, data, device, backward=True))
        for spec in specs:
            name, _, opt_text = spec.partition(":")
            options = dict(kv.split("=", 1) for kv in opt_text.split(";") if kv)
            criterion = get_criterion(name)
            criterion.score(model, graph, data[:1], device, seed=0, **options)  # warm-up
            _sync(device)
            record(spec, _timed(lambda: (criterion.score(model, graph, data, device, seed=0, **options), _sync(device))))  # noqa: B023
    base_wall, base_cpu = best["forward+backward (baseline)"]
    print(f"{args.arch}, batch {args.batch_size}, {args.batches} batches, {args.threads} threads, {device}, "
          f"best of {args.repeats}, torch {torch.__version__}")
    print(f"{'method':<34} {'img/s wall':>10} {'vs fwd+bwd':>10} {'img/CPU-s':>10} {'vs fwd+bwd':>10}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<34} {images / wall:>10.1f} {base_wall / wall:>9.2f}x {images / cpu:>10.1f} {base_cpu / cpu:>9.2f}x")


if __name__ == "__main__":
    main()

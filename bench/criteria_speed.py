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

`--count-ops` reports, instead of times, what each method costs per batch whatever the device:
the tensor operations dispatched (on a GPU, about one kernel launch each; views included) and the
values read back to the host (`.item()`, `float()`, a tensor's truth value: on a GPU each one
makes the host wait for the device). The label range check of `criteria.gates.batches`, which
reads the labels on the host before they move, is not counted. Per batch = (count over 4 batches
- count over 1 batch) / 3, so the fixed cost of one `score()` call drops out.

Usage:
    python bench/criteria_speed.py [--batches 8] [--batch-size 64] [--threads 2] [--device cpu]
                                   [--arch cifar_resnet20] [--criteria taylor,hrank,...] [--count-ops]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from chanprune_cli.criteria import get_criterion
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.models import ArchSpec, build_model
from provenance import describe, provenance

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


def count_ops(model: torch.nn.Module, graph: object, data: list, device: torch.device, specs: list[str]) -> None:
    """Operations and host reads per batch of the baselines and of every criterion (see the module doc)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from chanprune_cli.criteria import gates as gates_module

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()
            self.host = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if not self.host:
                self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    mode = Ops()
    # Load every criterion before wrapping the host check: a criterion that imports `check_labels`
    # for its own per-batch checks keeps the real one (and its reads count).
    criteria = {spec: get_criterion(spec.partition(":")[0]) for spec in specs}
    real_check = gates_module.check_labels

    def host_check(y: torch.Tensor, classes: int) -> None:  # the labels, read before they move
        mode.host = True
        try:
            real_check(y, classes)
        finally:
            mode.host = False

    gates_module.check_labels = host_check  # type: ignore[assignment]

    def per_batch(run: object) -> tuple[float, float]:
        counts = []
        for n in (1, 4):
            mode.ops.clear()
            with mode:
                run(data[:n])  # type: ignore[operator]
            counts.append((sum(mode.ops.values()), mode.ops["aten._local_scalar_dense"]))
        return (counts[1][0] - counts[0][0]) / 3, (counts[1][1] - counts[0][1]) / 3

    def baseline(batches: list) -> None:
        params = list(model.parameters())
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            torch.autograd.grad(F.cross_entropy(model(x), y), params)

    model.eval()
    base_ops, _ = per_batch(baseline)
    print(f"{'method':<34} {'ops/batch':>10} {'vs fwd+bwd':>10} {'reads/batch':>12}")
    print(f"{'forward+backward (baseline)':<34} {base_ops:>10.0f} {1.0:>9.2f}x {0.0:>12.1f}")
    for spec in specs:
        options = dict(kv.split("=", 1) for kv in spec.partition(":")[2].split(";") if kv)
        criterion = criteria[spec]
        ops, reads = per_batch(lambda b: criterion.score(model, graph, b, device, seed=0, **options))  # noqa: B023
        print(f"{spec:<34} {ops:>10.0f} {ops / base_ops:>9.2f}x {reads:>12.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--criteria", default=",".join(DEFAULT))
    ap.add_argument("--count-ops", action="store_true", help="count operations and host reads per batch instead of timing")
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
    if args.count_ops:
        if len(data) < 4:
            ap.error("--count-ops needs --batches 4 or more")
        print(describe(provenance()))
        print(f"{args.arch}, batch {args.batch_size}, {device}")
        count_ops(model, graph, data, device, specs)
        return
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
    print(describe(provenance()))
    print(f"{args.arch}, batch {args.batch_size}, {args.batches} batches, {args.threads} threads, {device}, "
          f"best of {args.repeats}")
    print(f"{'method':<34} {'img/s wall':>10} {'vs fwd+bwd':>10} {'img/CPU-s':>10} {'vs fwd+bwd':>10}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<34} {images / wall:>10.1f} {base_wall / wall:>9.2f}x {images / cpu:>10.1f} {base_cpu / cpu:>9.2f}x")


if __name__ == "__main__":
    main()

"""Fine-tuning benchmark: accuracy after a fixed budget for one-shot pruning vs training-time pruning.

Model: ResNet-56 adapted to CIFAR-10 JPEG (../shared/checkpoints/resnet56-cifar10jpeg.pt), 50 % of
the MACs removed (`--target-flops`). Every method gets the same number of optimizer steps of the
same global batch, the same lr schedule (SGD nesterov, warm-up + cosine) and seed, then top-1 on
the test split:

  oneshot  `chanprune prune --criterion C --target-flops F` + `chanprune finetune`
  kd       the same pruned model, `chanprune finetune --teacher <unpruned checkpoint>`
  asfp     `chanprune finetune <unpruned> --schedule asfp --target-flops F` (soft pruning, removal at
           `--asfp-until` of the run, then the rest fine-tunes the smaller model)
  cac      `chanprune finetune <unpruned> --schedule cac --target-flops F` (online gates, removal in the
           first 25 % of the run)

Each method runs the real commands in-process (`chanprune_cli.cli.main`), so the commands recorded
in the report reproduce it. Training throughput: our loop (`Trainer`, no validation) on its two
input paths (small images held as one tensor on the device and cropped there, or decoded and
augmented per step) vs a plain PyTorch loop (same model, per-step loader, optimizer and loss) on
the one-shot pruned model, interleaved rounds, best round kept (the machine may be shared).

Usage (the recorded CPU run, see BENCHMARKS.md):
    python bench/finetune.py --steps 200 --threads 1 --out bench/out/finetune
Throughput only (the input paths; prunes the model it needs first):
    python bench/finetune.py --throughput-only --threads 2 --throughput-steps 30 --throughput-rounds 3 --out bench/out/ft-speed
    (add --amp bf16 for bf16 autocast, on a GPU or a CPU with native bf16)
Quick smoke run:
    python bench/finetune.py --steps 3 --eval-images 256 --throughput-steps 2 --out /tmp/ftb
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from chanprune_cli.checkpoint import load_checkpoint  # noqa: E402
from chanprune_cli.cli import main as chanprune  # noqa: E402
from chanprune_cli.data import make_loader, open_dataset  # noqa: E402
from chanprune_cli.measure import count_macs, count_params  # noqa: E402
from chanprune_cli.train import TrainConfig, Trainer, validate  # noqa: E402
from chanprune_cli.train.precision import autocast, resolve_amp  # noqa: E402
from provenance import describe, provenance  # noqa: E402

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
SHAPE = (3, 32, 32)
METHODS = ("oneshot", "kd", "asfp", "cac")


def run(args: list[str]) -> float:
    print("$ chanprune " + " ".join(args), flush=True)
    start = time.perf_counter()
    code = chanprune(args)
    if code != 0:
        raise SystemExit(f"`chanprune {args[0]}` failed with exit code {code}")
    return time.perf_counter() - start


def test_top1(path: Path, test: Any, device: torch.device, eval_images: int) -> dict[str, Any]:
    model = load_checkpoint(path).model
    return validate(model, test, device, batch_size=500, max_images=eval_images)


def throughput(model_path: Path, train: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """images/s of our Trainer on each input path vs a plain loop: same model, data, optimizer and
    loss; interleaved rounds, best kept. `tensor`: small images held as one tensor on the device,
    cropped and flipped there (`--tensor-cache`); `loader`: decoded and augmented per item
    (`--no-tensor-cache`, the path every run took before the tensor path existed)."""
    base = load_checkpoint(model_path).model
    dataset = open_dataset(train, input_shape=SHAPE, mean=MEAN, std=STD, train=True)
    steps, bs = args.throughput_steps, args.batch_size
    started = time.perf_counter()
    from chanprune_cli.data.tensorcache import tensor_images

    tensor_images(dataset, workers=args.workers or 0)  # decoded once (or read from the cache folder)
    prepare_s = time.perf_counter() - started

    def ours(tensor: bool) -> tuple[float, float]:
        model = copy.deepcopy(base)
        cfg = TrainConfig(max_steps=steps, batch_size=bs, lr=0.01, progress=False, save_every=None, seed=args.seed,
                          workers=args.workers, tensor_cache=tensor, compile=args.compile, amp=args.amp)
        trainer = Trainer(model, dataset, cfg, device=device)
        cpu = time.process_time()
        result = trainer.fit()
        return result.images_per_second, result.train_images / max(time.process_time() - cpu, 1e-9)

    amp_dtype = resolve_amp(args.amp, device)
    channels_last = device.type == "cuda"  # as the Trainer decides for the trained model by default

    def plain() -> tuple[float, float]:
        model = copy.deepcopy(base).to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loader = make_loader(dataset, batch_size=bs, seed=args.seed, shuffle=True, workers=args.workers or 0,
                             max_batches=steps, drop_last=True)
        images = 0
        start, cpu = time.perf_counter(), time.process_time()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start), images / max(time.process_time() - cpu, 1e-9)

    runs = {"tensor": lambda: ours(True), "loader": lambda: ours(False), "plain": plain}
    rounds: dict[str, list[float]] = {k: [] for k in runs}
    cpu_rounds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.throughput_rounds):
        for name, fn in runs.items():
            wall, cpu = fn()
            rounds[name].append(wall)
            cpu_rounds[name].append(cpu)
    best = {k: max(v) for k, v in rounds.items()}
    best_cpu = {k: max(v) for k, v in cpu_rounds.items()}
    return {"steps": steps, "batch_size": bs, "workers": args.workers, "compile": args.compile, "amp": args.amp,
            "tensor_prepare_s": prepare_s, "rounds": rounds, "cpu_rounds": cpu_rounds, "best": best,
            "best_per_cpu_second": best_cpu, "ours": best["tensor"], "plain": best["plain"],
            "ratio": best["tensor"] / best["plain"] if best["plain"] else None,
            "tensor_vs_loader": best["tensor"] / best["loader"] if best["loader"] else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "checkpoints" / "resnet56-cifar10jpeg.pt")
    parser.add_argument("--arch", default="cifar_resnet56")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg-train.tar.gz"))
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10-jpeg-test.tar.gz"))
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--criterion", default="taylor", help="criterion of the one-shot methods")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method (the budget)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--asfp-interval", type=int, default=None, help="ASFP interval in steps (default: steps/10)")
    parser.add_argument("--asfp-until", type=float, default=0.75)
    parser.add_argument("--kd-alpha", type=float, default=0.5)
    parser.add_argument("--eval-images", type=int, default=10000)
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--throughput-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: finetune's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the throughput runs")
    parser.add_argument("--amp", default="auto", help="finetune --amp for every run (bf16: also on CPUs with native bf16)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the throughput comparison (prunes the model it needs first)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "finetune")
    args = parser.parse_args()

    if not args.checkpoint.exists() or not Path(args.train).exists() or not Path(args.test).exists():
        print(f"skipped: {args.checkpoint} or the CIFAR-10 JPEG data is absent", file=sys.stderr)
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from chanprune_cli.support.device import resolve_device

    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [] if args.throughput_only else [m.strip() for m in args.methods.split(",") if m.strip()]
    common = ["--data", args.train, "--val-data", args.test, "--mean", MEAN, "--std", STD,
              "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--seed", str(args.seed), "--device", args.device, "--save-every", str(max(args.steps, 1)), "--force"]
    if args.workers is not None:
        common += ["--workers", str(args.workers)]
    if args.amp != "auto":
        common += ["--amp", args.amp]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    if args.eval_images < 10000:
        common += ["--val-images", str(args.eval_images)]
    test = open_dataset(args.test, input_shape=SHAPE, mean=MEAN, std=STD, train=False)
    base = load_checkpoint(args.checkpoint, arch=args.arch).model
    base_macs, base_params = count_macs(base, SHAPE), count_params(base)
    started = datetime.now(timezone.utc)
    results: dict[str, Any] = {}
    commands: dict[str, list[str]] = {}

    def record(name: str, out: Path, report: Path, seconds: float, extra: dict[str, Any]) -> None:
        doc = json.loads(report.read_text())
        results[name] = {"top1": doc["final"]["top1"], "top5": doc["final"]["top5"],
                         "params": doc["after"]["params"], "macs": doc["after"]["macs"],
                         "macs_reduction": 100 * (1 - doc["after"]["macs"] / base_macs),
                         "train_images_per_second": doc["train"]["images_per_second"],
                         "wall_s": seconds, "output": str(out), **extra}
        print(json.dumps({name: results[name]}), flush=True)

    pruned = args.out / "r56-pruned.safetensors"
    if {"oneshot", "kd"} & set(methods) or (args.throughput_only and not pruned.exists()):
        prune_args = ["prune", str(args.checkpoint), "--arch", args.arch, "--criterion", args.criterion,
                      "--target-flops", str(args.target_flops), "--data", args.train, "--mean", MEAN, "--std", STD,
                      "--calib-batches", str(args.calib_batches), "--batch-size", str(args.batch_size),
                      "--seed", str(args.seed), "--out", str(pruned), "--json", str(args.out / "prune.json"), "--force"]
        commands["prune"] = prune_args
        prune_s = run(prune_args)
        if methods:
            before = test_top1(pruned, test, device, args.eval_images)
            results["pruned_no_finetune"] = {"top1": before["top1"], "top5": before["top5"], "prune_s": prune_s,
                                             "eval_images": before["images"]}
            print(json.dumps({"pruned_no_finetune": results["pruned_no_finetune"]}), flush=True)
    for name in methods:
        out, report = args.out / f"r56-{name}.safetensors", args.out / f"{name}.json"
        if name == "oneshot":
            cmd = ["finetune", str(pruned), *common, "--out", str(out), "--json", str(report)]
        elif name == "kd":
            cmd = ["finetune", str(pruned), *common, "--teacher", str(args.checkpoint), "--kd-alpha",
                   str(args.kd_alpha), "--out", str(out), "--json", str(report)]
        elif name == "asfp":
            interval = args.asfp_interval or max(1, args.steps // 10)
            cmd = ["finetune", str(args.checkpoint), "--arch", args.arch, *common, "--schedule", "asfp",
                   "--target-flops", str(args.target_flops), "--prune-every", str(interval),
                   "--prune-until", str(args.asfp_until), "--out", str(out), "--json", str(report)]
        elif name == "cac":
            cmd = ["finetune", str(args.checkpoint), "--arch", args.arch, *common, "--schedule", "cac",
                   "--target-flops", str(args.target_flops), "--out", str(out), "--json", str(report)]
        else:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        commands[name] = cmd
        seconds = run(cmd)
        record(name, out, report, seconds, {})

    speed = None
    if args.throughput_steps > 0 and pruned.exists():
        speed = throughput(pruned, args.train, args, device)
        print(json.dumps({"throughput": speed}), flush=True)

    finished = datetime.now(timezone.utc)
    doc = {
        "benchmark": "finetune",
        "provenance": provenance(),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "device": str(device),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "checkpoint": str(args.checkpoint),
        "baseline": {"params": base_params, "macs": base_macs},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commands": {k: "chanprune " + " ".join(v) for k, v in commands.items()},
        "results": results,
        "throughput": speed,
    }
    (args.out / "finetune.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "finetune.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    machine = f"Device {doc['device']}, load average {', '.join(f'{v:.1f}' for v in doc['load_average'] or [])}."
    head = [
        f"ResNet-56 (CIFAR-10 JPEG baseline checkpoint), {100 * s['target_flops']:.0f} % of the MACs removed, "
        f"{s['steps']} steps of batch {s['batch_size']} per method (SGD nesterov, lr {s['lr']}, warm-up + cosine), "
        f"top-1 on {s['eval_images'] if s['eval_images'] < 10000 else 10000} test images. " + machine,
        "",
        "| method | top-1 % | top-5 % | MACs removed | params | train img/s | wall s |",
        "|---|---|---|---|---|---|---|",
    ] if doc["results"] else [machine]
    lines = [describe(doc["provenance"]), "", *head]
    labels = {"pruned_no_finetune": f"one-shot `{s['criterion']}`, no fine-tuning",
              "oneshot": f"(i) one-shot `{s['criterion']}` + fine-tune",
              "kd": f"(ii) one-shot `{s['criterion']}` + fine-tune with `--teacher` (α {s['kd_alpha']})",
              "asfp": f"(iii) ASFP (`--schedule asfp`, removal at {100 * s['asfp_until']:.0f} % of the steps)",
              "cac": "(iv) CAC (`--schedule cac`, removal in the first 25 % of the steps)"}
    for name, r in doc["results"].items():
        macs = f"{r['macs_reduction']:.1f} %" if "macs_reduction" in r else "same as (i)"
        params = f"{r['params']:,}" if "params" in r else ""
        speed = f"{r['train_images_per_second']:.0f}" if "train_images_per_second" in r else ""
        wall = r.get("wall_s", r.get("prune_s"))
        lines.append(f"| {labels.get(name, name)} | {r['top1']:.2f} | {r['top5']:.2f} | {macs} | {params} | {speed} | "
                     f"{wall:.0f} |")
    t = doc.get("throughput")
    if t:
        lines += ["", f"Training throughput on the one-shot pruned model ({t['steps']} steps of batch {t['batch_size']}, "
                  f"data loading included, best of {len(t['rounds']['tensor'])} interleaved rounds, workers "
                  f"{t['workers'] if t['workers'] is not None else 'default'}"
                  f"{', torch.compile' if t['compile'] else ''}{', --amp ' + t['amp'] if t.get('amp', 'auto') != 'auto' else ''}"
                  f"; the tensor path's one-time decode or cache read "
                  f"took {t['tensor_prepare_s']:.1f} s):", "",
                  "| loop | img/s (wall) | img per CPU-second (main process) |", "|---|---|---|"]
        labels = {"tensor": "ours, tensor path (images on the device)", "loader": "ours, loader path (decode per step)",
                  "plain": "plain PyTorch loop (decode per step)"}
        for name, label in labels.items():
            lines.append(f"| {label} | {t['best'][name]:.1f} | {t['best_per_cpu_second'][name]:.1f} |")
        lines += ["", f"tensor path / loader path {t['tensor_vs_loader']:.2f}×, tensor path / plain loop {t['ratio']:.2f}×."]
    lines += ["", "Commands:", ""] + [f"    {c}" for c in doc["commands"].values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

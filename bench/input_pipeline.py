"""Large-image input pipeline: the loader path vs `--device-decode`, images per second.

Makes a folder of ImageNet-sized JPEGs (about 500x375 for a 224 px input, scaled with `--size`;
smooth gradients under noise, so that they compress like photographs), then times the training
batches of each input path alone (`train.inputs.TrainInputs`: RandomResizedCrop + flip,
normalised, on `--device`; no model), for each `--workers` count. `bench/gpu_check.py` reuses it
on the GPU, with whole ResNet-50 training steps besides. The recorded CPU run:

    .venv/bin/python bench/input_pipeline.py --workers 0,2 --rounds 2

A quick check that the script works (seconds, numbers meaningless):

    .venv/bin/python bench/input_pipeline.py --images 40 --size 96 --batch 8 --steps 3 --workers 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def jpeg_folder(root: Path, images: int, size: int) -> Path:
    """`images` JPEGs in 10 class folders under `root` (kept: made once per size and count)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v * size / 224) for v in (rng.integers(400, 520), rng.integers(300, 400)))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 60 * (i % 3)], -1)
        pixels = (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        target = folder / f"{i}.jpg"
        if not target.exists():
            Image.fromarray(pixels).save(target, quality=90)
    return root


def mean_kb(folder: Path) -> float:
    """Mean size of the JPEGs under `folder`, in KB."""
    sizes = [f.stat().st_size for f in folder.rglob("*.jpg")]
    return sum(sizes) / len(sizes) / 1024


def pipeline_rate(dataset: Any, *, device: torch.device, batch: int, steps: int, workers: int,
                  device_decode: bool) -> float:
    """Images per second of one input path alone: `steps` batches after two warm-up batches."""
    from chanprune_cli.support import distributed as D
    from chanprune_cli.train.inputs import TrainInputs

    inputs = TrainInputs(dataset, batch_size=batch, steps_per_epoch=max(1, len(dataset) // batch), seed=0,
                         workers=workers, device=device, env=D.DistEnv(), tensor=False, device_decode=device_decode)
    batches = inputs.batches(0, steps + 2)
    for _ in range(2):  # workers started, first batches in flight
        next(batches)
    start = time.perf_counter()
    for x, _ in batches:
        x.sum().item()  # the batch is really there (waits for the device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", default="0,2", help="comma-separated loader worker counts")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the paths this many times; the best round counts")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chanprune-input-pipeline"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from chanprune_cli.data import open_dataset
    from provenance import describe, provenance

    device = torch.device(args.device)
    folder = jpeg_folder(args.work / f"jpegs-{args.images}-{args.size}", args.images, args.size)
    dataset = open_dataset(str(folder), input_shape=(3, args.size, args.size), train=True)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        best = {"loader": 0.0, "device-decode": 0.0}
        for _ in range(args.rounds):
            for path in best:
                rate = pipeline_rate(dataset, device=device, batch=args.batch, steps=args.steps, workers=workers,
                                     device_decode=path == "device-decode")
                best[path] = max(best[path], rate)
        rows.append({"workers": workers, **best})
    prov = provenance()
    print(describe(prov))
    print(f"{len(dataset)} JPEGs of {mean_kb(folder):.1f} KB on average -> {args.size} px, batch "
          f"{args.batch}, {args.steps} steps, {device}, {torch.get_num_threads()} threads, best of {args.rounds}\n")
    print("| workers | loader img/s | device decode img/s | device / loader |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['loader']:.1f} | {r['device-decode']:.1f} | {r['device-decode'] / r['loader']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"provenance": prov, "device": str(device), "size": args.size, "batch": args.batch,
                                         "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

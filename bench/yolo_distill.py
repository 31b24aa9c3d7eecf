"""Recovery of a pruned YOLO without labels: the teacher gap before and after label-free distillation.

YOLOv8n from ultralytics' bundled yaml (YOLO_OFFLINE=1, nothing downloaded) with ultralytics'
random initialisation, its norm statistics measured on the training images (as training leaves
them), saved as ultralytics saves a trained model; then the real commands:

    chanprune prune yolov8n.pt --trust-pickle --input-shape 3,S,S --target-flops F
    chanprune finetune yolov8n.pruned.pt --trust-pickle --teacher yolov8n.pt --data DATA --max-steps N

`--data` defaults to the CIFAR-10 JPEG training split of ../shared (32 px images, enlarged to S;
read without their labels; pixels in [0, 1], as YOLO takes them), else synthetic images. The teacher gap is measured on 256 images of
--data set aside from training (`--gap-images` of them; the mean relative L2 distance of the student's outputs to the
teacher's; lower is closer).

Usage (the recorded run, see BENCHMARKS.md):
    python bench/yolo_distill.py --size 320 --steps 500 --batch 8 --threads 2 --out bench/out/yolo-distill
Quick smoke run:
    python bench/yolo_distill.py --size 64 --steps 2 --batch 4 --out /tmp/yolo-distill
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from chanprune_cli.cli import main as chanprune  # noqa: E402
from chanprune_cli.data import open_dataset  # noqa: E402
from provenance import describe, provenance  # noqa: E402


def original(path: Path, size: int, data: str) -> None:
    """yolov8n, random weights, norm statistics of 8 batches of --data, as ultralytics saves it."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False)
    images = open_dataset(data, input_shape=(3, size, size), mean=(0, 0, 0), std=(1, 1, 1), unlabelled=True)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for b in range(8):
            model(torch.stack([images[(b * 16 + i) * 97 % len(images)][0] for i in range(16)]))
    torch.save({"epoch": -1, "model": model.eval().half(), "ema": None, "optimizer": None, "updates": None,
                "train_args": {"model": "yolov8n.yaml", "task": "detect", "imgsz": size}}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--augment", action="store_true",
                        help="train on finetune's crops and flips (default off: with them the gap grew, BENCHMARKS.md)")
    parser.add_argument("--gap-images", type=int, default=256, help="held-out images the teacher gap is measured on")
    parser.add_argument("--target-flops", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="default: ../shared's CIFAR-10 JPEG training split, else synthetic")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cifar = SHARED / "data" / "cifar10-jpeg-train.tar.gz"
    data = args.data or (str(cifar) if cifar.exists() else f"synthetic:3x{args.size}x{args.size}:10:4096")
    args.out.mkdir(parents=True, exist_ok=True)
    prov = provenance(threads=args.threads)
    teacher, pruned, tuned = (args.out / n for n in ("yolov8n.pt", "yolov8n.pruned.pt", "yolov8n.distilled.pt"))
    torch.set_num_threads(args.threads)
    original(teacher, args.size, data)
    # YOLO takes pixels in [0, 1]: no normalisation
    common = ["--trust-pickle", "--threads", str(args.threads), "--force", "--mean", "0,0,0", "--std", "1,1,1"]
    code = chanprune(["prune", str(teacher), *common, "--input-shape", f"3,{args.size},{args.size}",
                      "--target-flops", str(args.target_flops), "--out", str(pruned), "--json", str(args.out / "prune.json")])
    assert code == 0, "prune failed"
    started = time.perf_counter()
    code = chanprune(["finetune", str(pruned), *common, "--teacher", str(teacher), "--data", data,
                      "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--lr", str(args.lr),
                      "--grad-clip", str(args.grad_clip), "--val-images", str(args.gap_images),
                      "--augment" if args.augment else "--no-augment",
                      "--device", "cpu", "--out", str(tuned), "--json", str(args.out / "finetune.json")])
    assert code == 0, "finetune failed"
    seconds = time.perf_counter() - started
    pruned_doc = json.loads((args.out / "prune.json").read_text())
    doc = json.loads((args.out / "finetune.json").read_text())
    gap = doc["teacher_gap"]
    result = {"provenance": prov, "args": {k: str(v) for k, v in vars(args).items()}, "data": data,
              "macs_removed_pct": pruned_doc["achieved"]["macs_reduction_pct"], "teacher_gap": gap,
              "gap_ratio": gap["before"] / gap["after"], "held_out_images": doc["distillation"]["held_out_images"],
              "images_per_second": doc["train"]["images_per_second"], "seconds": round(seconds, 1)}
    (args.out / "yolo_distill.json").write_text(json.dumps(result, indent=2))
    print(describe(prov))
    print(f"| YOLOv8n {args.size} px, {result['macs_removed_pct']:.1f} % MACs removed | teacher gap before "
          f"{gap['before']:.4f} | after {args.steps} steps {gap['after']:.4f} | {result['gap_ratio']:.1f}x smaller | "
          f"{result['images_per_second']:.1f} images/s |")


if __name__ == "__main__":
    main()

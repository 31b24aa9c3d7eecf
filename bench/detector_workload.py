"""Detectors measured on one workload: every torchvision detection and segmentation model and the
YOLO heads, at each input size and goal, through `chanprune prune --dry-run --json` (random weights,
as a user's untrained state dict or ultralytics' pickled checkpoint), one subprocess per case.

For each case the table has the MACs before and after on the original's workload (the headline),
`achieved`, the target's shortfall where one was said, the workload stated (proposals and
detections of a two-stage detector, a nominal head), the pruned model's MACs on its own workload
beside it, and whether verification compared empty outputs.

    python bench/detector_workload.py --markdown bench/out/detector_workload.md --json bench/out/detector_workload.json
    python bench/detector_workload.py --models fasterrcnn_mobilenet_v3_large_320_fpn --sizes 320 --goals flops
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import describe, provenance

REPO = Path(__file__).resolve().parent.parent
DETECTION = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
             "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
             "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"]
SEGMENTATION = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
YOLO = ["yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml", "yolov8n-cls.yaml"]
GOALS = {"ratio": ["--ratio", "0.3"], "flops": ["--target-flops", "0.5"]}

SAVE = """
import json, sys, torch
name, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if name.endswith(".yaml"):
    from ultralytics.nn.tasks import (ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel,
                                      guess_model_task, yaml_model_load)
    cls = {"detect": DetectionModel, "segment": SegmentationModel, "pose": PoseModel, "obb": OBBModel,
           "classify": ClassificationModel}[guess_model_task(yaml_model_load(name))]
    torch.save({"model": cls(name, verbose=False), "train_args": {"model": name}}, path)
else:
    from chanprune_cli.models import build_model, parse_arch
    kwargs = json.dumps({"num_classes": 2}) if name.startswith("keypointrcnn") else None
    torch.save(build_model(parse_arch("torchvision:" + name, kwargs)).state_dict(), path)
"""


def model_flags(name: str) -> list[str]:
    if name.endswith(".yaml"):
        return ["--trust-pickle"]
    kwargs = ["--arch-kwargs", json.dumps({"num_classes": 2})] if name.startswith("keypointrcnn") else []
    return ["--arch", f"torchvision:{name}", *kwargs]


def run_case(name: str, size: int, goal: str, folder: Path, timeout: float) -> dict[str, Any]:
    ckpt = folder / (name.replace(".yaml", "") + ".pt")
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    if not ckpt.exists():
        subprocess.run([sys.executable, "-c", SAVE, name, str(ckpt)], check=True, env=env, cwd=folder, timeout=timeout)
    report = folder / f"{ckpt.stem}-{size}-{goal}.json"
    command = [sys.executable, "-m", "chanprune_cli", "prune", str(ckpt), *model_flags(name), "--input-shape",
               f"3,{size},{size}", *GOALS[goal], "--dry-run", "--json", str(report)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "goal": goal, "error": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["?"]
        return {"model": name, "size": size, "goal": goal, "error": last[0][:300], "seconds": round(seconds, 1)}
    doc = json.loads(report.read_text())
    workload = doc["macs_workload"] or {}
    before, after = doc["before"]["macs"], doc["after"]["macs"]
    return {"model": name, "size": size, "goal": goal, "requested": doc["requested"],
            "macs_before": before, "macs_after": after, "achieved_pct": doc["achieved"]["macs_reduction_pct"],
            "after_below_before": after < before, "target_missed": doc.get("target_missed"),
            "statement": workload.get("statement"), "own_macs_after": workload.get("own_macs_after"),
            "own_pct": workload.get("own_macs_reduction_pct"), "verify_outputs": (doc["verify"] or {}).get("outputs"),
            "layers_compared": (doc["verify"] or {}).get("layers_compared"), "seconds": round(seconds, 1)}


def markdown(rows: list[dict[str, Any]], prov: dict[str, Any]) -> str:
    lines = [f"Random weights; `chanprune prune --dry-run` per case. {describe(prov)}", "",
             "| model | px | goal | MACs before → after (original's workload) | removed | target | own workload "
             "| workload | verify outputs | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = " ".join(GOALS[r["goal"]])
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {goal} | error: {r['error']} | | | | | | {r.get('seconds', '')} |")
            continue
        target = "—"
        if r["goal"] == "flops":
            target = "met" if r["target_missed"] is None else "said: " + r["target_missed"].split(";")[0]
        own = "—" if r["own_macs_after"] is None else f"{r['own_macs_after'] / 1e9:.2f} G ({-r['own_pct']:+.1f} %)"
        statement = (r["statement"] or "as counted (no dependence)").replace("on the original's workload", "").strip(": ") or "—"
        lines.append(f"| {r['model']} | {r['size']} | {goal} | {r['macs_before'] / 1e9:.2f} G → {r['macs_after'] / 1e9:.2f} G "
                     f"| {r['achieved_pct']:.1f} % | {target} | {own} | {statement} | {r['verify_outputs'] or 'values'} "
                     f"({r['layers_compared']} layers) | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help="comma-separated names, or all | detection | segmentation | yolo")
    parser.add_argument("--sizes", default="256,320")
    parser.add_argument("--goals", default="ratio,flops")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    groups = {"detection": DETECTION, "segmentation": SEGMENTATION, "yolo": YOLO,
              "all": DETECTION + SEGMENTATION + YOLO}
    models = [m for part in args.models.split(",") for m in groups.get(part, [part])]
    prov = provenance()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for size in (int(s) for s in args.sizes.split(",")):
                for goal in args.goals.split(","):
                    row = run_case(name, size, goal, Path(tmp), args.timeout)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    text = markdown(rows, prov)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"provenance": prov, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

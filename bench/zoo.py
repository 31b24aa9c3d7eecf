"""Zoo sweep: torchvision detection and segmentation models and YOLO checkpoints, chanprune vs
Torch-Pruning on the same model, input and ratio.

For each model (random init; norms randomised so a wrong slice shows in verify):

* chanprune, through the command line: the model is saved as users have it (a state dict for
  torchvision's models, a pickled `{'model': DetectionModel, ...}` checkpoint as ultralytics
  writes it for YOLO), then `chanprune prune --criterion l1 --ratio R --json` (verified against
  the masked original), then the output file is loaded again (`chanprune analyze`, and plain
  `torch.load` for pickles) and its outputs compared with the pruned model's. Outcome:
  pruned+verified+reloaded with the MACs removed, or the one-line error.
* Torch-Pruning (the installed version, recorded with the results): `MagnitudePruner(MagnitudeImportance(p=1), pruning_ratio=R)` with the
  prediction heads ignored (as its detection/YOLO examples do), then one forward. Outcome: ok with
  MACs removed / error.

Each (model, tool) runs in its own subprocess with a timeout. The YOLO rows are every ultralytics
task head and generation its bundled yamls build (`--models yolo` for those alone); chanprune's are
also loaded back by `ultralytics.YOLO(path)`, which must report the checkpoint's task.

    python bench/zoo.py --json bench/out/zoo.json --markdown bench/out/zoo.md
    python bench/zoo.py --models fasterrcnn_mobilenet_v3_large_fpn,yolov8n --size 160
    python bench/zoo.py --models yolo --size 320 --markdown bench/out/yolo.md

Against another ultralytics release (breakage shows before users see it): a venv with that release
and this checkout, its interpreter given as `--python` (needs the package index):

    python -m venv /tmp/u83 && /tmp/u83/bin/pip install "ultralytics==8.3.*" torch-pruning==1.6.1 fvcore -e .
    python bench/zoo.py --models yolo --size 320 --python /tmp/u83/bin/python --markdown bench/out/yolo-8.3.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import describe, provenance

REPO = Path(__file__).resolve().parents[1]
# name: (bundled yaml, task); the smallest scale of each generation and head
YOLO = {
    "yolov3-tiny": ("yolov3-tiny.yaml", "detect"), "yolov5nu": ("yolov5nu.yaml", "detect"),
    "yolov6n": ("yolov6n.yaml", "detect"), "yolov8n": ("yolov8n.yaml", "detect"),
    "yolov8n-seg": ("yolov8n-seg.yaml", "segment"), "yolov8n-pose": ("yolov8n-pose.yaml", "pose"),
    "yolov8n-obb": ("yolov8n-obb.yaml", "obb"), "yolov8n-cls": ("yolov8n-cls.yaml", "classify"),
    "yolov9t": ("yolov9t.yaml", "detect"), "yolov10n": ("yolov10n.yaml", "detect"), "yolo11n": ("yolo11n.yaml", "detect"),
    "yolo11n-seg": ("yolo11n-seg.yaml", "segment"), "yolo11n-pose": ("yolo11n-pose.yaml", "pose"),
    "yolo11n-obb": ("yolo11n-obb.yaml", "obb"), "yolo11n-cls": ("yolo11n-cls.yaml", "classify"),
    "yolo12n": ("yolo12n.yaml", "detect"), "yolo26n": ("yolo26n.yaml", "detect"),
    "yolo26n-seg": ("yolo26n-seg.yaml", "segment"), "yolo26n-pose": ("yolo26n-pose.yaml", "pose"),
    "yolo26n-obb": ("yolo26n-obb.yaml", "obb"), "yolo26n-cls": ("yolo26n-cls.yaml", "classify"),
    "rtdetr-l": ("rtdetr-l.yaml", "detect"),
}


def all_models() -> list[str]:
    import torchvision

    det = torchvision.models.list_models(module=torchvision.models.detection)
    seg = torchvision.models.list_models(module=torchvision.models.segmentation)
    return sorted(det) + sorted(seg) + list(YOLO)


def build(name: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name in YOLO:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn import tasks

        yaml, task = YOLO[name]
        cls = {"detect": tasks.RTDETRDetectionModel if yaml.startswith("rtdetr") else tasks.DetectionModel,
               "segment": tasks.SegmentationModel, "pose": tasks.PoseModel, "obb": tasks.OBBModel,
               "classify": tasks.ClassificationModel}[task]
        model = cls(yaml, verbose=False)
    else:
        from chanprune_cli.models import build_model, parse_arch

        model = build_model(parse_arch(f"torchvision:{name}"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                for attr, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.2, 0.2), ("running_mean", -0.2, 0.2), ("running_var", 0.5, 1.5)):
                    t = getattr(m, attr, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model.eval()


def ours(name: str, size: int, ratio: float, work: Path) -> dict[str, Any]:
    import torch

    from chanprune_cli.checkpoint import load_checkpoint
    from chanprune_cli.cli import main as chanprune
    from chanprune_cli.engine.surgery import flatten_outputs
    from chanprune_cli.measure import count_params

    model = build(name)
    if name in YOLO:
        ckpt = work / f"{name}.pt"
        torch.save({"epoch": -1, "model": model.half(), "ema": None, "optimizer": None,
                    "train_args": {"model": YOLO[name][0], "task": YOLO[name][1], "imgsz": size}}, ckpt)
        args = [str(ckpt), "--trust-pickle"]
        out = work / f"{name}.pruned.pt"
    else:
        ckpt = work / f"{name}.pth"
        torch.save(model.state_dict(), ckpt)
        args = [str(ckpt), "--arch", f"torchvision:{name}"]
        out = work / f"{name}.pruned.safetensors"
    report = work / "prune.json"
    started = time.perf_counter()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = chanprune(["prune", *args, "--input-shape", f"3,{size},{size}", "--criterion", "l1", "--ratio", str(ratio),
                          "--out", str(out), "--json", str(report), "--force"])
    seconds = time.perf_counter() - started
    if code != 0:
        said = [ln for ln in errors.getvalue().splitlines() if ln.startswith("error:")]
        return {"outcome": "failed", "exit": code, "seconds": round(seconds, 1), "error": (said or ["?"])[-1][:300]}
    doc = json.loads(report.read_text())
    before, after = doc["before"]["macs"], doc["after"]["macs"]
    # Reload the output as a user would: it must run and have the parameters prune reported (not
    # the MACs: a detector's depend on how many boxes its input leaves after NMS).
    reloaded = load_checkpoint(str(out), trust_pickle=name in YOLO).model
    with torch.no_grad():
        ran = bool(flatten_outputs(reloaded(torch.randn(1, 3, size, size))))
    same = ran and count_params(reloaded) == doc["after"]["params"]
    plain = None
    if name in YOLO:
        from ultralytics import YOLO as Ultralytics

        plain = type(torch.load(out, weights_only=False)["model"]).__name__
        same = same and Ultralytics(str(out)).task == YOLO[name][1]
        import ultralytics

        plain = f"{plain} (ultralytics {ultralytics.__version__})"
    # A detector's later stages run on as many proposals as its weights let through: where prune says
    # the workloads differ, compare on the original's (its macs_workload figure).
    workload = doc.get("macs_workload")
    removed = workload["macs_reduction_pct"] if workload else 100 * (1 - after / before)
    return {"outcome": "pruned+verified+reloaded" if doc["verify"]["passed"] and same else "not verified",
            "macs_removed": round(removed, 1), "macs_removed_as_counted": round(100 * (1 - after / before), 1),
            "workload_changed": sorted(workload["changed_layers"]) if workload else [], "seconds": round(seconds, 1),
            "verify": doc["verify"], "plain_torch_load": plain}


def heads(model: Any, name: str) -> list[Any]:
    if name in YOLO:
        return [model.model[-1]]
    ignored = []
    for attr in ("roi_heads", "rpn", "head"):
        part = getattr(model, attr, None)
        if part is not None:
            ignored.append(part.box_predictor if attr == "roi_heads" else part.head if attr == "rpn" else part)
    if getattr(model, "roi_heads", None) is not None:
        for extra in ("mask_predictor", "keypoint_predictor"):
            if getattr(model.roi_heads, extra, None) is not None:
                ignored.append(getattr(model.roi_heads, extra))
    for attr in ("classifier", "aux_classifier"):
        part = getattr(model, attr, None)
        if part is not None:
            ignored.append(list(part.modules())[-1])
    return ignored


def torch_pruning(name: str, size: int, ratio: float) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    from chanprune_cli.measure import count_macs

    model = build(name)
    example = torch.randn(1, 3, size, size)
    before = count_macs(model, (3, size, size))
    started = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=heads(model, name))
    pruner.step()
    with torch.no_grad():
        model(example)
    after = count_macs(model, (3, size, size))
    return {"outcome": "ok", "macs_removed": round(100 * (1 - after / before), 1),
            "seconds": round(time.perf_counter() - started, 1)}


def run_one(tool: str, name: str, size: int, ratio: float, timeout: float, mem_limit_gb: float,
            python: str = sys.executable) -> dict[str, Any]:
    cmd = [python, __file__, "--one", tool, name, "--size", str(size), "--ratio", str(ratio)]
    limit = int(mem_limit_gb * 2**30)

    def cap_memory() -> None:  # a runaway (Torch-Pruning passed 15 GB on yolo11n) fails alone
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), "CHANPRUNE_NO_PROJECT_CONFIG": "1"},
                              preexec_fn=cap_memory if mem_limit_gb > 0 else None)  # safe: no threads here
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    err = [ln for ln in done.stderr.splitlines() if ln.strip()]
    return {"outcome": "error", "error": (err[-1] if err else f"exit {done.returncode}")[:300]}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, prov: dict[str, Any]) -> str:
    """chanprune's MACs on the original's workload and as counted (a detector's box head runs on as
    many proposals as its weights let through); Torch-Pruning's as counted."""
    lines = [describe(prov), "",
             "| model | chanprune | MACs removed (same workload) | as counted | s | Torch-Pruning | MACs removed (as counted) | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["chanprune"], r["torch_pruning"]
        why_a = a.get("error") or (f"exit {a['exit']}" if "exit" in a else "")
        why_b = b.get("error", "")
        lines.append(f"| {r['model']} | {a['outcome']}{' (' + why_a[:80] + ')' if why_a else ''} | {a.get('macs_removed', '–')} | "
                     f"{a.get('macs_removed_as_counted', a.get('macs_removed', '–'))} | {a.get('seconds', '–')} | "
                     f"{b['outcome']}{' (' + why_b[:80] + ')' if why_b else ''} | {b.get('macs_removed', '–')} | {b.get('seconds', '–')} |")
    ok = sum(r["chanprune"]["outcome"] == "pruned+verified+reloaded" for r in rows)
    tp_ok = sum(r["torch_pruning"]["outcome"] == "ok" for r in rows)
    source = f" (Torch-Pruning's rows from {args.tp_from})" if args.tp_from else ""
    lines.append(f"\nchanprune: {ok} of {len(rows)} pruned+verified+reloaded; Torch-Pruning ok: {tp_ok}{source}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="all, yolo (the ultralytics family), or names separated by commas")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter each model runs under (a venv with another ultralytics release)")
    parser.add_argument("--size", type=int, default=224, help="input side (square)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space cap per model and tool (0: none)")
    parser.add_argument("--no-tp", action="store_true")
    parser.add_argument("--tp-from", help="take Torch-Pruning's rows from an earlier run's JSON (same size and ratio) "
                                          "instead of running it again: its results do not depend on chanprune's code")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        tool, name = args.one
        with tempfile.TemporaryDirectory() as tmp:
            result = ours(name, args.size, args.ratio, Path(tmp)) if tool == "chanprune" else torch_pruning(name, args.size, args.ratio)
        print("RESULT " + json.dumps(result))
        return 0
    prov = provenance()
    print(describe(prov), flush=True)
    names = all_models() if args.models == "all" else list(YOLO) if args.models == "yolo" else args.models.split(",")
    earlier: dict[str, dict[str, Any]] = {}
    if args.tp_from:
        doc = json.loads(Path(args.tp_from).read_text())
        if (doc["settings"]["size"], doc["settings"]["ratio"]) != (args.size, args.ratio):
            parser.error(f"--tp-from {args.tp_from} ran at another size or ratio")
        earlier = {r["model"]: r["torch_pruning"] for r in doc["rows"] if r["torch_pruning"]["outcome"] != "skipped"}
    rows = []
    for name in names:
        row = {"model": name,
               "chanprune": run_one("chanprune", name, args.size, args.ratio, args.timeout, args.mem_limit_gb, args.python),
               "torch_pruning": {"outcome": "skipped"} if args.no_tp else earlier.get(name) or
               run_one("tp", name, args.size, args.ratio, args.timeout, args.mem_limit_gb, args.python)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    settings = {"size": args.size, "ratio": args.ratio, "timeout": args.timeout, "mem_limit_gb": args.mem_limit_gb,
                "python": args.python,
                "tp_rows_from": args.tp_from}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "provenance": prov, "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(rows, args, prov))
    return 0


if __name__ == "__main__":
    sys.exit(main())

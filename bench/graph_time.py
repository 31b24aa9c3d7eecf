"""Graph-building time on torchvision models: `build_graph(model, (3, 224, 224))`, 1 thread, best of N.

Times the chanprune tree this script lives in (or --repo). With `--against OTHER` (another tree,
e.g. `git worktree add /tmp/base REV`) both trees run in two persistent worker processes and are
timed in turn, model by model and round by round (the order alternating), so a busy machine slows
both alike; wall and CPU (process) time are recorded, and the ratios this/other are printed.

    python bench/graph_time.py --repeats 5 --json after.json
    python bench/graph_time.py --against /tmp/base --repeats 10 --json pair.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = "resnet50,densenet121,mobilenet_v3_large,efficientnet_b0,regnet_y_400mf,convnext_tiny,vgg16_bn,shufflenet_v2_x1_0,swin_t,vit_b_16"


def worker(repo: Path) -> None:
    """Read model names from stdin, build each graph once, answer one JSON line per model."""
    sys.path.insert(0, str(repo))
    import torch
    import torchvision

    from chanprune_cli.engine.graph import build_graph

    torch.set_num_threads(1)
    models: dict[str, Any] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name not in models:
            torch.manual_seed(0)
            models[name] = getattr(torchvision.models, name)(weights=None).eval()
        wall, cpu = time.perf_counter(), time.process_time()
        graph = build_graph(models[name], (3, 224, 224))
        print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                          "groups": len(graph.groups), "prunable": len(graph.prunable_groups())}), flush=True)


def timed(trees: dict[str, Path], models: list[str], rounds: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    procs = {k: subprocess.Popen([sys.executable, __file__, "--worker", str(v)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for k, v in trees.items()}
    for p in procs.values():
        p.stdout.readline()  # type: ignore[union-attr]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {m: [] for m in models} for k in trees}
    for r in range(rounds):
        for m in models:
            for k in (list(trees) if r % 2 == 0 else list(reversed(trees))):
                procs[k].stdin.write(m + "\n")  # type: ignore[union-attr]
                procs[k].stdin.flush()  # type: ignore[union-attr]
                runs[k][m].append(json.loads(procs[k].stdout.readline()))  # type: ignore[union-attr]
    for p in procs.values():
        p.stdin.close()  # type: ignore[union-attr]
        p.wait()
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help="comma-separated torchvision model names")
    ap.add_argument("--repeats", type=int, default=3, help="rounds: each model is built this many times per tree")
    ap.add_argument("--repo", type=Path, default=REPO, help="the chanprune tree to time (default: this one)")
    ap.add_argument("--against", type=Path, default=None, help="another chanprune tree, timed in turn with --repo")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return 0
    from provenance import describe, provenance

    trees = {"this": args.repo.resolve()}
    if args.against is not None:
        trees["other"] = args.against.resolve()
    prov = {k: provenance(v) for k, v in trees.items()}  # the commit of each tree timed
    for k in trees:
        print(f"{k}: {describe(prov[k])}", flush=True)
    models = args.models.split(",")
    runs = timed(trees, models, args.repeats)
    summary = {}
    for m in models:
        best = {k: {c: min(x[c] for x in runs[k][m]) for c in ("wall", "cpu")} for k in trees}
        first = runs["this"][m][0]
        row = {"groups": first["groups"], "prunable": first["prunable"],
               **{f"{k}_{c}_s": round(v, 3) for k, b in best.items() for c, v in b.items()}}
        text = f"{m:22s} wall {best['this']['wall']:7.3f} s  cpu {best['this']['cpu']:7.3f} s"
        if "other" in trees:
            ratios = [a["cpu"] / b["cpu"] for a, b in zip(runs["this"][m], runs["other"][m])]
            row["cpu_ratio_best"] = round(best["this"]["cpu"] / best["other"]["cpu"], 3)
            row["cpu_ratio_median_paired"] = round(sorted(ratios)[len(ratios) // 2], 3)
            row["same_groups"] = (first["groups"], first["prunable"]) == (runs["other"][m][0]["groups"],
                                                                         runs["other"][m][0]["prunable"])
            text += (f"  other cpu {best['other']['cpu']:7.3f} s  ratio {row['cpu_ratio_best']:.3f} "
                     f"(paired median {row['cpu_ratio_median_paired']:.3f})")
        summary[m] = row
        print(f"{text}  {first['groups']} groups ({first['prunable']} prunable)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"provenance": prov, "models": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

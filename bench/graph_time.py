"""Graph-building time on torchvision models: `build_graph(model, (3, 224, 224))`, best of N, 1 thread.

Times the chanprune tree this script lives in (or --repo), so two checkouts (e.g. `git worktree
add /tmp/base REV`) are compared by running each one's copy, alternating, in fresh processes:

    python bench/graph_time.py --json after.json
    python /tmp/base/bench/graph_time.py --json before.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = "resnet50,densenet121,mobilenet_v3_large,efficientnet_b0,regnet_y_400mf,convnext_tiny,vgg16_bn,shufflenet_v2_x1_0,swin_t,vit_b_16"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help="comma-separated torchvision model names")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repo", type=Path, default=REPO, help="the chanprune tree to time (default: this one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo))
    import torch
    import torchvision

    from chanprune_cli.engine.graph import build_graph
    from provenance import describe, provenance

    torch.set_num_threads(1)
    prov = provenance(args.repo)  # the commit of the tree timed
    print(describe(prov), flush=True)
    out = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            graph = build_graph(model, (3, 224, 224))
            best = min(best, time.perf_counter() - start)
        out[name] = {"s": round(best, 3), "groups": len(graph.groups), "prunable": len(graph.prunable_groups())}
        print(f"{name:22s} {best:7.3f} s  {out[name]['groups']} groups ({out[name]['prunable']} prunable)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"provenance": prov, "models": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Coverage sweep: chanprune's channel engine vs Torch-Pruning over torchvision's or timm's classifiers.

For each model (`--zoo torchvision`: every `torchvision.models.list_models(module=torchvision.models)`
entry plus the built-in CIFAR ResNets loaded from ../shared/checkpoints when present; `--zoo timm`:
the convolutional families of `timm.list_models()`, see `timm_models`, random init):

* chanprune: `build_graph`, remove 30 % (``--ratio``) of the channels of every prunable group
  (lowest L1 norm of the producers' filters), `prune_model` on a copy, `verify` against the
  masked original (float64), one eval forward, a rebuild as a checkpoint is loaded (a fresh model,
  the recorded shape attributes, the tensors: outputs within 1e-5) and one training step (train
  mode, SGD, batch 2).
  Outcome: ``pruned+verified`` / ``blocked`` (no prunable group; reason) / ``failed`` (error).
  MACs (fvcore, one input of the sweep's size) are counted before and after, for both tools.
* Torch-Pruning (the installed version, recorded with the results): ``tp.pruner.MagnitudePruner`` with ``MagnitudeImportance(p=1)``,
  ``pruning_ratio=ratio``, the final classifier(s) ignored, ``global_pruning=False``, the same
  example input. Outcome: ``ok`` / ``failed to prune`` / ``forward fails`` / ``wrong output shape``
  / ``runs but fails to train`` / ``error`` / ``timeout``.

Each (model, tool) pair runs in its own subprocess with a timeout and an address-space cap, so a
hang (Torch-Pruning runs > 15 min on maxvit_t), a runaway (it takes > 20 GB on swin_t) or a crash
does not stop the sweep. Afterwards `--timing-models` (resnet50, densenet121) are timed side by
side: our build_graph + prune_model + verify vs Torch-Pruning's pruner construction (its
DependencyGraph build) + step, best of `--timing-repeats`.

Untrained torchvision models have BatchNorm at weight 1, bias 0, running stats 0/1, which would
hide slicing mistakes in norms; the worker randomises every norm's affine parameters and running
statistics first (same seed for both tools).

Untrained timm models get the same treatment (every norm's per-channel parameters and
statistics, timm's EvoNorms and FilterResponseNorms included).

Usage:
    python bench/coverage.py --models all --json /tmp/cov.json --markdown /tmp/cov.md
    python bench/coverage.py --models resnet18,cifar_resnet20 --no-tp
    python bench/coverage.py --zoo timm --size 128 --json /tmp/timm.json --markdown /tmp/timm.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from provenance import describe, provenance

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = Path(os.environ.get("CHANPRUNE_CHECKPOINTS", REPO.parent / "shared" / "checkpoints"))
CIFAR = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet56": "resnet56-4bfd9763.th",
}
DEFAULT_TIMING_MODELS = ("resnet50", "densenet121")
ZOO = "torchvision"  # --zoo; the workers get it on their command line

# timm's model modules whose networks are convolutional. Transformer and conv/attention hybrid
# families (vision_transformer, swin, maxxvit, mobilevit, efficientformer, levit, ...) are left
# out: their attention and LayerNorm-normalised token streams are pinned by design.
TIMM_CNN_FAMILIES = (
    "byobnet", "convmixer", "convnext", "cpubone", "cspnet", "cspnext", "densenet", "dla", "dpn", "efficientnet",
    "fasternet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next", "inception_resnet_v2",
    "inception_v3", "inception_v4", "lcnetv2", "mambaout", "mobilenetv3", "mobilenetv5", "nasnet", "nfnet",
    "pnasnet", "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest", "resnet", "resnetv2", "rexnet",
    "selecsls", "senet", "sknet", "starnet", "tresnet", "vgg", "vovnet", "xception", "xception_aligned",
)
TIMM_SMALL = 30e6  # parameters of a "small" member
TIMM_LARGEST = 100e6  # a family with no small member contributes its smallest up to this size


# ------------------------------------------------------------------------------------------------
# helpers shared by the workers (imported lazily: torch is slow to import)
# ------------------------------------------------------------------------------------------------


def default_size(name: str) -> int:
    if ZOO == "timm":
        import timm

        return int(timm.get_pretrained_cfg(name).input_size[-1])
    if name.startswith("cifar_"):
        return 32
    return 299 if name == "inception_v3" else 224


def randomize_norms(model: Any, seed: int = 1) -> None:
    """Random affine parameters and running statistics in every norm (an untrained BatchNorm is the
    identity, which would hide a wrong slice); timm's norms are matched by name (EvoNorm,
    FilterResponseNorm, BatchNormAct2d, ...), their per-channel `v`/`tau` included."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    ranges = {"weight": (0.5, 1.5), "bias": (-0.2, 0.2), "running_mean": (-0.2, 0.2), "running_var": (0.5, 1.5),
              "v": (0.5, 1.5), "tau": (-0.2, 0.2)}
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and "Norm" not in type(m).__name__:
                continue
            for attr, (lo, hi) in ranges.items():
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 1:
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


def load_model(name: str) -> tuple[Any, int, str]:
    """(eval-mode model, number of classes, where it came from)."""
    import torch

    if name in CIFAR:
        from chanprune_cli.checkpoint import load_checkpoint

        path = CHECKPOINTS / CIFAR[name]
        model = load_checkpoint(str(path), arch=name).model
        source = f"checkpoint {path.name}"
        classes = 10
    elif ZOO == "timm":
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        source = "timm (random init)"
        classes = model.num_classes
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        source = "torchvision (random init)"
        classes = 1000
    if name not in CIFAR:  # a wrong slice of a norm shows up in verify only if the norm is not the identity
        randomize_norms(model)
    return model.eval(), classes, source


def choose_size(model: Any, name: str, requested: int | None) -> tuple[int, str]:
    """The input side to use: the requested override when the model runs on it, else the default."""
    import torch

    default = default_size(name)
    if requested is None or requested == default:
        return default, ""
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, requested, requested))
        return requested, f"input {requested} (override)"
    except Exception as exc:  # noqa: BLE001  # e.g. ViT fixes its image size
        return default, f"input {default}: model does not run on {requested} ({type(exc).__name__})"


def classifier_modules(model: Any, num_classes: int) -> list[Any]:
    """Final classifier layers: every Linear/Conv producing `num_classes` outputs (aux heads too)."""
    from torch import nn

    out = []
    for m in model.modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
                isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes):
            out.append(m)
    return out


def flat_outputs(value: Any) -> list[Any]:
    from chanprune_cli.engine.surgery import flatten_outputs  # imported in the workers only

    return flatten_outputs(value)


def train_step(model: Any, size: int) -> float:
    """One SGD step in train mode on batch 2; returns the loss (raises on failure / non-finite)."""
    import torch

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    outs = flat_outputs(model(x))
    target = torch.tensor([1, 2])
    loss = sum(torch.nn.functional.cross_entropy(o.flatten(1), target) for o in outs if o.dim() >= 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    return float(loss)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: Any, size: int) -> int | None:
    """fvcore MACs of one 3×size×size input (the same count for both tools); None if fvcore fails."""
    from chanprune_cli.measure import count_macs as fvcore_macs

    try:
        return fvcore_macs(model, (3, size, size))
    except Exception:  # noqa: BLE001 (a model fvcore cannot trace still has its other results)
        return None


def macs_removed(res: dict[str, Any]) -> float | None:
    before, after = res.get("macs"), res.get("macs_after")
    return 1 - after / before if before and after is not None else None


def l1_plan(model: Any, graph: Any, ratio: float) -> tuple[dict[int, list[int]], str]:
    """Remove `ratio` of every prunable group's channels, lowest L1 norm of the producers' filters
    first. Uses the project's criterion and allocator (its per-layer floor keeps every layer at
    least one channel) when they exist, else an inline equivalent."""
    import torch

    try:  # the project's criterion / allocator, when the packages exist
        from chanprune_cli.criteria import get_criterion  # type: ignore[import-not-found]
    except ImportError:
        get_criterion = None
    try:
        from chanprune_cli.engine.allocate import AllocationOptions, allocate  # type: ignore[import-not-found]
    except ImportError:
        allocate = None
    if get_criterion is not None:
        scores = get_criterion("l1").score(model, graph, None, torch.device("cpu"))
        how = "chanprune_cli.criteria l1"
    else:
        scores = {k: torch.tensor(v) for k, v in _inline_l1(model, graph).items()}
        how = "inline L1 of producer filters"
    if allocate is not None:
        plan = allocate(graph, scores, AllocationOptions(ratio=ratio)).plan
        return {k: list(v) for k, v in plan.items() if v}, how + " + chanprune_cli.engine.allocate"
    return _plan_from_scores(graph, scores, ratio), how + " + inline allocation"


def _inline_l1(model: Any, graph: Any) -> dict[int, list[float]]:
    import torch
    from torch import nn

    modules = dict(model.named_modules())
    out: dict[int, list[float]] = {}
    for g in graph.groups:
        scores = []
        for slots in g.classes:
            s = 0.0
            for mod, kind, idx in slots:
                m = modules[mod]
                w = getattr(m, "weight", None)
                if not isinstance(w, torch.Tensor) or kind not in ("out", "dw"):
                    continue
                w = w.detach()
                if isinstance(m, nn.modules.conv._ConvTransposeNd):
                    s += float(w[:, idx].abs().sum())
                elif isinstance(m, nn.modules.conv._ConvNd) and kind == "dw":
                    mult = m.out_channels // m.in_channels
                    s += float(w[idx * mult:(idx + 1) * mult].abs().sum())
                elif isinstance(m, nn.modules.conv._ConvNd):
                    opg = m.out_channels // m.groups
                    s += float(w[idx::opg].abs().sum())
                else:  # Linear
                    s += float(w[idx].abs().sum())
            scores.append(s)
        out[g.id] = scores
    return out


def _plan_from_scores(graph: Any, scores: Any, ratio: float) -> dict[int, list[int]]:
    """floor(ratio × channels) lowest-scored prunable classes per group, skipping a class when it
    would leave one of its producer layers without channels."""
    plan: dict[int, list[int]] = {}
    for g in graph.prunable_groups():
        sc = [float(v) for v in scores[g.id]]
        n = min(int(ratio * g.channels), len(g.prunable_classes), g.channels - 1)
        width: dict[tuple[str, str], int] = {}
        for cls in g.classes:
            for m, k, _ in cls:
                if k in ("out", "dw"):
                    width[(m, k)] = width.get((m, k), 0) + 1
        chosen: list[int] = []
        for i in sorted(g.prunable_classes, key=lambda i: (sc[i], i)):
            if len(chosen) == n:
                break
            hits = [(m, k) for m, k, _ in g.classes[i] if k in ("out", "dw")]
            if all(width[h] - hits.count(h) >= 1 for h in set(hits)):
                for h in hits:
                    width[h] -= 1
                chosen.append(i)
        if chosen:
            plan[g.id] = sorted(chosen)
    return plan


# ------------------------------------------------------------------------------------------------
# workers (one model, one tool, in a subprocess)
# ------------------------------------------------------------------------------------------------


def reload_difference(name: str, pruned: Any, example: Any) -> float:
    """Rebuild `pruned` as a chanprune checkpoint is loaded (fresh model, recorded shape
    attributes, tensors) and return the largest output difference on `example`."""
    import torch

    from chanprune_cli.engine.shapes import apply_shape_attrs, shape_attrs

    fresh = load_model(name)[0]
    tensors = pruned.state_dict()
    apply_shape_attrs(fresh, shape_attrs(pruned), {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    with torch.no_grad():
        a, b = flat_outputs(pruned.eval()(example)), flat_outputs(fresh.eval()(example))
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def worker_ours(name: str, ratio: float, size_req: int | None, max_params: float = float("inf")) -> dict[str, Any]:
    import torch

    from chanprune_cli.engine.graph import build_graph
    from chanprune_cli.engine.surgery import prune_model, verify

    res: dict[str, Any] = {"tool": "chanprune", "model": name}
    model, _, source = load_model(name)
    if count_params(model) > max_params:
        return {**res, "status": "skipped", "params": count_params(model),
                "reason": f"{count_params(model) / 1e6:.0f}M params > --max-params {max_params / 1e6:.0f}M"}
    size, note = choose_size(model, name, size_req)
    res.update(source=source, size=size, size_note=note, params=count_params(model))
    shape = (3, size, size)
    stage = "build_graph"
    try:
        t = time.perf_counter()
        graph = build_graph(model, shape)
        res["build_s"] = time.perf_counter() - t
        prunable = graph.prunable_groups()
        res.update(groups=len(graph.groups), prunable_groups=len(prunable), tracing=getattr(graph, "tracing", "fx"),
                   channels=sum(g.channels for g in graph.groups),
                   prunable_channels=sum(len(g.prunable_classes) for g in prunable),
                   unfollowed=graph.unfollowed[:20])
        if not prunable:
            reasons: dict[str, int] = {}
            for g in graph.groups:
                reasons[g.reason or "?"] = reasons.get(g.reason or "?", 0) + 1
            top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
            res.update(status="blocked", reason="; ".join(f"{r} (x{n})" for r, n in top))
            return res
        stage = "plan"
        plan, how = l1_plan(model, graph, ratio)
        res["criterion"] = how
        res["removed_channels"] = sum(len(v) for v in plan.values())
        stage = "prune"
        t = time.perf_counter()
        pruned = copy.deepcopy(model)
        prune_model(pruned, graph, plan)
        res["prune_s"] = time.perf_counter() - t
        res["params_after"] = count_params(pruned)
        stage = "verify"
        t = time.perf_counter()
        v = verify(model, graph, plan, pruned, shape)
        res["verify_s"] = time.perf_counter() - t
        res.update(max_abs_diff=v.max_abs_diff, tolerance=v.tolerance)
        if not v.passed:
            res.update(status="failed", reason=f"verify: max |diff| {v.max_abs_diff:.3g} > {v.tolerance:.3g}")
            return res
        stage = "forward"
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            pruned.eval()(example)
        stage = "reload"  # what a checkpoint does: a fresh build + the recorded shapes + the tensors
        res["reload_max_abs_diff"] = reload_difference(name, pruned, example)
        if res["reload_max_abs_diff"] > 1e-5:
            res.update(status="failed", reason=f"reload: outputs differ by {res['reload_max_abs_diff']:.3g}")
            return res
        stage = "MACs"
        res["macs"], res["macs_after"] = count_macs(model, size), count_macs(pruned, size)
        stage = "train step"
        res["train_loss"] = train_step(pruned, size)
        res["status"] = "pruned+verified"
    except Exception as exc:  # noqa: BLE001 (any failure is a result here)
        res.update(status="failed", reason=f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                   traceback=traceback.format_exc()[-2000:])
    return res


def worker_tp(name: str, ratio: float, size_req: int | None) -> dict[str, Any]:
    import warnings

    import torch
    import torch_pruning as tp

    warnings.filterwarnings("ignore")
    res: dict[str, Any] = {"tool": "torch_pruning", "model": name}
    model, classes, source = load_model(name)
    size, note = choose_size(model, name, size_req)
    res.update(source=source, size=size, size_note=note, params=count_params(model))
    example = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref_shapes = [tuple(o.shape) for o in flat_outputs(model.eval()(example))]
    res["macs"] = count_macs(model, size)
    try:
        t = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=classifier_modules(model, classes), global_pruning=False)
        res["graph_s"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 (any failure is a result here)
        res.update(status="error", reason=f"graph build: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return res
    try:
        t = time.perf_counter()
        pruner.step()
        res["prune_s"] = time.perf_counter() - t
        res["params_after"] = count_params(model)
    except Exception as exc:  # noqa: BLE001 (any failure is a result here)
        res.update(status="failed to prune", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return res
    try:
        with torch.no_grad():
            shapes = [tuple(o.shape) for o in flat_outputs(model.eval()(example))]
    except Exception as exc:  # noqa: BLE001 (any failure is a result here)
        res.update(status="forward fails", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return res
    if shapes != ref_shapes:
        res.update(status="wrong output shape", reason=f"{shapes} != {ref_shapes}")
        return res
    res["macs_after"] = count_macs(model, size)
    try:
        res["train_loss"] = train_step(model, size)
    except Exception as exc:  # noqa: BLE001 (any failure is a result here)
        res.update(status="runs but fails to train", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return res
    res["status"] = "ok" if res["params_after"] < res["params"] else "ok (nothing pruned)"
    return res


def worker_timing(name: str, ratio: float, size_req: int | None, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` times: our build_graph / prune_model / verify vs Torch-Pruning's
    DependencyGraph build, MagnitudePruner construction (builds its own graph) and step.
    Model copies and scoring are outside the timed regions."""
    import warnings

    import torch
    import torch_pruning as tp

    from chanprune_cli.engine.graph import build_graph
    from chanprune_cli.engine.surgery import prune_model, verify

    warnings.filterwarnings("ignore")
    model, classes, _ = load_model(name)
    size, note = choose_size(model, name, size_req)
    shape = (3, size, size)
    ours: list[tuple[float, float, float]] = []
    theirs: list[tuple[float, float, float]] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph = build_graph(model, shape)
        t1 = time.perf_counter()
        plan, _how = l1_plan(model, graph, ratio)
        pruned = copy.deepcopy(model)
        t2 = time.perf_counter()
        prune_model(pruned, graph, plan)
        t3 = time.perf_counter()
        ok = verify(model, graph, plan, pruned, shape).passed
        t4 = time.perf_counter()
        ours.append((t1 - t0, t3 - t2, t4 - t3))
        example = torch.randn(1, *shape)
        m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
        t0 = time.perf_counter()
        tp.DependencyGraph().build_dependency(m1, example_inputs=example)
        t1 = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            m2, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=classifier_modules(m2, classes), global_pruning=False)
        t2 = time.perf_counter()
        pruner.step()
        t3 = time.perf_counter()
        theirs.append((t1 - t0, t2 - t1, t3 - t2))
    b = [min(r[i] for r in ours) for i in range(3)]
    c = [min(r[i] for r in theirs) for i in range(3)]
    return {"model": name, "size": size, "size_note": note, "repeats": repeats, "verified": ok,
            "ours_build_s": b[0], "ours_prune_s": b[1], "ours_verify_s": b[2], "ours_total_s": sum(b),
            "ours_build_prune_s": b[0] + b[1],
            "tp_depgraph_s": c[0], "tp_graph_s": c[1], "tp_prune_s": c[2], "tp_total_s": c[1] + c[2],
            "ratio_ours_over_tp": sum(b) / (c[1] + c[2]),
            "ratio_ours_no_verify_over_tp": (b[0] + b[1]) / (c[1] + c[2])}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def timm_models() -> list[str]:
    """The timm sweep: members of TIMM_CNN_FAMILIES with at most TIMM_SMALL parameters (timm's own
    `test_*` models aside), sorted by size; a family with more than three keeps a third of them,
    evenly spaced (its smallest and largest included). A family with no small member contributes
    its smallest when that has at most TIMM_LARGEST parameters. Parameters are counted on the meta
    device (nothing is allocated or downloaded)."""
    import math
    import warnings

    import timm
    import torch

    warnings.filterwarnings("ignore")
    chosen: list[str] = []
    for family in TIMM_CNN_FAMILIES:
        sized = []
        for name in timm.list_models(module=family):
            if name.startswith("test_"):
                continue
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            sized.append((sum(p.numel() for p in model.parameters()), name))
        sized.sort()
        small = [n for p, n in sized if p <= TIMM_SMALL] or [n for p, n in sized[:1] if p <= TIMM_LARGEST]
        k = len(small) if len(small) <= 3 else max(3, math.ceil(len(small) / 3))
        chosen += [small[round(i * (len(small) - 1) / (k - 1))] for i in range(k)] if k > 1 else small
    return list(dict.fromkeys(chosen))


def model_list(spec: str) -> list[str]:
    if ZOO == "timm":
        import timm

        if spec == "all":
            return timm_models()
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if not timm.is_model(n)]
        if unknown:
            sys.exit(f"unknown timm model(s): {', '.join(unknown)}")
        return names
    import torchvision

    tv = list(torchvision.models.list_models(module=torchvision.models))
    everything = tv + [n for n, f in CIFAR.items() if (CHECKPOINTS / f).exists()]
    if spec == "all":
        return everything
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in everything and n not in CIFAR]
    if unknown:
        sys.exit(f"unknown model(s): {', '.join(unknown)}")
    return names


def param_count_meta(name: str) -> int | None:
    """Parameter count without materialising the model (for --max-params); None if unknown."""
    import torch
    import torchvision

    if name in CIFAR or ZOO == "timm":  # the timm list is chosen by size already
        return 0
    import warnings

    warnings.filterwarnings("ignore")  # torchvision's init-weights FutureWarnings
    try:
        with torch.device("meta"):
            m = torchvision.models.get_model(name, weights=None)
    except Exception:  # noqa: BLE001  # e.g. regnet computes its widths with .tolist(): the worker checks instead
        return None
    return sum(p.numel() for p in m.parameters())


def run_worker(tool: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out_path = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--model", name, "--zoo", args.zoo,
           "--ratio", str(args.ratio), "--worker-out", out_path, "--threads", str(args.threads),
           "--max-params", str(args.max_params), "--timing-repeats", str(args.timing_repeats)]
    if args.size:
        cmd += ["--size", str(args.size)]
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    limit = int(args.mem_limit_gb * 2**30) if args.mem_limit_gb > 0 else None

    def cap_memory() -> None:  # in the worker: a runaway (TP took 22 GB on swin_t) fails alone
        if limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env,
                            preexec_fn=cap_memory)  # safe: the driver runs no threads
    try:
        _, err = proc.communicate(timeout=args.timeout_per_model)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group only
        proc.communicate()
        res = {"tool": tool, "model": name, "status": "timeout", "reason": f"> {args.timeout_per_model} s"}
    else:
        try:
            res = json.loads(Path(out_path).read_text())
        except Exception:  # noqa: BLE001 (any failure is a result here)
            tail = (err or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            why = "killed by SIGKILL (out of memory?)" if proc.returncode == -signal.SIGKILL else tail[0][:200]
            res = {"tool": tool, "model": name, "status": "failed" if tool == "ours" else "error",
                   "reason": f"worker died (rc {proc.returncode}): {why}"}
    finally:
        Path(out_path).unlink(missing_ok=True)
    res["wall_s"] = time.perf_counter() - t
    return res


def _fmt_s(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def _fmt_pct(v: Any) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "-"


def ours_time(r: dict[str, Any]) -> float | None:
    keys = ("build_s", "prune_s", "verify_s")
    return sum(r[k] for k in keys) if all(k in r for k in keys) else None


def tp_time(r: dict[str, Any]) -> float | None:
    return r["graph_s"] + r["prune_s"] if "graph_s" in r and "prune_s" in r else None


def summarize(results: dict[str, dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace,
              timing_runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ours_counts: dict[str, int] = {}
    tp_counts: dict[str, int] = {}
    for r in results.values():
        o = r.get("ours")
        if o:
            ours_counts[o["status"]] = ours_counts.get(o["status"], 0) + 1
        t = r.get("tp")
        if t:
            tp_counts[t["status"]] = tp_counts.get(t["status"], 0) + 1
    timing = []
    for name in ([] if timing_runs else args.timing_models.split(",")):
        r = results.get(name)
        if not r:
            continue
        a = ours_time(r.get("ours", {}))
        b = tp_time(r.get("tp", {})) if r.get("tp") else None
        timing.append({"model": name, "ours_build_s": r["ours"].get("build_s"), "ours_prune_s": r["ours"].get("prune_s"),
                       "ours_verify_s": r["ours"].get("verify_s"), "ours_total_s": a,
                       "tp_graph_s": (r.get("tp") or {}).get("graph_s"), "tp_prune_s": (r.get("tp") or {}).get("prune_s"),
                       "tp_total_s": b, "ratio_ours_over_tp": (a / b) if a and b else None})
    if timing_runs:
        timing = timing_runs

    def kept(tool: str, ok: str) -> float | None:
        fr = [r[tool]["params_after"] / r[tool]["params"] for r in results.values()
              if r.get(tool) and r[tool].get("status", "").startswith(ok) and r[tool].get("params")]
        return sum(fr) / len(fr) if fr else None

    def macs(tool: str, ok: str) -> dict[str, Any]:
        """MACs removed by the successful runs of `tool`: how many measured, how many >= 20 %, median."""
        fr = sorted(f for r in results.values() if r.get(tool) and r[tool].get("status", "").startswith(ok)
                    and (f := macs_removed(r[tool])) is not None)
        mid = len(fr) // 2
        median = (fr[mid] if len(fr) % 2 else (fr[mid - 1] + fr[mid]) / 2) if fr else None
        return {"measured": len(fr), "at_least_20pct": sum(f >= 0.2 for f in fr), "median": median}

    return {"ratio": args.ratio, "zoo": args.zoo, "models": len(results), "skipped": skipped,
            "tp_rows_from": str(args.tp_from) if args.tp_from else None, "chanprune": ours_counts,
            "torch_pruning": tp_counts, "timing": timing,
            "macs_removed": {"chanprune": macs("ours", "pruned+verified"), "torch_pruning": macs("tp", "ok")},
            "mean_param_fraction_kept": {"chanprune": kept("ours", "pruned+verified"), "torch_pruning": kept("tp", "ok")},
            "timing_method": (f"best of {args.timing_repeats} dedicated runs, {args.threads} thread(s)" if timing_runs
                              else f"single sweep run, {args.threads} thread(s)")}


def render(results: dict[str, dict[str, Any]], summary: dict[str, Any], prov: dict[str, Any]) -> str:
    lines = ["| model | params (M) | input | chanprune | groups (prunable) | params after (M) | MACs removed | ours s (build/prune/verify) "
             "| Torch-Pruning | TP params after (M) | TP MACs removed | TP s (graph/prune) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        o, t = r.get("ours", {}), r.get("tp")
        size = f"{o.get('size', '-')}" + (f" ({o['size_note']})" if o.get("size_note") else "")
        ostat = o.get("status", "-") + (f": {o['reason']}" if o.get("reason") and o.get("status") != "pruned+verified" else "")
        tstat = "skipped (--no-tp)" if t is None else t.get("status", "-") + (f": {t['reason']}" if t.get("reason") else "")
        lines.append("| " + " | ".join([
            name, f"{o.get('params', 0) / 1e6:.1f}", size, ostat.replace("|", "/"),
            f"{o.get('groups', '-')} ({o.get('prunable_groups', '-')})",
            f"{o['params_after'] / 1e6:.1f}" if "params_after" in o else "-",
            _fmt_pct(macs_removed(o)),
            f"{_fmt_s(o.get('build_s'))}/{_fmt_s(o.get('prune_s'))}/{_fmt_s(o.get('verify_s'))}",
            tstat.replace("|", "/"),
            f"{t['params_after'] / 1e6:.1f}" if t and "params_after" in t else "-",
            _fmt_pct(macs_removed(t)) if t else "-",
            f"{_fmt_s(t.get('graph_s'))}/{_fmt_s(t.get('prune_s'))}" if t else "-",
        ]) + " |")
    out = [f"# Coverage sweep: {summary.get('zoo', 'torchvision')} (ratio {summary['ratio']})", "", describe(prov), "",
           f"chanprune: {json.dumps(summary['chanprune'])}", "",
           f"Torch-Pruning: {json.dumps(summary['torch_pruning'])}", "",
           "MACs removed by the successful runs (fvcore): "
           + "; ".join(f"{k} {v['at_least_20pct']} of {v['measured']} at >= 20 %, median {_fmt_pct(v['median'])}"
                       for k, v in summary.get("macs_removed", {}).items()), "",
           "Mean fraction of parameters kept (successful models): "
           + ", ".join(f"{k} {v:.3f}" for k, v in summary.get("mean_param_fraction_kept", {}).items() if v is not None), ""]
    if summary["skipped"]:
        out += ["Skipped: " + ", ".join(f"{k} ({v})" for k, v in summary["skipped"].items()), ""]
    if summary["timing"]:
        out += [f"## Timing ({summary.get('timing_method', '')}; seconds)", "",
                ("ours = build_graph + prune_model + verify (float64 equivalence check); "
                 "TP = MagnitudePruner construction (builds its DependencyGraph) + step; "
                 "TP DG = a standalone DependencyGraph().build_dependency."), "",
                "| model | ours build | ours prune | ours verify | ours total | TP DG | TP pruner init | TP step | TP total | ours/TP "
                "| ours w/o verify / TP |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]

        def f2(v: Any) -> str:
            return f"{v:.2f}" if isinstance(v, (int, float)) else "-"

        for t in summary["timing"]:
            no_verify = t.get("ratio_ours_no_verify_over_tp")
            if no_verify is None and t.get("tp_total_s") and t.get("ours_build_s") is not None and t.get("ours_prune_s") is not None:
                no_verify = (t["ours_build_s"] + t["ours_prune_s"]) / t["tp_total_s"]
            out.append("| " + " | ".join([t["model"]] + [f2(t.get(k)) for k in (
                "ours_build_s", "ours_prune_s", "ours_verify_s", "ours_total_s", "tp_depgraph_s", "tp_graph_s",
                "tp_prune_s", "tp_total_s", "ratio_ours_over_tp")] + [f2(no_verify)]) + " |")
        out.append("")
    return "\n".join(out + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=("torchvision", "timm"), default="torchvision",
                    help="where the models come from (timm: see timm_models for the list)")
    ap.add_argument("--models", default="all",
                    help="all, or a comma-separated list (torchvision or timm names, cifar_resnet20, cifar_resnet56)")
    ap.add_argument("--ratio", type=float, default=0.3, help="fraction of each prunable group's channels to remove")
    ap.add_argument("--size", type=int, default=None, help="input side override (used only where the model runs on it)")
    ap.add_argument("--max-params", type=float, default=400e6, help="skip models with more parameters (default 400M)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--timeout-per-model", type=float, default=900.0, help="seconds per model and tool")
    ap.add_argument("--timing-models", default=",".join(DEFAULT_TIMING_MODELS),
                    help="models timed side by side (best of --timing-repeats) after the sweep")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help=f"folder with the CIFAR checkpoints (default {CHECKPOINTS})")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                    help="address-space cap per worker, GB (0: none); a model/tool that needs more fails alone")
    ap.add_argument("--resume", action="store_true", help="keep the models already in --json and run the rest")
    ap.add_argument("--tp-from", type=Path, default=None,
                    help="take Torch-Pruning's rows from an earlier sweep's JSON (same zoo, ratio and size) "
                         "instead of running it again: its results do not depend on chanprune's code")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1: stable timings on a shared machine)")
    ap.add_argument("--timing-repeats", type=int, default=3,
                    help="dedicated best-of-N timing runs of --timing-models after the sweep (0: use the sweep's single run)")
    ap.add_argument("--worker", choices=("ours", "tp", "timing"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    globals()["ZOO"] = args.zoo
    if args.checkpoints:  # workers read it from the environment
        os.environ["CHANPRUNE_CHECKPOINTS"] = str(args.checkpoints.resolve())
        globals()["CHECKPOINTS"] = args.checkpoints.resolve()

    if args.worker:
        sys.path.insert(0, str(REPO))
        import torch

        torch.set_num_threads(args.threads)
        try:
            if args.worker == "ours":
                res = worker_ours(args.model, args.ratio, args.size, args.max_params)
            elif args.worker == "timing":
                res = worker_timing(args.model, args.ratio, args.size, args.timing_repeats)
            else:
                res = worker_tp(args.model, args.ratio, args.size)
        except Exception as exc:  # noqa: BLE001  # model construction etc.
            res = {"tool": args.worker, "model": args.model, "status": "failed" if args.worker == "ours" else "error",
                   "reason": f"setup: {type(exc).__name__}: {str(exc)[:200]}"}
        Path(args.worker_out).write_text(json.dumps(res, default=str))
        return 0

    prov = provenance(threads=args.threads)  # the workers' thread count
    print(describe(prov), flush=True)
    names = model_list(args.models)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    print(f"{len(names)} models, ratio {args.ratio}, timeout {args.timeout_per_model:.0f} s per model and tool, "
          f"{args.threads} torch thread(s) per worker", flush=True)
    if args.resume and args.json and args.json.exists():
        previous = json.loads(args.json.read_text())
        results.update({k: v for k, v in previous.get("results", {}).items() if k in names})
        skipped.update({k: v for k, v in previous.get("summary", {}).get("skipped", {}).items() if k in names})
        print(f"resuming: {len(results)} done, {len(skipped)} skipped before", flush=True)
    tp_rows: dict[str, dict[str, Any]] = {}
    if args.tp_from:
        earlier = json.loads(args.tp_from.read_text())
        if (earlier["summary"].get("zoo"), earlier["summary"].get("ratio")) != (args.zoo, args.ratio):
            ap.error(f"--tp-from {args.tp_from} was a sweep of another zoo or ratio")
        tp_rows = {k: v["tp"] for k, v in earlier["results"].items() if v.get("tp")}
        print(f"Torch-Pruning rows of {len(tp_rows)} models from {args.tp_from}", flush=True)
    for name in names:
        if name in results or name in skipped:
            continue
        n = param_count_meta(name)
        if n is not None and n > args.max_params:
            skipped[name] = f"{n / 1e6:.0f}M params > --max-params {args.max_params / 1e6:.0f}M"
            print(f"{name:24s} skipped: {skipped[name]}", flush=True)
            continue
        r: dict[str, Any] = {"ours": run_worker("ours", name, args)}
        if r["ours"]["status"] == "skipped":  # too large, found by the worker
            skipped[name] = r["ours"]["reason"]
            print(f"{name:24s} skipped: {skipped[name]}", flush=True)
            continue
        if not args.no_tp:
            earlier_tp = tp_rows.get(name)
            same_input = earlier_tp is not None and earlier_tp.get("size") == r["ours"].get("size")
            r["tp"] = earlier_tp if same_input else run_worker("tp", name, args)
        results[name] = r
        o, t = r["ours"], r.get("tp")
        print(f"{name:24s} ours: {o['status']:16s} {o.get('reason', '')[:90]:90s} [{_fmt_s(ours_time(o))} s]  "
              f"tp: {t['status'] if t else '-'} {(t or {}).get('reason', '')[:60]} [{_fmt_s(tp_time(t or {}))} s]", flush=True)
        partial = {"summary": summarize(results, skipped, args), "provenance": prov, "results": results}
        if args.json:
            args.json.write_text(json.dumps(partial, indent=1, default=str))
    results = {n: results[n] for n in names if n in results}  # sweep order, also after --resume
    timing_runs: list[dict[str, Any]] = []
    if args.timing_repeats > 0 and not args.no_tp:
        for name in [n for n in args.timing_models.split(",") if n]:
            print(f"timing {name} (best of {args.timing_repeats}) ...", flush=True)
            r = run_worker("timing", name, args)
            if "ours_total_s" in r:
                timing_runs.append(r)
            else:
                print(f"  timing {name} failed: {r.get('status')} {r.get('reason', '')}", flush=True)
    summary = summarize(results, skipped, args, timing_runs)
    text = render(results, summary, prov)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "provenance": prov, "results": results}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Golden comparison: run every command on small inputs and record what it wrote, so that a
restructuring of the code can be checked to leave behaviour unchanged.

    python bench/golden.py run OUT [--src TREE]     # run the commands with the package of TREE
    python bench/golden.py compare BASE NEW          # exit 1 when the two records differ

`run` executes ~40 command lines (every command, the sample configs, the demo, bad input) in
OUT/work with `python -m chanprune_cli` from TREE (default: this checkout; e.g. a `git worktree`
of an older commit) and writes OUT/golden.json: per command its exit code, its `warning:`/`error:`
lines, its stdout where it has no timings, and a digest of every file it wrote. What a digest
covers: safetensors files by tensors and metadata, JSON documents by content, TorchScript by code
and tensors, ONNX by graph and initialisers, everything else by bytes. Timings (keys such as
`latency_ms`, `seconds`, `images_per_s`) and the OUT path are taken out first, so two runs of the
same code compare equal. Inputs are generated (seeded) or read from ../shared when present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SYNTH = "synthetic:3x32x32:10:64"
# JSON keys whose values are timings or depend on them: dropped before comparing.
TIMING_KEY = re.compile(r"(latency|seconds|elapsed|_ms$|^ms$|per_s|per_second|throughput|speedup|wall|duration"
                        r"|^time|_time$|img_s|images_s|^rate$|^started|^finished|^date$"
                        # derived from timings or from OUT's path: a run's fingerprints, a file's size with timings inside
                        r"|fingerprint|file_size_mb)", re.I)


def commands(r20: str, r20_trained: str | None, test_tar: str | None) -> list[tuple[str, list[str], bool]]:
    """(name, argv after `chanprune`, stdout is deterministic)."""
    a = ["--arch", "cifar_resnet20"]
    d = ["--data", SYNTH, "--calib-batches", "2", "--batch-size", "16"]
    cmds: list[tuple[str, list[str], bool]] = [
        ("analyze", ["analyze", r20, *a, "--json", "analyze.json"], True),
        ("analyze_data", ["analyze", r20, *a, *d, "--json", "analyze_data.json"], True),
        ("analyze_ln", ["analyze", r20, *a, "--through-layernorm", "--json", "-"], True),
        ("list_archs", ["analyze", "--list-archs"], True),
        ("list_criteria", ["score", "--list-criteria"], True),
    ]
    for crit in ("l1", "l2", "bn", "fpgm", "random", "taylor", "hrank", "sensitivity", "info", "cac", "whitebox"):
        extra = d if crit in ("taylor", "hrank", "sensitivity", "info", "cac", "whitebox") else []
        opts = ["--criterion-opt", "lam=0.01"] if crit == "whitebox" else []
        cmds.append((f"score_{crit}", ["score", r20, *a, "--criterion", crit, *extra, *opts, "--out", f"s_{crit}.safetensors",
                                       "--json", f"score_{crit}.json", "--seed", "1"], True))
    cmds += [
        ("prune_ratio", ["prune", r20, *a, "--criterion", "l1", "--ratio", "0.5", "--out", "p_ratio.safetensors",
                         "--json", "p_ratio.json"], True),
        ("prune_flops", ["prune", r20, *a, "--criterion", "l1", "--target-flops", "0.5", "--round-to", "4",
                         "--out", "p_flops.safetensors", "--json", "p_flops.json"], True),
        ("prune_scores", ["prune", r20, *a, "--scores", "s_taylor.safetensors", "--target-flops", "0.4",
                          "--cost-exponent", "0.5", "--out", "p_scores.safetensors", "--json", "p_scores.json"], True),
        ("prune_rounds", ["prune", r20, *a, "--criterion", "taylor", *d, "--target-flops", "0.5", "--rounds", "3",
                          "--recalibrate-bn", "2", "--out", "p_rounds.safetensors", "--json", "p_rounds.json"], True),
        ("prune_layer_ratio", ["prune", r20, *a, "--ratio", "0.5", "--layer-ratio", "layer3.*=0.7",
                               "--layer-ratio", "layer1.0.*=0", "--ignore", "conv1", "--min-keep", "4",
                               "--out", "p_lr.safetensors", "--json", "p_lr.json"], True),
        ("prune_dry", ["prune", r20, *a, "--target-flops", "0.3", "--dry-run", "--json", "-"], True),
        ("prune_val", ["prune", r20, *a, "--criterion", "hrank", *d, "--ratio", "0.3", "--val-data", SYNTH,
                       "--val-images", "32", "--recalibrate-bn", "2", "--out", "p_val.safetensors",
                       "--json", "p_val.json"], True),
        ("prune_normalize", ["prune", r20, *a, "--criterion", "fpgm", "--target-flops", "0.5", "--normalize", "none",
                             "--no-verify", "--out", "p_norm.safetensors", "--json", "p_norm.json"], True),
        ("analyze_pruned", ["analyze", "p_flops.safetensors", "--json", "analyze_pruned.json"], True),
        ("finetune", ["finetune", "p_ratio.safetensors", "--data", SYNTH, "--max-steps", "3", "--batch-size", "16",
                      "--val-data", SYNTH, "--out", "f.safetensors", "--json", "f.json"], False),
        ("finetune_kd", ["finetune", "p_ratio.safetensors", "--data", SYNTH, "--max-steps", "3", "--batch-size", "16",
                         "--teacher", r20, "--teacher-arch", "cifar_resnet20", "--out", "f_kd.safetensors",
                         "--json", "f_kd.json"], False),
        ("finetune_asfp", ["finetune", r20, *a, "--data", SYNTH, "--epochs", "2", "--batch-size", "16",
                           "--schedule", "asfp", "--ratio", "0.3", "--out", "f_asfp.safetensors", "--json", "f_asfp.json"],
         False),
        ("finetune_cac", ["finetune", r20, *a, "--data", SYNTH, "--max-steps", "6", "--batch-size", "16",
                          "--schedule", "cac", "--target-flops", "0.3", "--prune-every", "2",
                          "--out", "f_cac.safetensors", "--json", "f_cac.json"], False),
        ("finetune_whitebox", ["finetune", r20, *a, "--data", SYNTH, "--max-steps", "6", "--batch-size", "16",
                               "--schedule", "whitebox", "--ratio", "0.3", "--out", "f_wb.safetensors",
                               "--json", "f_wb.json"], False),
        ("export_onnx", ["export", "p_flops.safetensors", "--out", "m.onnx", "--json", "export_onnx.json"], True),
        ("export_ts", ["export", "p_flops.safetensors", "--out", "m.ts", "--json", "export_ts.json"], True),
        ("export_st", ["export", "p_flops.safetensors", "--format", "safetensors", "--out", "plain.safetensors",
                       "--json", "export_st.json"], True),
        ("bench", ["bench", r20, "p_flops.safetensors", *a, "--data", SYNTH, "--batch-size", "16", "--batch-sizes", "1,4",
                   "--repeats", "2", "--warmup", "0", "--max-time", "1", "--max-acc-drop", "100", "--json", "bench.json"],
         False),
        ("bench_gate", ["bench", r20, "p_flops.safetensors", *a, "--batch-sizes", "2", "--repeats", "2", "--warmup", "0",
                        "--min-speedup", "1000", "--json", "bench_gate.json"], False),
        ("init", ["init", "--checkpoint", r20, "--arch", "cifar_resnet20", "--data", SYNTH, "--val-data", SYNTH,
                  "--criterion", "l1", "--target-flops", "0.5", "--out", "proj.toml"], True),
        ("config", ["config", "prune", "--config", "proj.toml", "--json", "config.json"], True),
        ("run_proj", ["run", "proj.toml", "--dir", "run_proj", "--set", "calib_batches=2", "--set", "batch_size=16",
                      "--set", "bench.repeats=2", "--set", "bench.warmup=0", "--set", "bench.max_time=1",
                      "--set", "prune.recalibrate_bn=2", "--json", "run_proj.json"], False),
        ("bad_ratio", ["prune", r20, *a, "--ratio", "1.5"], True),
        ("bad_ckpt", ["analyze", "missing.pt", *a], True),
        ("bad_criterion", ["score", r20, *a, "--criterion", "nope"], True),
        ("bad_shape", ["analyze", r20, *a, "--input-shape", "3,x,32"], True),
        ("bad_both", ["prune", r20, *a, "--ratio", "0.3", "--target-flops", "0.3"], True),
        ("bad_export", ["export", r20, *a, "--out", "m.xyz"], True),
    ]
    for sample in sorted((REPO / "sample_configs").glob("*.toml")):
        if "resnet18" in sample.name:
            model = ["--set", "checkpoint=r18.pt", "--set", "input_shape=3,32,32", "--set", f"prune.val_data={SYNTH}"]
        else:
            model = ["--set", f"checkpoint={'r56.pt' if 'resnet56' in sample.name else r20}"]
        cmds.append((f"sample_{sample.stem}", [
            "run", str(sample), "--dir", f"run_{sample.stem}", *model,
            "--set", f"data={SYNTH}", "--set", f"bench.data={SYNTH}", "--set", "calib_batches=2", "--set", "batch_size=8",
            "--set", "prune.recalibrate_bn=2", "--set", "bench.repeats=2", "--set", "bench.warmup=0",
            "--set", "bench.max_time=1", "--set", "bench.batch_sizes=1,4", "--set", "finetune.max_steps=2",
            "--set", f"finetune.data={SYNTH}", "--set", f"finetune.val_data={SYNTH}", "--set", "finetune.val_images=16",
            "--set", "finetune.epochs=1", "--set", "finetune.batch_size=8", "--set", f"prune.data={SYNTH}",
            "--set", f"score.data={SYNTH}", "--set", "score.calib_batches=2", "--set", "score.batch_size=8",
            *(["--set", "finetune.teacher=r56.pt"] if "lossless" in sample.name or "sensitivity" in sample.name else []),
            *(["--set", "bench.min_speedup=0.001", "--set", "bench.gate_batch=4"] if "ci_gates" in sample.name else []),
            *(["--set", "bench.max_acc_drop=100"] if "lossless" in sample.name or "ci_gates" in sample.name else []),
            "--json", f"sample_{sample.stem}.json"], False))
    if r20_trained and test_tar:
        t = ["--data", test_tar, "--calib-batches", "4", "--batch-size", "50"]
        cmds += [
            ("shared_analyze", ["analyze", r20_trained, *a, *t, "--json", "shared_analyze.json"], True),
            ("shared_prune", ["prune", r20_trained, *a, "--criterion", "taylor", *t, "--target-flops", "0.5",
                              "--val-data", test_tar, "--val-images", "200", "--recalibrate-bn", "4",
                              "--out", "shared_p.safetensors", "--json", "shared_prune.json"], True),
        ]
    return cmds


def _prepare(work: Path, src: Path, env: dict[str, str]) -> tuple[str, str | None, str | None]:
    code = ("import torch, sys; from chanprune_cli.models import build_model, parse_arch; torch.manual_seed(0); "
            "torch.save(build_model(parse_arch('cifar_resnet20', None)).state_dict(), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, "r20.pt"], cwd=work, env=env, check=True)
    subprocess.run([sys.executable, "-c", code.replace("cifar_resnet20", "cifar_resnet56"), "r56.pt"], cwd=work, env=env,
                   check=True)
    subprocess.run([sys.executable, "-c", code.replace("'cifar_resnet20', None", "'torchvision:resnet18', '{\"num_classes\": 10}'"),
                    "r18.pt"], cwd=work, env=env, check=True)
    trained = SHARED / "checkpoints" / "resnet20-cifar10jpeg.pt"
    test_tar = SHARED / "data" / "cifar10-jpeg-test.tar.gz"
    return ("r20.pt", str(trained) if trained.exists() else None, str(test_tar) if test_tar.exists() else None)


def run(out: Path, src: Path, only: list[str] | None) -> None:
    work = out / "work"
    if work.exists() and not only:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "CHANPRUNE_NO_PROJECT_CONFIG": "1", "COLUMNS": "120",
           "PYTHONHASHSEED": "0"}
    env.pop("CHANPRUNE_DEBUG", None)
    check = subprocess.run([sys.executable, "-c", "import chanprune_cli; print(chanprune_cli.__file__)"], env=env,
                           cwd=work, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(check).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"chanprune_cli imports from {check}, not from {src}")
    record: dict[str, Any] = {"src": str(src), "commands": {}}
    if only and (out / "golden.json").exists():  # --only updates an earlier record
        record = json.loads((out / "golden.json").read_text())
    for name, argv, deterministic in commands(*_prepare(work, src, env)):
        if only and name not in only:
            continue
        existing = _stamps(work)
        proc = subprocess.run([sys.executable, "-m", "chanprune_cli", *argv], cwd=work, env=env, capture_output=True,
                              text=True)
        written = sorted(p for p, stamp in _stamps(work).items() if existing.get(p) != stamp)
        entry: dict[str, Any] = {
            "argv": argv, "exit": proc.returncode,
            "said": [line for line in proc.stderr.splitlines() if line.startswith(("warning:", "error:"))
                     and (deterministic or "as fast" not in line)],
            "files": {str(p.relative_to(work)): digest(p, out) for p in written if p.suffix != ".lock"},
        }
        if deterministic:
            entry["stdout"] = _scrub_text(proc.stdout, out)
        record["commands"][name] = entry
        print(f"{name}: exit {proc.returncode}, {len(written)} file(s)", flush=True)
    demo = out / "demo"
    if not only or "demo" in only:
        shutil.rmtree(demo, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "chanprune_cli.demo", "--out", str(demo)], cwd=out, env=env,
                              capture_output=True, text=True)
        record["commands"]["demo"] = {"exit": proc.returncode, "files": {
            str(p.relative_to(demo)): digest(p, out) for p in sorted(demo.rglob("*")) if p.is_file()}}
        print(f"demo: exit {proc.returncode}", flush=True)
    (out / "golden.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def redigest(out: Path) -> None:
    record = json.loads((out / "golden.json").read_text())
    for name, entry in record["commands"].items():
        folder = out / "demo" if name == "demo" else out / "work"
        entry["files"] = {f: digest(folder / f, out) for f in entry["files"] if (folder / f).exists()}
    (out / "golden.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _stamps(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# digests


def _scrub_text(text: str, out: Path) -> str:
    return text.replace(str(out.resolve()), "<OUT>").replace(str(out), "<OUT>")


def _scrub(value: Any, out: Path) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, out) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):  # "runs slower than the reference" warnings depend on the timings
        return [_scrub(v, out) for v in value if not (isinstance(v, str) and " as fast" in v)]
    if isinstance(value, str):
        return _scrub_text(value, out)
    return value


def _bench_gate_values(doc: Any) -> Any:
    """A latency gate's value is a timing; its name and limit are not."""
    if isinstance(doc, dict) and isinstance(doc.get("gates"), list):
        for gate in doc["gates"]:
            if isinstance(gate, dict) and "speed" in str(gate.get("name", "")):
                gate.pop("value", None)
                gate.pop("passed", None)
    return doc


def digest(path: Path, out: Path) -> Any:
    suffix = path.suffix
    try:
        if suffix == ".json":
            return _scrub(_bench_gate_values(_nested_json(json.loads(path.read_text()))), out)
        if suffix == ".safetensors":
            return _safetensors_digest(path, out)
        if suffix == ".onnx":
            return _onnx_digest(path)
        if suffix in (".ts", ".pt") and _is_torchscript(path):
            return _torchscript_digest(path)
        if suffix in (".pt", ".pth", ".th"):
            return _pickle_digest(path)
    except Exception as exc:  # noqa: BLE001 -- a digest that fails is recorded, so the comparison shows it
        return {"unreadable": f"{type(exc).__name__}: {exc}"}
    if suffix in (".md", ".toml", ".txt", ".log") or path.name.endswith(".json.tmp"):
        return _scrub_text(path.read_text(errors="replace"), out)
    if suffix == ".png":
        return "png"  # plots carry timings
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nested_json(doc: Any) -> Any:
    """JSON strings that hold JSON (safetensors metadata, history) parsed, so timings inside are seen."""
    if isinstance(doc, dict):
        return {k: _nested_json(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_nested_json(v) for v in doc]
    if isinstance(doc, str) and doc[:1] in "{[":
        try:
            return _nested_json(json.loads(doc))
        except ValueError:
            return doc
    return doc


def _safetensors_digest(path: Path, out: Path) -> Any:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in sorted(f.keys()):
            tensors[key] = _tensor_digest(f.get_tensor(key))
    return {"meta": _scrub(_nested_json(meta), out), "tensors": tensors,
            "bytes": hashlib.sha256(path.read_bytes()).hexdigest()}


def _tensor_digest(t: Any) -> str:
    import torch

    return (f"{tuple(t.shape)} {t.dtype} "
            f"{hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]}")


def _pickle_digest(path: Path) -> Any:
    """torch.save files by their tensors (the zip holds a random serialization id); whole pickled
    models by bytes."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- not a weights-only file: compare the bytes
        return hashlib.sha256(path.read_bytes()).hexdigest()
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            flat[key] = _tensor_digest(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            flat[key] = repr(value)

    walk(obj, "")
    return flat


def _onnx_digest(path: Path) -> Any:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    nodes = [f"{n.op_type}:{','.join(n.input)}->{','.join(n.output)}" for n in model.graph.node]
    inits = {i.name: hashlib.sha256(numpy_helper.to_array(i).tobytes()).hexdigest()[:16] for i in model.graph.initializer}
    return {"nodes": hashlib.sha256("\n".join(nodes).encode()).hexdigest(), "n_nodes": len(nodes), "initializers": inits}


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("code/__torch__.py") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _torchscript_digest(path: Path) -> Any:
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    tensors = {k: _tensor_digest(v) for k, v in module.state_dict().items()}
    return {"code": hashlib.sha256(module.code.encode()).hexdigest(), "tensors": tensors}


# --------------------------------------------------------------------------------------------
# compare


def _diff(a: Any, b: Any, where: str, out: list[str], ignore_bytes: bool) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if ignore_bytes and k == "bytes":
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'new' if k not in a else 'base'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out, ignore_bytes)
        if list(a) != list(b) and set(a) == set(b) and not where.endswith((".files", ".commands", ".tensors", ".initializers")):
            out.append(f"{where}: same keys, another order")
    elif a != b:
        if isinstance(a, str) and isinstance(b, str) and "\n" in a + b:
            import difflib

            lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), "base", "new", lineterm="", n=1))
            out.append(f"{where}:\n    " + "\n    ".join(lines[:40]))
        else:
            out.append(f"{where}: {json.dumps(a)[:300]} != {json.dumps(b)[:300]}")


def compare(base: Path, new: Path, ignore_bytes: bool) -> int:
    a = json.loads((base / "golden.json").read_text())["commands"]
    b = json.loads((new / "golden.json").read_text())["commands"]
    diffs: list[str] = []
    _diff(a, b, "", diffs, ignore_bytes)
    for d in diffs:
        print(d)
    print(f"{len(a)} vs {len(b)} commands; {len(diffs)} difference(s)")
    return 1 if diffs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run the commands, write OUT/golden.json")
    r.add_argument("out", type=Path)
    r.add_argument("--src", type=Path, default=REPO, help="the source tree whose chanprune_cli runs (default: this one)")
    r.add_argument("--only", nargs="*", help="run only these command names")
    g = sub.add_parser("redigest", help="digest the files of an earlier run again (after a change to the digests; "
                                        "files several commands rewrite, such as .chanprune/last.json, get their last state)")
    g.add_argument("out", type=Path)
    c = sub.add_parser("compare", help="compare two records; exit 1 on any difference")
    c.add_argument("base", type=Path)
    c.add_argument("new", type=Path)
    c.add_argument("--ignore-bytes", action="store_true", help="compare safetensors by tensors and metadata only")
    args = parser.parse_args()
    if args.what == "redigest":
        redigest(args.out.resolve())
        return 0
    if args.what == "run":
        run(args.out.resolve(), args.src.resolve(), args.only)
        return 0
    return compare(args.base, args.new, args.ignore_bytes)


if __name__ == "__main__":
    raise SystemExit(main())

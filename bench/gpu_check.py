"""The prepared GPU check: every GPU measurement the project needs, in one run of about 10 minutes.

Run by `bench/gpu_check.sh` on a machine with one CUDA GPU (see README, "The GPU check"); the data
comes from `.gpu_check_data/` (made here by `bench/gpu_check_prepare.sh`), never from ../shared.
Phases, in priority order, each in its own process with its own time limit (a phase that fails or
runs out of time is recorded as such and the next one runs):

  env         GPU, driver, torch
  tests       `pytest -k "cuda or gpu"`: the CUDA-relevant tests
  prune       ResNet-56 (CIFAR-10 JPEG checkpoint): score (taylor) and prune 50 % of the MACs
  throughput  fine-tuning images/s of the pruned model: the loader path (JPEG decode and
              augmentation in workers) vs the tensor path (images on the GPU), and the plain
              forward+backward+SGD step from GPU-resident tensors (pruned and unpruned)
  finetune    10 distilled epochs of the pruned model (fewer when the measured rate says 10
              would not fit the phase's time; recorded), validated on the test set
  export      ONNX export of the fine-tuned model (checked against PyTorch)
  latency     `chanprune bench` of the ResNet-56 pair, and of a ResNet-50 with 50 % of the MACs
              removed with and without `--round-to 8`: fp32 without autotuning (as measured
              before) vs bf16 channels-last with cuDNN autotuning, batch 1/64/256
  latency_target  `prune --target-latency 0.5` of the ResNet-50 as deployed (bf16, channels-last,
              cuDNN autotuning, `--round-to auto`) at batch 1 and at batch 256, each pair re-timed by
              `chanprune bench` at batch 1 and 256: never slower at batch 1, ≥ 1.7x at batch 256
  scoring     `bench/criteria_speed.py` on CUDA: each criterion's cost relative to forward+backward
  decode      large JPEG images (ImageNet-sized, made here), a ResNet-50 fine-tuned at 224 px: the
              loader path (decode and augment in workers) vs `--device-decode` (nvJPEG), input
              pipeline alone and whole training steps
  suite       the whole test suite (pytest-xdist) in the time that is left: the failures with a GPU

Everything is written to OUT (`$OUT`, else ./gpu_check_out): `gpu_check.md` (the summary, rewritten
after every phase, so a cut-off run still reports), `gpu_check.json` (the same as data) and
`gpu_check.log` (every command's output).

`--quick` is the dry run on the CPU (tiny budgets, CUDA-only parts skip): it proves the whole
script works end to end before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provenance import describe, provenance

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
TRAIN_IMAGES = 50_000


@dataclass
class Budget:
    """Seconds per phase and sizes of the work (the GPU run, or the CPU dry run with --quick)."""

    tests: int = 60
    prune: int = 50
    throughput: int = 60
    finetune: int = 120
    export: int = 25
    latency: int = 100
    latency_target: int = 130
    scoring: int = 45
    decode: int = 45
    total: int = 600
    epochs: int = 10
    batch: int = 256
    calib_batches: int = 16
    throughput_steps: int = 150
    r50_shape: str = "3,224,224"
    batch_sizes: str = "1,64,256"
    target_batch: int = 256  # latency_target: the large latency batch
    deployed: bool = True  # latency_target: bf16, channels-last (the CPU dry run times fp32)
    latency_time: float = 1.5
    criteria_batches: int = 16
    criteria_arch: str = "cifar_resnet56"
    eval_batches: int | None = None  # accuracy in `latency` on all test images
    decode_images: int = 640
    decode_size: int = 224
    decode_batch: int = 128
    decode_steps: int = 15


QUICK = Budget(tests=120, prune=300, throughput=300, finetune=300, export=120, latency=420, latency_target=600,
               scoring=300, total=3600, target_batch=4, deployed=False, epochs=1, batch=16, calib_batches=2,
               throughput_steps=3, r50_shape="3,64,64",
               batch_sizes="1,4", latency_time=0.2, criteria_batches=2, criteria_arch="cifar_resnet20",
               eval_batches=2, decode=300, decode_images=40, decode_size=96, decode_batch=8, decode_steps=3)
PHASES = ("env", "tests", "prune", "throughput", "finetune", "export", "latency", "latency_target", "scoring", "decode",
          "suite")


@dataclass
class Check:
    out: Path
    data: Path
    device: str
    budget: Budget
    quick: bool
    started: float = field(default_factory=time.monotonic)
    provenance: dict[str, Any] = field(default_factory=provenance)
    phases: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.out / "gpu_check.log"

    def left(self) -> float:
        return self.budget.total - (time.monotonic() - self.started)

    def run(self, phase: str, cmd: list[str], limit: float, *, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run `cmd` (its own process group) for at most `limit` s; its output goes to the log."""
        limit = max(1.0, min(limit, self.left()))
        start = time.monotonic()
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n===== [{phase}] $ {' '.join(cmd)}  (limit {limit:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            lines: list[str] = []
            try:
                output, _ = proc.communicate(timeout=limit)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                status = f"timed out after {limit:.0f} s"
            lines = (output or "").splitlines()
            log.write(output or "")
        step = {"phase": phase, "command": " ".join(cmd), "status": status,
                "seconds": round(time.monotonic() - start, 1), "tail": lines[-15:]}
        self.phases.append(step)
        print(f"[{phase}] {status} in {step['seconds']} s", flush=True)
        return {**step, "output": lines}

    def skip(self, phase: str, why: str) -> None:
        self.phases.append({"phase": phase, "command": "", "status": f"skipped: {why}", "seconds": 0.0, "tail": []})
        print(f"[{phase}] skipped: {why}", flush=True)

    def write(self) -> None:
        doc = {"provenance": self.provenance, "device": self.device, "quick": self.quick,
               "elapsed_s": round(time.monotonic() - self.started, 1), "phases": self.phases, **self.facts}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        (self.out / "gpu_check.md").write_text(markdown(doc), encoding="utf-8")


def chanprune(*args: str) -> list[str]:
    return [sys.executable, "-m", "chanprune_cli", *args]


def helper(phase: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--phase", phase, *args]


def json_of(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# the phases


def phase_env(check: Check) -> None:
    code = ("import json, torch, platform; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() if c else None, "
            "'gpu': torch.cuda.get_device_name(0) if c else None, 'python': platform.python_version(), "
            "'cpus': len(__import__('os').sched_getaffinity(0))}))")
    result = check.run("env", [sys.executable, "-c", code], 60)
    for line in result["output"]:
        if line.startswith("{"):
            check.facts["env"] = json.loads(line)


def phase_tests(check: Check) -> None:
    result = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or gpu",
                                 "-rfEs", "tests"], check.budget.tests)
    check.facts["tests_cuda"] = _pytest_outcome(result["output"])


def _pytest_outcome(lines: list[str]) -> dict[str, Any]:
    summary = next((ln for ln in reversed(lines) if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln)), "")
    failed = sorted({m.group(1) for ln in lines if (m := re.match(r"(?:\[gw\d+\] )?FAILED (\S+)", ln.strip()))}
                    | {m.group(1) for ln in lines if (m := re.search(r"FAILED (tests/\S+)", ln))})
    errors = sorted({m.group(1) for ln in lines if (m := re.match(r"ERROR (\S+)", ln.strip()))})
    return {"summary": summary.strip("= "), "failed": failed, "errors": errors}


def phase_prune(check: Check, work: Path) -> Path | None:
    b, data, dev = check.budget, check.data, check.device
    ckpt = data / "resnet56-cifar10jpeg.pt"
    scores, pruned = work / "r56.scores.safetensors", work / "r56-pruned.safetensors"
    common = ["--arch", "cifar_resnet56", "--data", str(data / "cifar10-jpeg-train.tar.gz"), "--mean", MEAN,
              "--std", STD, "--batch-size", "128", "--calib-batches", str(b.calib_batches), "--device", dev]
    score = check.run("prune", chanprune("score", str(ckpt), *common, "--criterion", "taylor", "--out", str(scores),
                                         "--force"), b.prune / 2)
    if not score["status"] == "ok":
        return None
    prune = check.run("prune", chanprune("prune", str(ckpt), *common, "--scores", str(scores), "--target-flops", "0.5",
                                         "--out", str(pruned), "--json", str(work / "prune.json"), "--force"), b.prune / 2)
    report = json_of(work / "prune.json")
    if report is not None:
        check.facts["pruned"] = {k: report.get(k) for k in ("before", "after", "accuracy") if k in report}
    return pruned if prune["status"] == "ok" and pruned.exists() else None


def phase_throughput(check: Check, pruned: Path, work: Path) -> None:
    out = work / "throughput.json"
    check.run("throughput", helper("throughput", "--data", str(check.data), "--device", check.device, "--pruned",
                                   str(pruned), "--steps", str(check.budget.throughput_steps), "--batch",
                                   str(check.budget.batch), "--result", str(out)), check.budget.throughput)
    result = json_of(out)
    if result is not None:
        check.facts["throughput"] = result


def phase_finetune(check: Check, pruned: Path, work: Path) -> Path | None:
    b, data = check.budget, check.data
    rate = (check.facts.get("throughput") or {}).get("rates", {}).get("trainer, tensor path")
    epochs = b.epochs
    if rate and not check.quick:  # what fits 80 % of the phase (distillation adds the teacher's forward: ~1.3x)
        epochs = max(1, min(b.epochs, int(0.8 * b.finetune * rate / 1.3 / TRAIN_IMAGES)))
    out = work / "r56-ft.safetensors"
    args = ["finetune", str(pruned), "--data", str(data / "cifar10-jpeg-train.tar.gz"), "--val-data",
            str(data / "cifar10-jpeg-test.tar.gz"), "--mean", MEAN, "--std", STD, "--teacher",
            str(data / "resnet56-cifar10jpeg.pt"), "--teacher-arch", "cifar_resnet56", "--batch-size", str(b.batch),
            "--lr", "0.05", "--device", check.device, "--save-every", "100000", "--out", str(out),
            "--json", str(work / "finetune.json"), "--force"]
    args += ["--max-steps", "3", "--val-images", "256"] if check.quick else ["--epochs", str(epochs)]
    check.facts["finetune_epochs"] = None if check.quick else epochs
    result = check.run("finetune", chanprune(*args), b.finetune)
    report = json_of(work / "finetune.json")
    if report is not None:
        check.facts["finetune"] = {"steps": report.get("steps"), "epochs": report.get("epochs"), "train": report.get("train"),
                                   "final": report.get("final"), "best": report.get("best"), "after": report.get("after"),
                                   "evals": [{k: e.get(k) for k in ("epoch", "top1", "loss")} for e in report.get("evals", [])]}
    return out if result["status"] == "ok" and out.exists() else None


def phase_export(check: Check, model: Path, work: Path) -> None:
    result = check.run("export", chanprune("export", str(model), "--format", "onnx", "--out", str(work / "r56-ft.onnx"),
                                           "--json", str(work / "export.json"), "--force"), check.budget.export)
    report = json_of(work / "export.json")
    if report is not None:
        check.facts["export"] = {"status": result["status"], "check": report.get("check", report.get("verification"))}


def _bench(check: Check, name: str, models: list[str], arch: str, extra: list[str], work: Path, limit: float,
           phase: str = "latency") -> None:
    report = work / f"{name.replace(' ', '-')}.json"
    check.run(phase, chanprune("bench", *models, "--arch", arch, "--device", check.device, "--batch-sizes",
                                   check.budget.batch_sizes, "--max-time", str(check.budget.latency_time), "--json",
                                   str(report), "--force", *extra), limit)
    doc = json_of(report)
    if doc is not None:
        check.facts.setdefault("latency", {})[name] = {
            "timing": doc.get("timing"),
            "models": [{"path": Path(m["path"]).name, "macs": m["macs"], "latency_ms": m["latency_ms"],
                        "accuracy": m.get("accuracy"), "speedup": m["vs_reference"]["speedup"]} for m in doc["models"]]}


def phase_latency(check: Check, r56_pair: list[str], work: Path) -> None:
    b = check.budget
    fast = ["--dtype", "bf16", "--channels-last"]  # as deployed: bf16, channels-last, autotuned
    plain = ["--dtype", "fp32", "--no-cudnn-benchmark"]
    if r56_pair:
        data = ["--data", str(check.data / "cifar10-jpeg-test.tar.gz"), "--mean", MEAN, "--std", STD]
        if b.eval_batches is not None:
            data += ["--calib-batches", str(b.eval_batches)]
        _bench(check, "r56 fp32", r56_pair, "cifar_resnet56", [*plain, *data], work, b.latency / 5)
        _bench(check, "r56 deployed", r56_pair, "cifar_resnet56", fast, work, b.latency / 8)
    # ResNet-50 (random weights: latency does not depend on them), 50 % of the MACs removed by l1.
    base = _resnet50(check, work, "latency")
    if base is None:
        return
    models = [str(base)]
    for round_to in ("1", "8"):
        out = work / f"r50-half-round{round_to}.safetensors"
        step = check.run("latency", chanprune("prune", str(base), "--arch", "torchvision:resnet50", "--input-shape",
                                              b.r50_shape, "--criterion", "l1", "--target-flops", "0.5", "--round-to",
                                              round_to, "--device", check.device, "--out", str(out), "--force"),
                         b.latency / 6)
        if step["status"] == "ok":
            models.append(str(out))
    shape = ["--input-shape", b.r50_shape]
    _bench(check, "r50 fp32", models, "torchvision:resnet50", [*plain, *shape], work, b.latency / 4)
    _bench(check, "r50 deployed", models, "torchvision:resnet50", [*fast, *shape], work, b.latency / 4)


def _resnet50(check: Check, work: Path, phase: str) -> Path | None:
    """A torchvision ResNet-50 with random weights (latency does not depend on them), made once."""
    base = work / "r50.pt"
    if base.exists():
        return base
    made = check.run(phase, [sys.executable, "-c", "import sys, torch, torchvision; torch.manual_seed(0); "
                             "torch.save(torchvision.models.resnet50().state_dict(), sys.argv[1])", str(base)], 60)
    return base if made["status"] == "ok" else None


def phase_latency_target(check: Check, work: Path) -> None:
    """`prune --target-latency 0.5` of the ResNet-50 as deployed, at batch 1 and at the large batch;
    each pair re-timed by `bench` at both batch sizes."""
    b = check.budget
    base = _resnet50(check, work, "latency_target")
    if base is None:
        return
    deployed = ["--latency-dtype", "bf16", "--latency-channels-last"] if b.deployed else []
    timed = ["--dtype", "bf16", "--channels-last"] if b.deployed else []
    batches = f"1,{b.target_batch}"
    for batch in (1, b.target_batch):
        out, report = work / f"r50-latency-b{batch}.safetensors", work / f"r50-latency-b{batch}.json"
        step = check.run("latency_target", chanprune(
            "prune", str(base), "--arch", "torchvision:resnet50", "--input-shape", b.r50_shape, "--criterion", "l1",
            "--target-latency", "0.5", "--latency-batch", str(batch), "--round-to", "auto", *deployed, "--device",
            check.device, "--out", str(out), "--json", str(report), "--force"), b.latency_target / 3)
        doc = json_of(report)
        if doc is not None:
            check.facts.setdefault("latency_target", {})[f"batch {batch}"] = {
                "status": step["status"], "latency": doc.get("latency"), "macs": [doc["before"]["macs"], doc["after"]["macs"]],
                "warnings": doc.get("warnings")}
        if step["status"] == "ok":
            _bench(check, f"r50 latency target 0.5 at batch {batch}", [str(base), str(out)], "torchvision:resnet50",
                   [*timed, "--input-shape", b.r50_shape, "--batch-sizes", batches], work, b.latency_target / 6,
                   "latency_target")


def phase_scoring(check: Check) -> None:
    b = check.budget
    result = check.run("scoring", [sys.executable, "bench/criteria_speed.py", "--device", check.device, "--arch",
                                   b.criteria_arch, "--batches", str(b.criteria_batches), "--batch-size",
                                   "128" if not check.quick else "16", "--repeats", "3" if not check.quick else "1",
                                   "--threads", str(os.cpu_count() or 1)], b.scoring)
    rows = [ln for ln in result["output"] if re.match(r"^\S.*\s[\d.]+x\s", ln)]
    header = f"{b.criteria_arch}, batch"
    check.facts["scoring"] = {"header": next((ln for ln in result["output"] if ln.startswith(header)), ""),
                              "rows": rows}


def phase_suite(check: Check) -> None:
    left = check.left() - 10
    if check.quick or left < 45:
        check.skip("suite", "the dry run" if check.quick else f"{max(left, 0):.0f} s left")
        return
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    # pytest-timeout is not known to be on the lent machine: the phase's own limit bounds the run.
    result = check.run("suite", [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", str(workers), "-v",
                                 "-rfE", "tests"], left, env={"OMP_NUM_THREADS": "1"})
    check.facts["suite"] = _pytest_outcome(result["output"])


def phase_decode(check: Check, work: Path) -> None:
    b, out = check.budget, work / "decode.json"
    check.run("decode", helper("decode", "--device", check.device, "--steps", str(b.decode_steps), "--batch",
                               str(b.decode_batch), "--images", str(b.decode_images), "--size", str(b.decode_size),
                               "--work", str(work), "--result", str(out)), b.decode)
    result = json_of(out)
    if result is not None:
        check.facts["decode"] = result


# --------------------------------------------------------------------------------------------
# the throughput helper (its own process: run by phase_throughput)


def throughput(args: argparse.Namespace) -> None:
    import copy

    import torch
    import torch.nn.functional as F

    from chanprune_cli.checkpoint import load_checkpoint
    from chanprune_cli.data import open_dataset
    from chanprune_cli.train import TrainConfig, Trainer
    from chanprune_cli.train.inputs import default_workers

    device = torch.device(args.device)
    data = Path(args.data)
    pruned = load_checkpoint(args.pruned).model
    full = load_checkpoint(data / "resnet56-cifar10jpeg.pt", arch="cifar_resnet56").model
    dataset = open_dataset(str(data / "cifar10-jpeg-train.tar.gz"), input_shape=(3, 32, 32), mean=MEAN, std=STD,
                           train=True)
    rates: dict[str, float] = {}

    def trainer(tensor: bool) -> float:
        cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=0.01, progress=False, save_every=None,
                          tensor_cache=tensor)
        return Trainer(copy.deepcopy(pruned), dataset, cfg, device=device).fit().images_per_second

    def resident(model: torch.nn.Module) -> float:
        """forward+backward+SGD from GPU-resident tensors, with the trainer's precision and memory format."""
        model = copy.deepcopy(model).to(device).train()
        cuda = device.type == "cuda"
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        x = torch.randn(args.batch, 3, 32, 32, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if cuda else x
        y = torch.randint(0, 10, (args.batch,), device=device)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(min(10, args.steps)):
            step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        return args.steps * args.batch / (time.perf_counter() - start)

    trainer(True)  # warm-up: CUDA context, the tensor cache decoded and written, kernels chosen
    rates["trainer, loader path"] = trainer(False)
    rates["trainer, tensor path"] = trainer(True)
    rates["plain step, GPU-resident tensors, pruned"] = resident(pruned)
    rates["plain step, GPU-resident tensors, unpruned"] = resident(full)
    result = {"batch": args.batch, "steps": args.steps, "workers": default_workers(device), "rates": rates}
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# the decode helper (its own process: run by phase_decode)


def decode(args: argparse.Namespace) -> None:
    import torch
    import torchvision

    from chanprune_cli.data import open_dataset
    from chanprune_cli.train import TrainConfig, Trainer
    from chanprune_cli.train.inputs import default_workers
    from input_pipeline import jpeg_folder, mean_kb, pipeline_rate  # bench/, this script's folder

    device = torch.device(args.device)
    folder = jpeg_folder(Path(args.work) / f"jpegs-{args.images}-{args.size}", args.images, args.size)
    dataset = open_dataset(str(folder), input_shape=(3, args.size, args.size), train=True)
    workers = default_workers(device)

    def pipeline(device_decode: bool) -> float:
        return pipeline_rate(dataset, device=device, batch=args.batch, steps=args.steps, workers=workers,
                             device_decode=device_decode)

    def trainer(device_decode: bool, steps: int) -> float:
        torch.manual_seed(0)
        model = torchvision.models.resnet50(num_classes=10)
        cfg = TrainConfig(max_steps=steps, batch_size=args.batch, lr=0.01, progress=False, save_every=None,
                          workers=workers, device_decode=device_decode)
        return Trainer(model, dataset, cfg, device=device).fit().images_per_second

    trainer(True, 2)  # warm-up: CUDA context, nvJPEG, kernels chosen
    rates = {"input only, loader path": pipeline(False), "input only, device decode": pipeline(True),
             "ResNet-50 training, loader path": trainer(False, args.steps),
             "ResNet-50 training, device decode": trainer(True, args.steps)}
    result = {"images": len(dataset), "size": args.size, "mean_jpeg_kb": round(mean_kb(folder), 1),
              "batch": args.batch, "steps": args.steps, "workers": workers, "rates": rates}
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# the summary


def markdown(doc: dict[str, Any]) -> str:
    env = doc.get("env") or {}
    lines = [f"# GPU check ({'CPU dry run' if doc['quick'] else doc['device']})", "", describe(doc["provenance"]), "",
             f"{env.get('gpu') or platform.processor() or 'cpu'}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, {env.get('cpus')} CPUs; {doc['elapsed_s']} s in all.", "",
             "| phase | status | s |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {p['status']} | {p['seconds']} |" for p in doc["phases"]]
    for key, title in (("tests_cuda", "CUDA tests"), ("suite", "Whole suite with a GPU present")):
        t = doc.get(key)
        if t:
            lines += ["", f"## {title}", "", f"{t['summary']}", ""] + [f"- FAILED {f}" for f in t["failed"]] \
                + [f"- ERROR {e}" for e in t["errors"]]
    t = doc.get("throughput")
    if t:
        lines += ["", f"## Fine-tuning throughput (pruned ResNet-56, batch {t['batch']}, {t['steps']} steps, "
                  f"{t['workers']} loader workers)", "", "| loop | img/s |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in t["rates"].items()]
    d = doc.get("decode")
    if d:
        lines += ["", f"## Large JPEGs: loader vs --device-decode ({d['images']} images of ~{d['mean_jpeg_kb']} KB at "
                  f"{d['size']} px, batch {d['batch']}, {d['steps']} steps, {d['workers']} loader workers)", "",
                  "| loop | img/s |", "|---|---|"]
        lines += [f"| {k} | {v:,.0f} |" for k, v in d["rates"].items()]
    f = doc.get("finetune")
    if f:
        final = f.get("final") or {}
        train = f.get("train") or {}
        planned = f" ({doc['finetune_epochs']} planned)" if doc.get("finetune_epochs") is not None else ""
        lines += ["", "## Distilled fine-tune", "",
                  f"{f.get('epochs') or 0:.2f} epochs{planned}, {f.get('steps')} steps, "
                  f"{train.get('images_per_second', 0):,.0f} img/s ({train.get('input')} path, "
                  f"{train.get('workers')} workers); final top-1 {final.get('top1', 0):.2f} %, best "
                  f"{(f.get('best') or {}).get('top1', 0):.2f} %.", ""]
        lines += [f"- epoch {e['epoch']}: top-1 {e['top1']:.2f} %" for e in f.get("evals", []) if e.get("top1") is not None]
    for name, bench in (doc.get("latency") or {}).items():
        timing = bench.get("timing") or {}
        lines += ["", f"## Latency: {name} ({timing.get('device_name')}, {timing.get('dtype')}, channels-last "
                  f"{timing.get('channels_last')}, cuDNN autotuning {timing.get('cudnn_benchmark')})", "",
                  "| model | MACs | batch | median ms | speed-up | top-1 % |", "|---|---|---|---|---|---|"]
        for m in bench["models"]:
            acc = (m.get("accuracy") or {}).get("top1")
            for batch, lat in m["latency_ms"].items():
                lines.append(f"| {m['path']} | {m['macs'] / 1e6:.1f} M | {batch} | {lat['median']:.3f} | "
                             f"{m['speedup'].get(batch, 0):.2f}x | {'' if acc is None else f'{acc:.2f}'} |")
    for name, t in (doc.get("latency_target") or {}).items():
        lat = t.get("latency") or {}
        attempts = ", ".join(f"{a['ratio']:.3f}" for a in lat.get("attempts", []))
        lines += ["", f"## prune --target-latency 0.5, ResNet-50 at {name} ({t.get('status')})", "",
                  f"{lat.get('runtime')} on {lat.get('device_name')}, {lat.get('dtype')}, channels-last "
                  f"{lat.get('channels_last')}: measured {lat.get('ratio')} of the original "
                  f"({lat.get('before_ms')} → {lat.get('after_ms')} ms; predicted {lat.get('predicted_ms')} ms); "
                  f"attempts {attempts}; MACs {t['macs'][0] / 1e9:.2f} → {t['macs'][1] / 1e9:.2f} G; "
                  f"warnings {t.get('warnings')}"]
    s = doc.get("scoring")
    if s and s.get("rows"):
        lines += ["", "## Scoring cost (`bench/criteria_speed.py`)", "", "    " + s["header"]] + [f"    {r}" for r in s["rows"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".gpu_check_data")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu_check_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="the CPU dry run: tiny budgets")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"the phases to run, in their fixed order (default all: {','.join(PHASES)})")
    ap.add_argument("--total", type=int, help="seconds for the whole check (default 480; --quick 3000)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--pruned", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase in ("throughput", "decode"):
        (throughput if args.phase == "throughput" else decode)(args)
        return 0
    needed = ["cifar10-jpeg-train.tar.gz", "cifar10-jpeg-test.tar.gz", "resnet56-cifar10jpeg.pt"]
    missing = [n for n in needed if not (args.data / n).is_file()]
    if missing:
        print(f"missing in {args.data}: {', '.join(missing)}; run bench/gpu_check_prepare.sh first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/chanprune-gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else Budget()
    if args.total is not None:
        budget.total = args.total
    chosen = {p.strip() for p in args.phases.split(",") if p.strip()}
    if chosen - set(PHASES):
        ap.error(f"unknown phase(s) {', '.join(sorted(chosen - set(PHASES)))}; choose from {', '.join(PHASES)}")
    check = Check(out=args.out, data=args.data, device=args.device, budget=budget, quick=args.quick)
    check.log.write_text("", encoding="utf-8")
    for name, phase in (("env", phase_env), ("tests", phase_tests)):
        if name in chosen:
            phase(check)
            check.write()
    pruned = finetuned = None
    needs_pruned = chosen & {"prune", "throughput", "finetune", "export"}
    if needs_pruned:  # the later phases need the pruned model: prune whenever one of them runs
        pruned = phase_prune(check, work)
        check.write()
    if pruned is not None:
        if "throughput" in chosen:
            phase_throughput(check, pruned, work)
            check.write()
        if chosen & {"finetune", "export"}:
            finetuned = phase_finetune(check, pruned, work)
            check.write()
        if finetuned is not None and "export" in chosen:
            phase_export(check, finetuned, work)
            check.write()
    elif needs_pruned:
        for name in ("throughput", "finetune", "export"):
            if name in chosen:
                check.skip(name, "no pruned model")
    if "latency" in chosen:
        model = finetuned or pruned
        pair = [str(check.data / "resnet56-cifar10jpeg.pt"), str(model)] if model is not None else []
        phase_latency(check, pair, work)
        check.write()
    if "latency_target" in chosen:
        phase_latency_target(check, work)
        check.write()
    if "scoring" in chosen:
        phase_scoring(check)
        check.write()
    if "decode" in chosen:
        phase_decode(check, work)
        check.write()
    if "suite" in chosen:
        phase_suite(check)
        check.write()
    print((args.out / "gpu_check.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Label-free distillation (`finetune --teacher` without labels): a model without class logits
(two dense heads returning a dict, a whole pickled model in its own container) and a classifier
given a folder of images without class folders recover from pruning by reproducing the teacher's
outputs; the teacher gap, feature matching with projections, resume, and the one-line refusals.

Tiny models and images throughout (8x8 digits, 16x16 random images), one thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from chanprune_cli.checkpoint import load_checkpoint
from chanprune_cli.cli import app
from chanprune_cli.data import open_dataset
from chanprune_cli.models import build_model, parse_arch
from chanprune_cli.train import TrainConfig, Trainer, load_train_state
from chanprune_cli.train.distill import inference_layers, output_leaves
from engine_helpers import randomize

runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def one_error(result: Any, *fragments: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(autouse=True)
def _quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("CHANPRUNE_NO_PROJECT_CONFIG", "1")
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TwoHeads(nn.Module):
    """A dense model with two outputs and no class logits (a detector's shape of output)."""

    def __init__(self, scores: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.boxes, self.scores = nn.Conv2d(16, 4, 1), nn.Conv2d(16, scores, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.body(self.stem(x))
        return {"boxes": self.boxes(y) * 10.0, "scores": self.scores(y)}  # heads of different scales


def calibrated(model: nn.Module, shape: tuple[int, int, int]) -> nn.Module:
    """Random weights with norm statistics measured on random images, as training leaves them."""
    randomize(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(16, *shape))
    return model.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 random 16x16 RGB images in one folder, no class folders."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(0)
    for i in range(64):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the original, pickled in a container of its own; the same pruned to half its channels)."""
    folder = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    original = folder / "dense.pt"
    torch.save({"model": calibrated(TwoHeads(), (3, 16, 16)), "train_args": {"imgsz": 16}, "note": "kept"}, original)
    pruned = folder / "dense.pruned.pt"
    result = cli("prune", original, "--trust-pickle", "--input-shape", "3,16,16", "--mean", "0,0,0", "--std", "1,1,1",
                 "--ratio", "0.5", "--out", pruned)
    assert result.exit_code == 0, result.output
    return original, pruned


def test_a_model_without_class_logits_recovers_without_labels_in_its_own_container(dense: tuple[Path, Path],
                                                                                    images: Path, tmp_path: Path) -> None:
    original, pruned = dense
    out, report = tmp_path / "dense.ft.pt", tmp_path / "ft.json"
    result = cli("finetune", pruned, "--trust-pickle", "--teacher", original, "--data", images, "--max-steps", "40",
                 "--batch-size", "16", "--lr", "0.02", "--grad-clip", "1", "--warmup", "2", "--eval-every", "20", "--out", out,
                 "--json", report)
    assert result.exit_code == 0, result.output
    assert "teacher gap" in result.output
    doc = json.loads(report.read_text())
    d = doc["distillation"]
    assert d["loss"] == "relative-l2" and d["leaves"] == ["boxes", "scores"] and d["features"] == []
    assert d["held_out"] == "data" and d["held_out_images"] == 6  # a tenth of the 64 images, set aside
    gap = doc["teacher_gap"]
    assert gap["after"] < 0.5 * gap["before"], gap
    assert [row["step"] for row in doc["evals"]] == [20, 40] and all("top1" not in row for row in doc["evals"])
    assert doc["evals"][-1]["teacher_gap"] == pytest.approx(gap["after"])

    # the container it came in: its other entries kept, the fine-tuned module in place
    raw = torch.load(out, weights_only=False)
    assert raw["note"] == "kept" and raw["train_args"] == {"imgsz": 16} and isinstance(raw["model"], TwoHeads)
    assert sum(p.numel() for p in raw["model"].parameters()) == doc["after"]["params"] < doc["before"]["params"] * 2
    record = json.loads(raw["chanprune"])
    assert [h["command"] for h in record["history"]] == ["prune", "finetune"]
    assert record["history"][-1]["distillation"]["leaves"] == ["boxes", "scores"]
    assert record["history"][-1]["teacher_gap"] == gap
    # and the gap is what it says: the mean over the held-out images of the leaves' mean ‖s − t‖ / ‖t‖
    held = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:6].tolist())
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(images / f"{i:02d}.png"), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for i in held])
    student, teacher = raw["model"].float(), torch.load(original, weights_only=False)["model"]
    with torch.no_grad(), inference_layers(student), inference_layers(teacher):
        s, t = student(x), teacher(x)
    assert [n for n, _ in output_leaves(s)] == ["boxes", "scores"]
    per_image = torch.stack([(s[k] - t[k]).flatten(1).norm(dim=1) / t[k].flatten(1).norm(dim=1) for k in s]).mean(0)
    assert per_image.mean().item() == pytest.approx(gap["after"], rel=1e-4)


def test_output_restricts_the_match_and_features_add_projected_leaves(dense: tuple[Path, Path], images: Path,
                                                                      tmp_path: Path) -> None:
    original, pruned = dense
    report = tmp_path / "ft.json"
    result = cli("finetune", pruned, "--trust-pickle", "--teacher", original, "--data", images, "--max-steps", "4",
                 "--batch-size", "16", "--output", "scores", "--distil-features", "stem", "--distil-features", "body",
                 "--out", tmp_path / "o.pt", "--json", report)
    assert result.exit_code == 0, result.output
    d = json.loads(report.read_text())["distillation"]
    assert d["leaves"] == ["scores"] and d["features"] == ["stem", "body"]
    assert d["projections"] == ["stem", "body"]  # pruning narrowed both: 1x1 projections onto the teacher's 16


def test_a_classifier_distils_from_a_folder_of_images_without_class_folders(tmp_path: Path) -> None:
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = build_model(parse_arch("digits_cnn"))
    data = open_dataset("digits:train", input_shape=shape, mean=(0.5,), std=(0.5,), train=True)
    Trainer(model, data, TrainConfig(max_steps=60, lr=0.05, progress=False, save_every=None),
            device=torch.device("cpu")).fit()
    teacher = tmp_path / "digits.pt"
    torch.save({"state_dict": model.state_dict(), "arch": "digits_cnn"}, teacher)
    flat = tmp_path / "flat"
    flat.mkdir()
    raw = open_dataset("digits:train", input_shape=shape, mean=(0.0,), std=(1.0,))
    for i in range(len(raw)):
        Image.fromarray((raw[i][0][0].clamp(0, 1) * 255).to(torch.uint8).numpy(), mode="L").save(flat / f"{i:04d}.png")
    pruned = tmp_path / "pruned.safetensors"
    norm = ("--mean", "0.5", "--std", "0.5")
    assert cli("prune", teacher, "--arch", "digits_cnn", *norm, "--ratio", "0.6", "--out", pruned).exit_code == 0
    report = tmp_path / "ft.json"
    result = cli("finetune", pruned, "--teacher", teacher, "--data", flat, "--val-data", "digits:test", *norm,
                 "--max-steps", "40", "--lr", "0.05", "--batch-size", "32", "--out", tmp_path / "ft.safetensors",
                 "--json", report)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["distillation"]["loss"] == "kd" and doc["distillation"]["held_out"] == "val-data"
    assert doc["final"]["top1"] > 80 and doc["teacher_gap"]["after"] < doc["teacher_gap"]["before"]
    assert "top1" in doc["evals"][-1] and "teacher_gap" in doc["evals"][-1]


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_result(dense: tuple[Path, Path], images: Path,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    original, pruned = dense
    args = ["finetune", pruned, "--trust-pickle", "--teacher", original, "--data", images, "--max-steps", "8",
            "--batch-size", "16", "--save-every", "3", "--distil-features", "body", "--device", "cpu"]
    assert cli(*args, "--out", tmp_path / "full.pt").exit_code == 0
    step = Trainer._train_step

    def interrupted(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = step(self, x, y)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    out = tmp_path / "cut.pt"
    assert cli(*args, "--out", out).exit_code == 130 and not out.exists()
    state = load_train_state(tmp_path / "cut.state.pt")
    assert state["step"] == 5 and state["distillation"]["describe"]["features"] == ["body"]
    monkeypatch.setattr(Trainer, "_train_step", step)
    resumed = cli(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_checkpoint(out, trust_pickle=True).model, load_checkpoint(tmp_path / "full.pt", trust_pickle=True).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_label_free_refusals_are_one_line_and_write_nothing(dense: tuple[Path, Path], images: Path,
                                                            tmp_path: Path) -> None:
    original, pruned = dense
    out = tmp_path / "x.pt"
    base = ["finetune", pruned, "--trust-pickle", "--data", images, "--max-steps", "1", "--batch-size", "16",
            "--out", out]
    one_error(cli(*base), "no (batch, classes) logits", "--teacher ORIGINAL")
    one_error(cli(*base, "--distil-features", "stem"), "--distil-features", "--teacher")
    one_error(cli(*base, "--teacher", original, "--distil-features", "neck*"), "neck*", "no module")
    one_error(cli(*base, "--teacher", original, "--schedule", "asfp", "--ratio", "0.3"), "--schedule")
    one_error(cli(*base, "--teacher", original, "--output", "masks"), "masks", "boxes", "scores")
    other = tmp_path / "other.pt"
    torch.save({"model": calibrated(TwoHeads(scores=5), (3, 16, 16))}, other)
    one_error(cli(*base, "--teacher", other), "scores", "leaf by leaf")
    # a classifier without a teacher still needs labelled images: a folder without class folders is refused
    one_error(cli("finetune", pruned.parent / "nothing", "--data", images), "does not exist")
    assert not out.exists() and not list(tmp_path.glob("x.*"))


class NeedsTargets(TwoHeads):
    def forward(self, x: torch.Tensor, targets: Any = None) -> Any:  # torchvision's detectors' way
        if self.training and targets is None:
            raise ValueError("In training mode, targets should be passed")
        return super().forward(x)


def test_a_training_forward_that_needs_targets_is_refused_in_one_line(tmp_path: Path, images: Path) -> None:
    model = calibrated(TwoHeads(), (3, 16, 16))
    model.__class__ = NeedsTargets
    torch.save(model, tmp_path / "needs.pt")
    one_error(cli("finetune", tmp_path / "needs.pt", "--trust-pickle", "--teacher", tmp_path / "needs.pt",
                  "--input-shape", "3,16,16", "--data", images, "--max-steps", "1", "--out", tmp_path / "y.pt"),
              "training mode", "targets")
    assert not (tmp_path / "y.pt").exists()


def test_the_loss_weighs_every_leaf_by_its_own_scale() -> None:
    from chanprune_cli.train.distill import Distillation

    d = Distillation(logits=False, temperature=4.0)
    t = {"big": torch.full((2, 3), 1000.0), "small": torch.full((2, 3), 0.001)}
    s = {"big": t["big"] * 1.1, "small": t["small"] * 1.1}  # each 10 % off
    loss = d.loss(nn.Identity(), nn.Identity(), s, t)
    assert float(loss) == pytest.approx(2 * 0.01, rel=1e-4)  # two leaves, each (0.1)² whatever its scale
    assert F.mse_loss(s["big"], t["big"]) > 1e3 * float(loss)


DRIVER = '''
import sys
import torch.distributed as dist
from chanprune_cli.cli import main

dist.init_process_group("gloo")
code = main(sys.argv[1:])
dist.destroy_process_group()
sys.exit(code)
'''


def test_two_gloo_processes_distil_as_one(dense: tuple[Path, Path], images: Path, tmp_path: Path) -> None:
    """Under torchrun the ranks split every global batch, DDP averages the model's gradients, the
    projections' are averaged by hand and each leaf's scale is the global batch's; the norms keep
    their statistics, so two processes train the single process's model (up to summation order)
    and measure the same gap on sharded images."""
    original, pruned = dense
    args = ["finetune", str(pruned), "--trust-pickle", "--teacher", str(original), "--data", str(images),
            "--max-steps", "4", "--batch-size", "16", "--distil-features", "body", "--threads", "1", "--device", "cpu"]
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("CHANPRUNE_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "driver.py", *args, "--out", "ddp.pt", "--json", "ddp.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert cli(*args, "--out", tmp_path / "one.pt", "--json", tmp_path / "one.json").exit_code == 0
    ddp, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ddp", "one"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["distillation"] == one["distillation"]
    for when in ("before", "after"):
        assert ddp["teacher_gap"][when] == pytest.approx(one["teacher_gap"][when], rel=1e-4), when
    a = load_checkpoint(tmp_path / "ddp.pt", trust_pickle=True).model.state_dict()
    b = load_checkpoint(tmp_path / "one.pt", trust_pickle=True).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)

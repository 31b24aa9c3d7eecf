"""The models people ship, through the real command line: a YOLO checkpoint as ultralytics writes it
(a whole pickled model), a torchvision detector, channels behind a LayerNorm (`--through-layernorm`),
a model with several outputs (`--output`), the input shape taken from `--data`, and the
normalisation a checkpoint records reused by every command.

Small models and inputs throughout; the YOLO case (a real yolov8n at 96 px) is the slow one.
"""

from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from chanprune_cli.checkpoint import load_checkpoint
from chanprune_cli.cli import app
from chanprune_cli.models import build_model, parse_arch
from engine_helpers import randomize

runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.stderr
    return result


def one_error(result: Any, *fragments: str) -> str:
    """The single `error:` line of a failed command (exit 2), containing every fragment."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def warnings_of(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


# --------------------------------------------------------------------------------------------
# YOLO: a whole pickled model, written back into its own container


def test_yolo_checkpoint_prunes_and_reloads_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """yolov8n (from ultralytics' bundled yaml: nothing downloaded) saved as ultralytics saves a
    trained model: {'model': DetectionModel in half precision, 'ema': None, 'train_args': ...}."""
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False)
    randomize(model)
    yolo_checkpoint = tmp_path / "yolov8n.pt"
    torch.save({"date": "2026-01-01", "version": "8.4.190", "epoch": -1, "best_fitness": None,
                "model": model.eval().half(), "ema": None, "updates": None, "optimizer": None,
                "train_args": {"model": "yolov8n.yaml", "imgsz": 96}, "train_metrics": {}}, yolo_checkpoint)
    json_path = yolo_checkpoint.with_name("prune.json")
    result = ok(cli("prune", yolo_checkpoint, "--trust-pickle", "--input-shape", "3,96,96", "--target-flops", "0.3",
                    "--json", json_path))
    doc = json.loads(json_path.read_text())
    out = Path("yolov8n.pruned.pt")  # the default: a pickle, in the working directory
    assert doc["output"] == str(out) and out.is_file()
    assert doc["achieved"]["macs_reduction_pct"] >= 15
    assert doc["verify"]["passed"] and doc["verify"]["approximate"] is False
    assert "verify     passed" in result.stdout

    # plain PyTorch: the same container, the pruned module in the original dtype, chanprune's record
    raw = torch.load(out, weights_only=False)
    assert raw["train_args"]["imgsz"] == 96 and raw["ema"] is None
    assert next(raw["model"].parameters()).dtype == torch.float16
    assert sum(p.numel() for p in raw["model"].parameters()) == doc["after"]["params"]
    record = json.loads(raw["chanprune"])
    assert record["input_shape"] == [3, 96, 96] and record["history"][-1]["command"] == "prune"

    # chanprune again (records the input shape) and ultralytics itself
    loaded = load_checkpoint(out, trust_pickle=True)
    assert loaded.arch is None and loaded.input_shape == (3, 96, 96) and len(loaded.plans) == 1
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ours = loaded.model.eval()(x)[0]
        theirs = raw["model"].float().eval()(x)[0]
    torch.testing.assert_close(ours, theirs)
    from ultralytics import YOLO

    yolo = YOLO(str(out))
    assert sum(p.numel() for p in yolo.model.parameters()) == doc["after"]["params"]

    # a detector cannot be fine-tuned with cross-entropy on labelled images: one line, before training
    line = one_error(cli("finetune", out, "--trust-pickle", "--data", "synthetic:3x96x96:3:8", "--max-steps", "1"),
                     "finetune trains classifiers")
    assert "--teacher ORIGINAL" in line and "2 outputs" in line
    assert not out.with_name("yolov8n.pruned.finetuned.pt").exists()

    # recovered without labels from the original on a folder of images: still ultralytics' own file
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    tuned_json = tmp_path / "finetune.json"
    ok(cli("finetune", out, "--trust-pickle", "--teacher", yolo_checkpoint, "--data", images, "--max-steps", "2",
           "--batch-size", "4", "--device", "cpu", "--json", tuned_json))
    tuned = json.loads(tuned_json.read_text())
    assert tuned["distillation"]["loss"] == "relative-l2" and tuned["distillation"]["held_out_images"] == 1
    assert tuned["teacher_gap"]["before"] > 0 and tuned["teacher_gap"]["after"] is not None
    tuned_out = Path(tuned["output"])
    raw = torch.load(tuned_out, weights_only=False)
    assert raw["train_args"]["imgsz"] == 96 and json.loads(raw["chanprune"])["history"][-1]["command"] == "finetune"
    assert sum(p.numel() for p in YOLO(str(tuned_out)).model.parameters()) == doc["after"]["params"]


def test_ultralytics_paths_the_trace_does_not_run_see_the_pruned_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    """ultralytics' exporter runs C2f.forward_split (split by `self.c`), its fusing rebuilds
    RepConv's identity branch from `self.c1`: both are set from the pruned layers."""
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.nn.modules import C2f, Conv, RepConv

    from chanprune_cli.engine.graph import build_graph
    from chanprune_cli.engine.surgery import prune_model, verify

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.c2f = Conv(3, 16, 3, 1), C2f(16, 16, n=1, shortcut=True)
            self.rep, self.head = RepConv(16, 16, 3, 1, bn=True), nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rep(self.c2f(self.stem(x))))

    model = randomize(Net())
    graph = build_graph(model, (3, 8, 8))
    plan = {g.id: g.prunable_classes[1::2] for g in graph.prunable_groups()}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert verify(model, graph, plan, pruned, (3, 8, 8)).passed
    assert pruned.c2f.c == pruned.c2f.cv1.conv.out_channels // 2 == 4 and pruned.rep.c1 == pruned.rep.c2 == 8
    with torch.no_grad():
        x = pruned.stem(torch.randn(2, 3, 8, 8))
        torch.testing.assert_close(pruned.c2f.forward_split(x), pruned.c2f(x))
        y = pruned.c2f(x)
        unfused = pruned.rep(y)
        pruned.rep.fuse_convs()
        torch.testing.assert_close(pruned.rep.forward_fuse(y), unfused, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# a torchvision detector (SSD) on a small backbone, from a state dict

TINY_SSD = '''
from collections import OrderedDict

from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.s1 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.out_channels = [32, 32]

    def forward(self, x):
        a = self.s1(self.stem(x))
        return OrderedDict([("0", a), ("1", self.s2(a))])


def make(num_classes=3):
    return SSD(Backbone(), DefaultBoxGenerator([[2], [2]]), (64, 64), num_classes, detections_per_img=10,
               topk_candidates=20)
'''


def test_torchvision_detector_from_a_state_dict(tmp_path: Path) -> None:
    Path("zoo_tiny_ssd.py").write_text(TINY_SSD)  # the working directory is importable (pkg.mod:factory)
    torch.manual_seed(0)
    model = build_model(parse_arch("zoo_tiny_ssd:make"))
    randomize(model)
    torch.save(model.state_dict(), tmp_path / "ssd.pt")
    out, json_path = tmp_path / "ssd.pruned.safetensors", tmp_path / "prune.json"
    ok(cli("prune", tmp_path / "ssd.pt", "--arch", "zoo_tiny_ssd:make", "--input-shape", "3,64,64", "--ratio", "0.5",
           "--out", out, "--json", json_path))
    doc = json.loads(json_path.read_text())
    assert doc["verify"]["passed"] and doc["achieved"]["macs_reduction_pct"] >= 15
    assert doc["macs_workload"] is None  # dense heads: the same work before and after

    loaded = load_checkpoint(out, arch="zoo_tiny_ssd:make")
    assert sum(p.numel() for p in loaded.model.parameters()) == doc["after"]["params"]
    with torch.no_grad():
        detections = loaded.model.eval()(torch.rand(2, 3, 64, 64))
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}


# --------------------------------------------------------------------------------------------
# MACs that depend on the input (a detector's proposals): said, and compared on one workload

ROWS_NET = '''
from torch import nn


class Net(nn.Module):
    """Its head runs on as many rows as `gate` finds positive: the work depends on the weights, as a
    detector's region proposals do, so the pruned model (whose stem lost channels) does other work."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 1, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        f = self.stem(x)
        rows = self.mid(f).permute(0, 2, 3, 1).flatten(0, 2)
        n = int((self.gate(f) > 0).sum()) + 1
        return self.head(rows[:n]).mean(0, keepdim=True)


def make():
    return Net()
'''


def test_macs_of_another_workload_are_said_and_recounted(tmp_path: Path) -> None:
    Path("zoo_rows_net.py").write_text(ROWS_NET)
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("zoo_rows_net:make")).state_dict(), tmp_path / "rows.pt")
    json_path = tmp_path / "prune.json"
    result = ok(cli("prune", tmp_path / "rows.pt", "--arch", "zoo_rows_net:make", "--input-shape", "3,8,8",
                    "--ratio", "0.5", "--out", tmp_path / "rows.pruned.safetensors", "--json", json_path))
    doc = json.loads(json_path.read_text())
    assert doc["verify"]["passed"]
    workload = doc["macs_workload"]
    layers = {r["name"]: r for r in doc["layers"]}
    # the head ran on other rows; the table, the totals and `achieved` count it on the original's rows:
    # its MACs before x kept inputs / inputs
    (factor,) = workload["changed_layers"].values()
    assert list(workload["changed_layers"]) == ["head"] and factor != pytest.approx(1.0, abs=0.01)
    head = layers["head"]
    expected_head = head["macs_before"] * head["in_after"] / head["in_before"]
    assert head["macs_after"] == round(expected_head)
    recounted = doc["before"]["macs"] - sum(
        r["macs_before"] * (1 - r["in_after"] * r["out_after"] / (r["in_before"] * r["out_before"]))
        for r in doc["layers"])
    assert workload["macs_after"] == round(recounted) == doc["after"]["macs"]
    assert doc["achieved"]["macs_reduction_pct"] == pytest.approx(workload["macs_reduction_pct"], abs=0.01)
    assert workload["own_macs_after"] == round(doc["after"]["macs"] - expected_head + expected_head * factor)
    assert workload["macs_reduction_pct"] == round(100 * (1 - workload["macs_after"] / doc["before"]["macs"]), 2)
    (line,) = warnings_of(result.stderr)
    assert "MACs depend on its input" in line and "head" in line and f"{workload['macs_after']:,}" in line
    history = load_checkpoint(tmp_path / "rows.pruned.safetensors", arch="zoo_rows_net:make").history[-1]
    assert history["macs_workload"] == workload


# --------------------------------------------------------------------------------------------
# --through-layernorm: approximate removals, said so everywhere

LN_NET = '''
from torch import nn


class Net(nn.Module):
    """A ConvNeXt-style block: the stem's channels are normalised together by a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x.mean((1, 2)))


def make():
    return Net()
'''


def test_through_layernorm_is_approximate_and_says_so(tmp_path: Path) -> None:
    Path("zoo_ln_net.py").write_text(LN_NET)
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("zoo_ln_net:make")).state_dict(), tmp_path / "ln.pt")
    common = ("--arch", "zoo_ln_net:make", "--input-shape", "3,8,8")

    # the default stays exact: the stem's channels are kept whole
    exact = tmp_path / "exact.json"
    result = ok(cli("prune", tmp_path / "ln.pt", *common, "--ratio", "0.5", "--out", tmp_path / "exact.safetensors",
                    "--json", exact))
    doc = json.loads(exact.read_text())
    assert doc["verify"] == {**doc["verify"], "passed": True, "approximate": False} and doc["approximations"] == []
    assert any("LayerNorm" in b["reason"] for b in doc["blocked"]) and warnings_of(result.stderr) == []
    stem_before = next(r for r in doc["layers"] if r["name"] == "stem")
    assert stem_before["out_after"] == 16

    # analyze and score see the same groups as prune --through-layernorm
    analyze_json = tmp_path / "analyze.json"
    ok(cli("analyze", tmp_path / "ln.pt", *common, "--through-layernorm", "--json", analyze_json))
    stem_group = next(g for g in json.loads(analyze_json.read_text())["groups"] if "stem" in g["members"])
    assert stem_group["prunable"] and stem_group["approximate"]
    scores = tmp_path / "ln.scores.safetensors"
    ok(cli("score", tmp_path / "ln.pt", *common, "--criterion", "l1", "--through-layernorm", "--out", scores))
    one_error(cli("prune", tmp_path / "ln.pt", *common, "--scores", scores, "--ratio", "0.5",
                  "--out", tmp_path / "no.safetensors"), "was scored with --through-layernorm")

    approx_json, out = tmp_path / "approx.json", tmp_path / "approx.safetensors"
    result = ok(cli("prune", tmp_path / "ln.pt", *common, "--scores", scores, "--through-layernorm", "--ratio", "0.5",
                    "--out", out, "--json", approx_json))
    doc = json.loads(approx_json.read_text())
    verify = doc["verify"]
    assert verify["approximate"] is True and doc["approximations"]
    assert verify["relative_diff"] == pytest.approx(verify["max_abs_diff"] / (verify["tolerance"] / 1e-5))
    assert verify["relative_diff"] > 1e-6  # a real deviation, measured
    assert next(r for r in doc["layers"] if r["name"] == "stem")["out_after"] == 8
    assert "approximate (LayerNorm statistics changed)" in result.stdout and "not a proof" in result.stdout
    (line,) = warnings_of(result.stderr)
    assert "approximate" in line and "fine-tune" in line and "BatchNorm" in line
    entry = load_checkpoint(out, arch="zoo_ln_net:make").history[-1]
    assert entry["through_layernorm"] is True and entry["approximate"] and entry["verify"]["approximate"] is True


# --------------------------------------------------------------------------------------------
# --output: the task output of a model with several

ONET = '''
import collections

import torch
from torch import nn


class ONet(nn.Module):
    """MTCNN's O-Net in miniature: bounding box, landmarks and face/no-face class."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.PReLU(8), nn.Conv2d(8, 16, 3),
                                  nn.BatchNorm2d(16), nn.PReLU(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 32), nn.PReLU(32))
        self.bbox = nn.Linear(32, 4)
        self.landmarks = nn.Linear(32, 10)
        self.cls = nn.Linear(32, 2)

    def forward(self, x):
        h = self.body(x)
        return self.bbox(h), self.landmarks(h), self.cls(h)


Outputs = collections.namedtuple("Outputs", ["aux", "logits"])


class Named(ONet):
    """Returns a namedtuple with a `logits` field, as torchvision's GoogLeNet does in training."""

    def forward(self, x):
        return Outputs(self.bbox(self.body(x)), self.cls(self.body(x)))


def make():
    return ONet()


def named():
    return Named()
'''

DATA = "synthetic:3x12x12:2:32"


@pytest.fixture()
def onet(tmp_path: Path) -> Path:
    Path("zoo_onet.py").write_text(ONET)
    torch.manual_seed(0)
    model = build_model(parse_arch("zoo_onet:make"))
    randomize(model)
    torch.save(model.state_dict(), tmp_path / "onet.pt")
    return tmp_path / "onet.pt"


def test_output_selection_is_required_used_and_recorded(onet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chanprune_cli.measure as measure

    arch = ("--arch", "zoo_onet:make", "--input-shape", "3,12,12")
    # several outputs and no choice: one line naming them and the option, never a guess
    line = one_error(cli("analyze", onet, *arch, "--data", DATA), "--output", "0: tensor 1x4", "1: tensor 1x10",
                     "2: tensor 1x2")
    assert "returns 3 outputs" in line
    one_error(cli("analyze", onet, *arch, "--data", DATA, "--output", "3"), "no part '3'", "2: tensor 1x2")

    seen: list[tuple[int, ...]] = []
    real = measure.logits_of

    def spy(output: Any, model: Any = None) -> torch.Tensor:
        logits = real(output, model)
        seen.append(tuple(logits.shape[1:]))
        return logits

    import chanprune_cli.recipes  # loads every module that binds logits_of
    import chanprune_cli.train.smoke  # noqa: F401

    for name, module in list(sys.modules.items()):  # every module that imported it
        if name.startswith("chanprune_cli") and getattr(module, "logits_of", None) is real:
            monkeypatch.setattr(module, "logits_of", spy)
    report = onet.with_name("analyze.json")
    ok(cli("analyze", onet, *arch, "--data", DATA, "--output", "2", "--json", report))
    assert json.loads(report.read_text())["accuracy"]["images"] == 32 and set(seen) == {(2,)}

    # a data-driven criterion scores the chosen output; the pruned file records the choice
    seen.clear()
    pruned = onet.with_name("onet.pruned.safetensors")
    ok(cli("prune", onet, *arch, "--criterion", "taylor", "--data", DATA, "--output", "2", "--ratio", "0.25",
           "--out", pruned))
    assert seen and set(seen) == {(2,)}
    assert load_checkpoint(pruned, arch="zoo_onet:make").meta["task_output"] == "2"

    # later commands reuse it: accuracy and fine-tuning without --output
    seen.clear()
    ok(cli("analyze", pruned, "--arch", "zoo_onet:make", "--data", DATA))
    finetuned = onet.with_name("onet.ft.safetensors")
    ok(cli("finetune", pruned, "--arch", "zoo_onet:make", "--data", DATA, "--max-steps", "2", "--batch-size", "8",
           "--out", finetuned))
    assert set(seen) == {(2,)}
    assert load_checkpoint(finetuned, arch="zoo_onet:make").meta["task_output"] == "2"


def test_a_field_named_logits_is_the_task_output(tmp_path: Path) -> None:
    Path("zoo_onet.py").write_text(ONET)
    torch.save(build_model(parse_arch("zoo_onet:named")).state_dict(), tmp_path / "named.pt")
    report = tmp_path / "analyze.json"
    ok(cli("analyze", tmp_path / "named.pt", "--arch", "zoo_onet:named", "--input-shape", "3,12,12", "--data", DATA,
           "--json", report))
    assert json.loads(report.read_text())["accuracy"]["images"] == 32


# --------------------------------------------------------------------------------------------
# the input shape from --data

MNIST_NET = '''
from torch import nn


def make():  # 28x28 grayscale in, 10 classes out; nothing says so but the data
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
'''


def write_mnist(folder: Path, n: int = 16) -> Path:
    """MNIST's IDX files (t10k split) holding `n` random 28x28 digits."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    (folder / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.numpy().tobytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.numpy().tobytes())
    return folder


def test_input_shape_comes_from_the_data(tmp_path: Path) -> None:
    Path("zoo_mnist_net.py").write_text(MNIST_NET)
    torch.save(build_model(parse_arch("zoo_mnist_net:make")).state_dict(), tmp_path / "mnist.pt")
    data = write_mnist(tmp_path / "mnist")
    arch = ("--arch", "zoo_mnist_net:make")

    line = one_error(cli("analyze", tmp_path / "mnist.pt", *arch), "--input-shape C,H,W", "--data")
    assert "224" not in line  # no shape this model does not take is suggested

    report = tmp_path / "analyze.json"
    ok(cli("analyze", tmp_path / "mnist.pt", *arch, "--data", data, "--json", report))
    doc = json.loads(report.read_text())
    assert doc["input_shape"] == [1, 28, 28] and doc["accuracy"]["images"] == 16

    out = tmp_path / "mnist.pruned.safetensors"
    ok(cli("prune", tmp_path / "mnist.pt", *arch, "--criterion", "taylor", "--data", data, "--ratio", "0.5",
           "--out", out))
    assert load_checkpoint(out, arch="zoo_mnist_net:make").input_shape == (1, 28, 28)  # later commands need nothing


# --------------------------------------------------------------------------------------------
# recorded normalisation and whole pickled models through every command


def test_recorded_normalisation_is_reused_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chanprune_cli.recipes.finetune as finetune_recipe
    import chanprune_cli.recipes.steps as steps

    torch.manual_seed(0)
    torch.save(build_model(parse_arch("digits_cnn")).state_dict(), tmp_path / "d.pt")
    pruned = tmp_path / "d.pruned.safetensors"
    ok(cli("prune", tmp_path / "d.pt", "--arch", "digits_cnn", "--ratio", "0.5", "--mean", "0.3", "--std", "0.2",
           "--out", pruned))

    used: list[tuple[Any, Any]] = []

    def spying(real: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            used.append((kwargs.get("mean"), kwargs.get("std")))
            return real(*args, **kwargs)
        return spy

    monkeypatch.setattr(steps, "make_loader", spying(steps.make_loader))
    monkeypatch.setattr(finetune_recipe, "open_dataset", spying(finetune_recipe.open_dataset))
    ok(cli("analyze", pruned, "--data", "digits:test", "--calib-batches", "1"))
    ok(cli("bench", tmp_path / "d.pt", pruned, "--arch", "digits_cnn", "--data", "digits:test", "--calib-batches", "1",
           "--batch-sizes", "1", "--warmup", "0", "--repeats", "1"))
    kept = tmp_path / "kept.safetensors"
    ok(cli("finetune", pruned, "--data", "digits:train", "--max-steps", "1", "--batch-size", "8", "--out", kept))
    assert used and set(used) == {((0.3,), (0.2,))}
    assert load_checkpoint(kept).meta["normalization"] == {"mean": [0.3], "std": [0.2]}

    replaced = tmp_path / "replaced.safetensors"  # explicit values win and are what the new file records
    ok(cli("finetune", pruned, "--data", "digits:train", "--max-steps", "1", "--batch-size", "8", "--mean", "0.5",
           "--std", "0.25", "--out", replaced))
    assert load_checkpoint(replaced).meta["normalization"] == {"mean": [0.5], "std": [0.25]}

    other = tmp_path / "other.safetensors"
    ok(cli("prune", tmp_path / "d.pt", "--arch", "digits_cnn", "--ratio", "0.25", "--mean", "0.1", "--std", "0.2",
           "--out", other))
    one_error(cli("bench", pruned, other, "--data", "digits:test", "--batch-sizes", "1", "--repeats", "1"),
              "record different normalisation", "pass --mean and --std")


def test_whole_pickled_classifier_through_every_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("digits_cnn")), tmp_path / "whole.pt")  # torch.save(model)
    trust = ("--trust-pickle",)
    one_error(cli("prune", tmp_path / "whole.pt", *trust, "--ratio", "0.5"), "--input-shape C,H,W")
    ok(cli("prune", tmp_path / "whole.pt", *trust, "--input-shape", "1,8,8", "--ratio", "0.5"))
    pruned = Path("whole.pruned.pt")  # the default: the working directory
    raw = torch.load(pruned, weights_only=False)
    assert isinstance(raw["model"], nn.Module) and json.loads(raw["chanprune"])["input_shape"] == [1, 8, 8]

    # the recorded input shape serves every later command; the fine-tuned model stays a pickle
    ok(cli("finetune", pruned, *trust, "--data", "digits:train", "--val-data", "digits:test", "--max-steps", "2",
           "--batch-size", "8", "--eval-every", "1", "--val-images", "16"))
    finetuned = Path("whole.pruned.finetuned.pt")
    loaded = load_checkpoint(finetuned, trust_pickle=True)
    assert loaded.origin is not None and [h["command"] for h in loaded.history] == ["prune", "finetune"]
    assert Path("whole.pruned.finetuned.best.pt").is_file()
    ok(cli("bench", tmp_path / "whole.pt", finetuned, *trust, "--input-shape", "1,8,8", "--batch-sizes", "1",
           "--warmup", "0", "--repeats", "1"))
    ok(cli("export", finetuned, *trust, "--out", tmp_path / "m.onnx"))
    one_error(cli("export", finetuned, *trust, "--out", tmp_path / "m.safetensors"), "onnx or torchscript")


def test_help_names_the_signal_exit_codes() -> None:
    result = ok(cli("--help"))
    assert "130" in result.stdout and "143" in result.stdout

"""CNNs that do not take RGB images, through the real command line: a torchcrepe-like pitch CNN
(Conv1d layers on N×1024 audio frames, 360 sigmoid outputs) and a two-channel Conv1d classifier
(N×2×256) are analysed, pruned, fine-tuned (with the loss their outputs call for: `--loss`),
exported and benchmarked with their own input shapes (`--input-shape L` and `C,L`), on NumPy arrays
used as given: no 0-255 scaling or warning, no image statistics, no resizing, and the normalisation
used recorded in the JSON.

The models are written to the test's working directory and imported as `pkg.mod:factory`; nothing
is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.data import open_dataset
from chanprune_cli.errors import UserError
from chanprune_cli.train.losses import TaskLoss, choose_loss

runner = CliRunner()

PITCH_NET = '''
import torch
from torch import nn


class PitchNet(nn.Module):
    """Frames (N, 1024) -> 360 pitch-bin probabilities, as torchcrepe (which is larger)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 16, 64, stride=4, padding=30), nn.BatchNorm1d(16)
        self.conv2, self.bn2 = nn.Conv1d(16, 32, 16, padding=8), nn.BatchNorm1d(32)
        self.conv3, self.bn3 = nn.Conv1d(32, 32, 16, padding=8), nn.BatchNorm1d(32)
        self.pool = nn.MaxPool1d(4)
        self.classifier = nn.Linear(32 * 4, 360)

    def forward(self, x):
        x = x.unsqueeze(1)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.pool(torch.relu(bn(conv(x))))
        return torch.sigmoid(self.classifier(x.flatten(1)))


class TwoChannelNet(nn.Module):
    """(N, 2, 256) sensor series -> 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 16, 9, padding=4), nn.BatchNorm1d(16)
        self.conv2, self.bn2 = nn.Conv1d(16, 16, 9, padding=4), nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(-1))


def pitch():
    return PitchNet()


def two_channel():
    return TwoChannelNet()
'''


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr, result.stderr
    return result


def error_line(result: Any, fragment: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    return lines[0]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Both models' weights, with frames and series to run them on, in the working directory."""
    Path("signal_nets.py").write_text(PITCH_NET)
    namespace: dict[str, Any] = {}
    exec(PITCH_NET, namespace)
    torch.manual_seed(0)
    torch.save(namespace["pitch"]().state_dict(), "pitch.pt")
    torch.save(namespace["two_channel"]().state_dict(), "series.pt")
    rng = np.random.default_rng(0)
    # audio frames: a tone of one of 8 pitches each (pitch bin 45 k), with noise; floats far beyond
    # 0-1 (they are not images)
    pitch = np.arange(64) % 8
    t = np.arange(1024) / 1024
    tones = 3 * np.sin(2 * np.pi * (8 + 6 * pitch[:, None]) * t + rng.uniform(0, 6.3, (64, 1)))
    np.savez("frames.npz", x=(tones + 0.3 * rng.standard_normal((64, 1024))).astype(np.float32), y=45 * pitch)
    np.savez("series.npz", x=rng.standard_normal((40, 2, 256)).astype(np.float32), y=np.arange(40) % 4)
    return {"pitch": Path("pitch.pt"), "series": Path("series.pt")}


def test_a_pitch_cnn_on_audio_frames_prunes_exports_and_benches(models: dict[str, Path]) -> None:
    arch = ("--arch", "signal_nets:pitch")
    analyzed = json.loads(ok(cli("analyze", "pitch.pt", *arch, "--data", "frames.npz", "--json", "-")).stdout)
    assert analyzed["input_shape"] == [1024]  # taken from the frames: N×1024 arrays take --input-shape 1024
    assert analyzed["accuracy"]["images"] == 64 and analyzed["warnings"] == []
    assert analyzed["accuracy"]["normalization"] == {"mean": [0.0], "std": [1.0]}  # used as given
    assert [g["prunable"] for g in analyzed["groups"]].count(True) == 3

    pruned = json.loads(ok(cli("prune", "pitch.pt", *arch, "--input-shape", "1024", "--ratio", "0.5",
                               "--data", "frames.npz", "--json", "-")).stdout)
    assert pruned["verify"]["passed"] and pruned["after"]["macs"] < pruned["before"]["macs"] / 2
    out = Path("pitch.pruned.safetensors")
    assert out.is_file()

    # the pruned file records its input shape: nothing to repeat
    again = json.loads(ok(cli("analyze", out, *arch, "--json", "-")).stdout)
    assert again["input_shape"] == [1024] and again["model"]["macs"] == pruned["after"]["macs"]

    # sigmoid outputs: binary cross-entropy, said (cross-entropy over them would stay at ln 360)
    tuned = cli("finetune", out, *arch, "--data", "frames.npz", "--val-data", "frames.npz", "--epochs", "10",
                "--batch-size", "16", "--lr", "2", "--threads", "1", "--json", "ft.json")
    assert tuned.exit_code == 0, tuned.output
    assert ("loss: bce on probabilities, because the outputs lie in [0, 1] without summing to 1 (a sigmoid: each "
            "output its own yes/no); --loss ce|bce|mse to choose") in " ".join(tuned.stderr.split())
    doc = json.loads(Path("ft.json").read_text())
    assert doc["loss"]["name"] == "bce" and doc["config"]["loss"] == "auto"
    first, last = doc["evals"][0], doc["evals"][-1]
    assert last["loss"] < 0.5 * first["loss"] and last["top1"] > 40, doc["evals"]  # it learns (chance: 12.5 %)
    tuned_out = Path("pitch.pruned.finetuned.safetensors")
    assert json.loads(ok(cli("analyze", tuned_out, *arch, "--json", "-")).stdout)["input_shape"] == [1024]

    exported = json.loads(ok(cli("export", tuned_out, *arch, "--out", "pitch.onnx", "--json", "-")).stdout)
    assert exported["input_shape"] == [1024] and Path("pitch.onnx").is_file()
    benched = cli("bench", "pitch.pt", out, *arch, "--batch-sizes", "1", "--warmup", "0", "--repeats", "2",
                  "--threads", "1", "--data", "frames.npz", "--json", "-")
    assert benched.exit_code == 0, benched.output  # (timings on a busy machine may warn)
    bench = json.loads(benched.stdout)
    assert [m["input_shape"] for m in bench["models"]] == [[1024], [1024]]
    assert bench["data"]["normalization"] == {"mean": [0.0], "std": [1.0]}


def test_a_two_channel_series_model_with_its_normalisation(models: dict[str, Path]) -> None:
    arch = ("--arch", "signal_nets:two_channel", "--input-shape", "2,256")
    analyzed = json.loads(ok(cli("analyze", "series.pt", *arch, "--data", "series.npz", "--mean", "0.5,-1",
                                 "--std", "2", "--json", "-")).stdout)
    assert analyzed["input_shape"] == [2, 256]
    assert analyzed["accuracy"]["normalization"] == {"mean": [0.5, -1.0], "std": [2.0, 2.0]}
    ok(cli("prune", "series.pt", *arch, "--ratio", "0.5", "--data", "series.npz", "--mean", "0.5,-1", "--std", "2"))
    again = json.loads(ok(cli("analyze", "series.pruned.safetensors", "--arch", "signal_nets:two_channel",
                              "--data", "series.npz", "--json", "-")).stdout)
    # the recorded shape and normalisation are used
    assert again["input_shape"] == [2, 256]
    assert again["accuracy"]["normalization"] == {"mean": [0.5, -1.0], "std": [2.0, 2.0]}


def test_signals_are_used_as_given() -> None:
    rng = np.random.default_rng(0)
    np.savez("loud.npz", x=(200 * rng.standard_normal((8, 1, 64))).astype(np.float32), y=np.arange(8))
    data = open_dataset("loud.npz", input_shape=(64,))
    x, y = data[3]
    assert x.shape == (64,) and y == 3 and (data.mean, data.std) == ((0.0,), (1.0,))
    assert torch.equal(x, torch.from_numpy(np.load("loud.npz")["x"][3, 0]))  # not scaled, not normalised
    train = open_dataset("loud.npz", input_shape=(1, 64), train=True, mean="1", std="4")
    assert torch.equal(train[3][0], (torch.from_numpy(np.load("loud.npz")["x"][3]) - 1) / 4)  # never augmented


def test_signal_mistakes_are_one_line_errors(models: dict[str, Path]) -> None:
    arch = ("--arch", "signal_nets:pitch")
    error_line(cli("analyze", "pitch.pt", *arch, "--input-shape", "1,1024", "--data", "frames.npz"),
               "the model does not run on inputs of shape 1,1024")
    line = error_line(cli("analyze", "pitch.pt", *arch, "--input-shape", "1024", "--data", "digits:test"), "holds images")
    assert "NumPy arrays (.npz/.npy, N×L or N×C×L)" in line
    np.savez("short.npz", x=np.zeros((4, 512), np.float32), y=np.arange(4))
    line = error_line(cli("analyze", "pitch.pt", *arch, "--input-shape", "1024", "--data", "short.npz"),
                      "holds signals of shape 512 but the model takes 1024")
    assert "never resized" in line
    error_line(cli("analyze", "pitch.pt", *arch, "--input-shape", "1024,1,1,1"), "expected C,H,W (images), C,L or L")


def test_the_loss_follows_the_outputs() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0]])
    labels = torch.tensor([0, 1])
    assert choose_loss("auto", logits) == TaskLoss("ce", False, "the outputs are logits")
    softmax = choose_loss("auto", logits.softmax(-1))
    assert (softmax.name, softmax.probabilities) == ("ce", True)
    assert softmax(logits.softmax(-1), labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    sigmoid = choose_loss("auto", logits.sigmoid())
    assert (sigmoid.name, sigmoid.probabilities) == ("bce", True)
    target = F.one_hot(labels, 3).float()
    assert sigmoid(logits.sigmoid(), labels).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-5)
    assert choose_loss("ce", logits.sigmoid()) == TaskLoss("ce", False, "--loss")  # as asked: the outputs as logits
    mse = choose_loss("mse", logits)
    assert mse(logits, labels).item() == pytest.approx(F.mse_loss(logits, target).item())
    with pytest.raises(UserError, match="--loss must be one of auto, ce, bce, mse"):
        choose_loss("l1", logits)

"""`chanprune prune` and latency: `--target-latency` (a fraction or a time), every plan timed against
the original on the latency target ("never slower"), `--round-to auto`, `--plot`, config keys, and
its bad input. The timing is replaced by deterministic fakes (a layer's time is its MACs, a model's
its MACs plus an overhead), so every assertion is about behaviour, not this machine's speed."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import chanprune_cli.recipes.prune as prune_recipe
from chanprune_cli.cli import app
from chanprune_cli.deploy.runtimes import LatencyTarget
from chanprune_cli.latency import table as tables_module
from chanprune_cli.latency.correction import PairTiming
from chanprune_cli.latency.table import LayerSpec
from chanprune_cli.measure import count_macs
from chanprune_cli.models import build_model, parse_arch

ARCH = ("--arch", "cifar_resnet20")
SHAPE = (3, 32, 32)
OVERHEAD = 0.3  # of the original's time, a fake runtime's fixed cost the tables do not see
runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def _macs_ms(spec: LayerSpec, units: Mapping[str, int], target: LatencyTarget) -> float:
    cin, cout, groups = spec.shape_at(units)
    positions = 1
    for d in (*spec.size, *spec.kernel):
        positions *= d
    return target.batch * positions * cin * cout / groups * 1e-7  # 1 ms per 10 M MACs, as FakeRuntime


class FakeRuntime:
    """A runtime whose time is a model's MACs (1 ms per 10 M) plus an overhead: pruning saves less
    than the MACs alone say, as on real hardware. `slow_pruned` makes every pruned model slower."""

    slow_pruned = False

    def __init__(self, original: nn.Module, input_shape: Sequence[int], target: LatencyTarget, timing: Any = None) -> None:
        self.shape, self.target = tuple(input_shape), target
        self.before = target.batch * count_macs(original, self.shape) * 1e-7
        self.timed: list[float] = []

    def ms(self, model: nn.Module) -> float:
        return OVERHEAD * self.before + self.target.batch * count_macs(model, self.shape) * 1e-7

    def __call__(self, candidate: nn.Module) -> PairTiming:
        after = self.ms(candidate) * (3.0 if self.slow_pruned else 1.0)
        self.timed.append(after / self.ms_original())
        return PairTiming(self.ms_original(), after, after / self.ms_original())

    def ms_original(self) -> float:
        return (1 + OVERHEAD) * self.before


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeRuntime]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tables_module, "_time_points", lambda spec, points, target: [_macs_ms(spec, u, target) for u in points])
    # no staircase: ResNet-20's 16-channel layers would otherwise have two widths (8 and 16) to choose from
    monkeypatch.setattr(tables_module.LayerSpec, "align", lambda self, axis, favoured: 1)

    def whole_models(input_shape: Sequence[int], target: LatencyTarget) -> Any:
        return lambda models: [FakeRuntime(models[0], input_shape, target).ms(m) for m in models]

    monkeypatch.setattr(tables_module, "_model_timer", whole_models)
    monkeypatch.setattr(prune_recipe, "PairTimer", FakeRuntime)
    FakeRuntime.slow_pruned = False
    return FakeRuntime


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("latency") / "r20.pt"
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), path)
    return path


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_target_latency_is_met_as_measured(fake_timing: type[FakeRuntime], ckpt: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "p.safetensors", tmp_path / "p.json"
    result = cli("prune", ckpt, *ARCH, "--target-latency", "0.6", "--device", "cpu", "--out", out, "--json", report)
    assert result.exit_code == 0, result.stderr
    doc = _json(report)
    latency = doc["latency"]
    assert doc["requested"] == {"target_latency": 0.6}
    assert latency["runtime"] == "torch" and latency["device"] == "cpu" and latency["batch"] == 1
    assert abs(latency["ratio"] - 0.6) <= 0.05 and latency["target_ratio"] == 0.6
    assert latency["predicted_ms"] > 0 and latency["attempts"] and latency["tables"]["layers"] == 20
    assert doc["verify"]["passed"] and out.is_file() and doc["warnings"] == []
    assert "latency attempt 1:" in result.stderr
    from chanprune_cli.checkpoint import load_checkpoint

    history = load_checkpoint(str(out)).history[-1]
    assert history["requested"] == {"target_latency": 0.6} and history["latency"]["target_ratio"] == 0.6
    again = cli("prune", ckpt, *ARCH, "--target-latency", "0.6", "--device", "cpu", "--dry-run", "--json", tmp_path / "q.json")
    assert again.exit_code == 0, again.stderr
    tables = _json(tmp_path / "q.json")["latency"]["tables"]
    assert tables["timed"] == 0 and tables["cached"] == 20  # measured once, read from the cache since


def test_a_time_target_is_a_fraction_of_the_measured_original(fake_timing: type[FakeRuntime], ckpt: Path,
                                                              tmp_path: Path) -> None:
    original = FakeRuntime(build_model(parse_arch("cifar_resnet20")), SHAPE, LatencyTarget()).ms_original()
    report = tmp_path / "p.json"
    result = cli("prune", ckpt, *ARCH, "--target-latency", f"{0.7 * original:.6f}ms", "--device", "cpu", "--dry-run",
                 "--json", report)
    assert result.exit_code == 0, result.stderr
    doc = _json(report)
    assert doc["requested"] == {"target_latency_ms": pytest.approx(0.7 * original, rel=1e-5)}
    assert doc["latency"]["target_ratio"] == pytest.approx(0.7, rel=1e-4)
    assert abs(doc["latency"]["ratio"] - 0.7) <= 0.05


def test_every_plan_is_timed_and_a_slower_one_is_said(fake_timing: type[FakeRuntime], ckpt: Path, tmp_path: Path) -> None:
    report = tmp_path / "p.json"
    fine = cli("prune", ckpt, *ARCH, "--ratio", "0.5", "--device", "cpu", "--dry-run", "--json", report)
    assert fine.exit_code == 0, fine.stderr
    latency = _json(report)["latency"]
    assert latency["ratio"] < 1 and latency["predicted_ms"] is None and "tables" not in latency
    assert _json(report)["warnings"] == []
    fake_timing.slow_pruned = True
    slow = cli("prune", ckpt, *ARCH, "--target-flops", "0.3", "--device", "cpu", "--dry-run", "--json", report, "--force")
    assert slow.exit_code == 0, slow.stderr
    [line] = _json(report)["warnings"]
    assert line.startswith("the pruned model is slower than the original on torch (cpu, batch 1): ")
    assert f"warning: {line}" in " ".join(slow.stderr.split())


def test_round_to_auto_takes_the_targets_multiple(fake_timing: type[FakeRuntime], ckpt: Path, tmp_path: Path) -> None:
    report = tmp_path / "p.json"
    result = cli("prune", ckpt, *ARCH, "--ratio", "0.3", "--round-to", "auto", "--device", "cpu", "--dry-run",
                 "--json", report)
    assert result.exit_code == 0, result.stderr
    multiple = LatencyTarget().favoured_multiple()
    # the blocks' inner widths are groups of their own (the residual stream's group spans stages)
    inner = {r["out_after"] for r in _json(report)["layers"] if re.fullmatch(r"layer\d\.\d\.conv1", r["name"])}
    assert inner and all(w % multiple == 0 for w in inner) and inner != {16, 32, 64}


def test_plot_draws_the_staircases(fake_timing: type[FakeRuntime], ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "stairs.png"
    result = cli("prune", ckpt, *ARCH, "--ratio", "0.5", "--device", "cpu", "--dry-run", "--plot", plot, "--json",
                 tmp_path / "p.json")
    assert result.exit_code == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _json(tmp_path / "p.json")["latency"]["predicted_ms"] > 0  # the tables were built for the plot


def test_config_keys_reach_the_latency_options(fake_timing: type[FakeRuntime], ckpt: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chanprune.toml").write_text('[prune]\ntarget-latency = "0.65"\nlatency-batch = 2\n')
    result = cli("prune", ckpt, *ARCH, "--device", "cpu", "--dry-run", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.stderr
    doc = _json(tmp_path / "p.json")
    assert doc["requested"] == {"target_latency": 0.65} and doc["latency"]["batch"] == 2
    flagged = cli("prune", ckpt, *ARCH, "--ratio", "0.5", "--device", "cpu", "--dry-run", "--json", tmp_path / "q.json")
    assert flagged.exit_code == 0, flagged.stderr  # a --ratio flag beats the file's target
    assert _json(tmp_path / "q.json")["requested"] == {"ratio": 0.5}


class FixedBatch(nn.Module):
    """Runs batches of 1 or 2 only (it reshapes to a batch size it knows)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError(f"batch {x.shape[0]} is larger than this model takes")
        return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], -1))


def fixed_batch() -> nn.Module:
    return FixedBatch()


@pytest.mark.parametrize(("extra", "message"), [
    (("--target-latency", "0"), "--target-latency must be a fraction of the original's latency between 0 and 1"),
    (("--target-latency", "1"), "--target-latency must be a fraction"),
    (("--target-latency", "fast"), "or a time such as 12ms"),
    (("--target-latency", "0ms"), "a time must be positive"),
    (("--target-latency", "0.5", "--ratio", "0.5"), "give exactly one of --ratio"),
    (("--target-latency", "0.5", "--latency-runtime", "tensorrt"), "--latency-runtime tensorrt needs a CUDA GPU"),
    (("--target-latency", "0.5", "--latency-runtime", "tflite"), "--latency-runtime must be one of torch, onnxruntime"),
    (("--ratio", "0.5", "--round-to", "eight"), "neither a whole number of channels of at least 1 nor auto"),
    (("--target-latency", "0.5", "--cost-exponent", "1"), "drop --cost-exponent"),
])
def test_bad_latency_input_fails_before_anything_slow(ckpt: Path, tmp_path: Path, extra: tuple[str, ...], message: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tables(*args: object, **kwargs: object) -> None:
        raise AssertionError("latency tables were built for bad input")

    monkeypatch.setattr(prune_recipe, "build_tables", no_tables)
    out = tmp_path / "out"
    out.mkdir()
    result = cli("prune", ckpt, *ARCH, *extra, "--device", "cpu", "--out", out / "p.safetensors")
    assert result.exit_code == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    assert list(out.iterdir()) == []


def test_a_latency_batch_the_model_cannot_take(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = tmp_path / "fixed.pt"
    torch.save(FixedBatch().state_dict(), path)
    result = cli("prune", path, "--arch", "test_latency_prune:fixed_batch", "--input-shape", "3,8,8", "--ratio", "0.5",
                 "--latency-batch", "4", "--device", "cpu", "--out", tmp_path / "p.safetensors")
    assert result.exit_code == 2, result.stderr
    assert "--latency-batch 4: the model cannot run a batch of 4" in " ".join(result.stderr.split())
    assert not (tmp_path / "p.safetensors").exists()


def test_a_runtime_that_is_not_installed(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chanprune_cli.deploy import runtimes

    monkeypatch.setattr(runtimes, "_missing", lambda name: name in ("onnxruntime", "onnx"))
    result = cli("prune", ckpt, *ARCH, "--target-latency", "0.5", "--latency-runtime", "onnxruntime", "--device", "cpu",
                 "--out", tmp_path / "p.safetensors")
    assert result.exit_code == 2, result.stderr
    assert "--latency-runtime onnxruntime needs onnx and onnxruntime, which are not installed" in " ".join(result.stderr.split())


def test_a_target_the_model_cannot_reach_writes_nothing(fake_timing: type[FakeRuntime], ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    result = cli("prune", ckpt, *ARCH, "--target-latency", "0.2", "--min-keep", "0.9", "--device", "cpu", "--out", out)
    assert result.exit_code == 2, result.stderr
    line = " ".join(result.stderr.split())
    assert "cannot get below" in line and "--min-keep 0.9" in line
    assert not out.exists()

"""The recipes from Python (`from chanprune_cli import prune_checkpoint`, ...): each does what its
command does, on the bundled 8×8 digits with `digits_cnn`, and `chanprune prune` writes the very
same bytes as `prune_checkpoint` with the same arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import chanprune_cli
from chanprune_cli import (
    FinetuneOptions,
    analyze_checkpoint,
    bench_checkpoints,
    export_checkpoint,
    finetune_checkpoint,
    prune_checkpoint,
    score_checkpoint,
)
from chanprune_cli.checkpoint import load_checkpoint
from chanprune_cli.cli import app
from chanprune_cli.errors import UserError
from chanprune_cli.models import build_model, parse_arch
from chanprune_cli.train import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained digits_cnn state dict (needs --arch digits_cnn)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save(build_model(parse_arch("digits_cnn")).state_dict(), path)
    return path


def test_recipes_load_lazily_from_the_package() -> None:
    from chanprune_cli import recipes

    assert sorted(chanprune_cli._RECIPES) == sorted(recipes.__all__)
    assert chanprune_cli.prune_checkpoint is recipes.prune_checkpoint
    # the command line's help must not pay for torch
    code = "import sys, chanprune_cli, chanprune_cli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_prune_checkpoint_is_byte_identical_to_the_command(ckpt: Path, tmp_path: Path) -> None:
    args: dict[str, Any] = {"arch": "digits_cnn", "criterion": "taylor", "data": "digits:train", "calib_batches": 2,
                            "batch_size": 32, "target_flops": 0.4, "rounds": 2, "recalibrate_bn": 2,
                            "val_data": "digits:test", "round_to": 2,
                            "device": "cpu"}  # bitwise equal on the CPU; taylor's backward on CUDA is not
    result = prune_checkpoint(str(ckpt), out=str(tmp_path / "python.safetensors"), **args)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    run = CliRunner().invoke(app, ["prune", str(ckpt), *flags, "--out", str(tmp_path / "cli.safetensors"),
                                   "--json", str(tmp_path / "cli.json")], env={"CHANPRUNE_DEBUG": None})
    assert run.exit_code == 0, run.output
    assert (tmp_path / "python.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()

    assert result.verify is not None and result.verify["passed"]
    assert result.after["macs"] <= 0.6 * result.before["macs"]
    assert result.rounds == 2 and result.normalize == "none"  # taylor scores are in loss units
    assert result.criterion.name == "taylor" and result.criterion.recorded_options["variant"] == "squared"
    assert set(result.accuracy or {}) == {"top1_before", "top1_pruned", "recalibrated_bn_batches", "top1_recalibrated"}
    doc = json.loads((tmp_path / "cli.json").read_text())
    assert doc["after"] == result.after and doc["layers"] == result.layers and doc["rounds"] == 2
    loaded = load_checkpoint(tmp_path / "python.safetensors")
    assert loaded.history[-1]["criterion"] == "taylor" and len(loaded.plans) == 1
    assert sum(p.numel() for p in loaded.model.parameters()) == result.after["params"]
    with torch.no_grad():
        assert torch.equal(loaded.model(torch.ones(1, 1, 8, 8)), result.model(torch.ones(1, 1, 8, 8)))


def test_score_then_prune_with_the_scores(ckpt: Path, tmp_path: Path) -> None:
    scored = score_checkpoint(str(ckpt), "l1", criterion_options={"side": "both"}, arch="digits_cnn",
                              out=str(tmp_path / "s.safetensors"))
    assert scored is not None and Path(scored.output).is_file()
    assert scored.criterion.options == {"side": "both"}
    assert [row["removed_at_ratio"] for row in scored.rows] and all(row["channels"] > 0 for row in scored.rows)
    pruned = prune_checkpoint(str(ckpt), scores=scored.output, ratio=0.5, arch="digits_cnn",
                              out=str(tmp_path / "p.safetensors"))
    assert pruned.criterion.name == "l1" and pruned.criterion.recorded_options == {"side": "both"}
    assert pruned.verify is not None and pruned.verify["passed"] and pruned.after["macs"] < pruned.before["macs"]
    with pytest.raises(UserError, match="either --criterion or --scores"):
        prune_checkpoint(str(ckpt), scores=scored.output, criterion="l1", ratio=0.5)


def test_options_are_checked_before_the_checkpoint_is_read(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.pt")
    with pytest.raises(UserError, match="exactly one of --ratio"):
        prune_checkpoint(missing, ratio=0.5, target_flops=0.5)
    with pytest.raises(UserError, match="unknown criterion"):
        score_checkpoint(missing, "l7")
    with pytest.raises(UserError, match="needs calibration data"):
        prune_checkpoint(missing, criterion="hrank", ratio=0.5)
    with pytest.raises(UserError, match="--normalize must be"):
        prune_checkpoint(missing, ratio=0.5, normalize="max")


def test_analyze_checkpoint(ckpt: Path) -> None:
    report = analyze_checkpoint(str(ckpt), arch="digits_cnn", data="digits:test", calib_batches=1, batch_size=16)
    assert report.input_shape == (1, 8, 8) and report.params > 0 and report.macs > 0
    assert report.accuracy is not None and report.accuracy["images"] == 16
    assert any(g["prunable"] for g in report.groups or [])


def test_finetune_checkpoint_records_the_steps(ckpt: Path, tmp_path: Path) -> None:
    shown: list[str] = []
    out = tmp_path / "ft.safetensors"
    options = FinetuneOptions(data="digits:train", out=str(out), arch="digits_cnn", schedule="sfp", ratio=0.25,
                              prune_every=2, train=TrainConfig(max_steps=4, batch_size=32, progress=False))
    result = finetune_checkpoint(str(ckpt), options, show=shown.append)
    assert result is not None and result.train.steps == 4 and result.paths.out == out
    assert shown[0].startswith("[bold]finetune[/bold]")
    assert result.after["macs"] < result.before["macs"] and result.requested == {"ratio": 0.25, "target_flops": None}
    loaded = load_checkpoint(out)
    assert loaded.history[-1]["steps"] == 4 and loaded.history[-1]["schedule"] == "sfp"
    assert not result.paths.state.exists()  # the resumable state is removed after a completed run
    with pytest.raises(UserError, match="already exists"):
        finetune_checkpoint(str(ckpt), options)


def test_finetune_checkpoint_names_its_output_like_prune(ckpt: Path, tmp_path: Path) -> None:
    own = tmp_path / "digits.pt"
    own.write_bytes(ckpt.read_bytes())
    options = FinetuneOptions(data="digits:train", out=None, arch="digits_cnn",
                              train=TrainConfig(max_steps=1, batch_size=16, progress=False))
    result = finetune_checkpoint(str(own), options, show=lambda text: None)
    assert result is not None and result.paths.out == tmp_path / "digits.finetuned.safetensors"
    assert load_checkpoint(result.paths.out).history[-1]["command"] == "finetune"


def test_prune_checkpoint_dry_run_and_layer_ratios(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    result = prune_checkpoint(str(ckpt), arch="digits_cnn", ratio=0.5, layer_ratio={"conv2": 0.75, "fc*": 0},
                              out=str(out), dry_run=True)
    assert result.dry_run and result.output is None and not out.exists()
    assert result.layer_ratio == {"patterns": {"conv2": 0.75, "fc*": 0.0}, "groups": {"conv2": 0.75, "fc1": 0.0}}
    widths = {r["name"]: r["out_after"] for r in result.layers}
    assert widths == {"conv1": 8, "conv2": 8, "conv3": 16, "fc1": 64, "fc2": 10}
    assert result.verify is not None and result.verify["passed"]  # verified in memory
    written = prune_checkpoint(str(ckpt), arch="digits_cnn", ratio=0.5, layer_ratio=["conv2=0.75", "fc*=0"], out=str(out))
    assert written.output == str(out) and written.layers == result.layers
    assert load_checkpoint(out).history[-1]["layer_ratio"] == result.layer_ratio


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "onnx"])
def test_export_checkpoint_checks_what_it_writes(ckpt: Path, tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / {"torchscript": "m.ts", "safetensors": "m.safetensors", "onnx": "m.onnx"}[fmt]
    outcome = export_checkpoint(str(ckpt), str(out), arch="digits_cnn")
    assert outcome.exported.format == fmt and outcome.exported.passed and out.is_file()
    assert outcome.exported.max_abs_diff <= outcome.exported.tolerance
    assert (outcome.exported.spec_path is not None) == (fmt == "safetensors")
    if outcome.exported.spec_path is not None:
        assert json.loads(Path(outcome.exported.spec_path).read_text())["arch"]["name"] == "digits_cnn"


def test_bench_checkpoints_measures_and_evaluates_gates(ckpt: Path, tmp_path: Path) -> None:
    pruned = prune_checkpoint(str(ckpt), arch="digits_cnn", criterion="l1", ratio=0.5,
                              out=str(tmp_path / "p.safetensors"))
    report = bench_checkpoints([str(ckpt), pruned.output], arch="digits_cnn", batch_sizes=[1], warmup=0, repeats=2,
                               max_time=0, data="digits:test", calib_batches=1, batch_size=16, min_speedup=1000.0)
    assert [m.path for m in report.models] == [str(ckpt), pruned.output]
    assert report.models[1].macs < report.models[0].macs
    assert all(m.accuracy is not None and 1 in m.latency for m in report.models)
    assert [g.passed for g in report.gates] == [False]  # recorded, not raised: the command exits 3


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (From Python)", "exec"), {})  # noqa: S102  (our own README, in a private cwd)
    assert "verified: True" in capsys.readouterr().out
    assert load_checkpoint("digits-half.safetensors").history[-1]["command"] == "prune"

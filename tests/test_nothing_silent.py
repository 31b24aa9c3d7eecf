"""Results that used to pass without a word, through the real command line: a short pruning
schedule that ends far below where it started (and its `.best`), BN recalibration of a model with no
BatchNorm, an --input-shape other than the one the model is made for, a --device the machine lacks,
weights of another class count, and help texts that leave out forms the options take.

Everything runs on the built-in digits_cnn (1x8x8) and tiny models in the test's own directory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.models import build_model, parse_arch

runner = CliRunner()


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


def warnings_of(result: Any) -> list[str]:
    assert result.exit_code == 0, result.stderr
    return [line.removeprefix("warning: ") for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_a_schedule_that_ends_far_below_its_best_validation_warns(digits_model: Path, tmp_path: Path) -> None:
    """ASFP removes its channels at the end of the run: 30 steps are too few to recover. The run says
    so, and writes no `.best`: the pruned architecture was validated only once, at the end (the
    earlier, better validations are of the unpruned one)."""
    out = tmp_path / "asfp.safetensors"
    result = cli("finetune", digits_model, "--arch", "digits_cnn", "--data", "digits:train", "--val-data", "digits:test",
                 "--schedule", "asfp", "--target-flops", "0.8", "--max-steps", "30", "--eval-every", "10", "--lr", "0.001",
                 "--threads", "1", "--out", out, "--json", tmp_path / "asfp.json")
    (line,) = [w for w in warnings_of(result) if w.startswith("top-1 ended")]
    assert re.fullmatch(r"top-1 ended at \d+\.\d\d %, far below the 9\d\.\d\d % validated at epoch [\d.]+: the run may "
                        r"be too short to recover from the schedule's removals \(more epochs, or --prune-until below 1 "
                        r"to fine-tune after them\)", line), line
    doc = json.loads((tmp_path / "asfp.json").read_text())
    assert line in doc["warnings"] and doc["best"] is None and doc["best_output"] is None
    assert out.is_file() and not (tmp_path / "asfp.best.safetensors").exists()


NO_BN = """
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
"""


def test_a_model_without_batchnorm_is_not_said_to_be_recalibrated(tmp_path: Path) -> None:
    Path("nobn_net.py").write_text(NO_BN)  # importable from the working directory, as pkg.mod:factory
    namespace: dict[str, Any] = {}
    exec(NO_BN, namespace)
    torch.manual_seed(0)
    torch.save(namespace["make"]().state_dict(), tmp_path / "nobn.pt")
    result = cli("prune", tmp_path / "nobn.pt", "--arch", "nobn_net:make", "--input-shape", "1,8,8", "--ratio", "0.5",
                 "--data", "digits:train", "--val-data", "digits:test", "--val-images", "50", "--out",
                 tmp_path / "p.safetensors", "--json", "-")
    assert result.exit_code == 0, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    assert {"top1_before", "top1_pruned"} <= set(accuracy) and "top1_recalibrated" not in accuracy
    assert accuracy["recalibrated_bn_batches"] == 0
    assert "recalibration" not in result.stderr.lower() and "BN stats" not in result.stderr  # (the table, --json -)


def test_an_input_shape_other_than_the_architectures_is_said(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), tmp_path / "r20.pt")
    (line,) = warnings_of(cli("analyze", tmp_path / "r20.pt", "--arch", "cifar_resnet20", "--input-shape", "3,4,4"))
    assert line == ("--input-shape 3,4,4 is not the 3,32,32 cifar_resnet20 is made for; MACs, scores and accuracy are "
                    "those of 3,4,4 inputs (drop --input-shape to use 3,32,32)")
    assert warnings_of(cli("analyze", tmp_path / "r20.pt", "--arch", "cifar_resnet20", "--input-shape", "3,32,32")) == []


def test_a_device_the_machine_lacks_fails_in_one_line_without_data(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(build_model(parse_arch("digits_cnn")).state_dict(), tmp_path / "d.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("analyze", tmp_path / "d.pt", "--arch", "digits_cnn", "--device", "cuda", "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "error: --device cuda: CUDA is not available on this machine; use --device cpu"]
    assert not (tmp_path / "r.json").exists()


def test_weights_of_another_class_count_suggest_the_arch_kwargs_that_fit(tmp_path: Path) -> None:
    torch.save(build_model(parse_arch("digits_cnn")).state_dict(), tmp_path / "d.pt")
    result = cli("analyze", tmp_path / "d.pt", "--arch", "digits_cnn", "--arch-kwargs", '{"num_classes": 5}')
    assert result.exit_code == 2
    assert result.stderr.rstrip().endswith("the file's classifier has 10 classes, the model's 5: pass "
                                           "--arch-kwargs '{\"num_classes\": 10}'"), result.stderr


def test_help_names_every_form_and_flags_show_no_placeholder() -> None:
    import typer.main

    group = typer.main.get_command(app)
    params = {p.name: p for p in group.commands["analyze"].params}
    assert "timm:NAME" in params["arch"].help and ".npz" in params["data"].help and ".npy" in params["data"].help
    assert "timm:NAME" in cli("analyze", "--list-archs").stdout
    env = {"CHANPRUNE_DEBUG": None, "COLUMNS": "200"}
    for argv in ([], ["analyze"], ["prune"], ["finetune"], ["bench"], ["run"]):
        shown = runner.invoke(app, [*argv, "--help"], env=env).stdout
        assert "--help" in shown and "<bool>" not in shown, argv

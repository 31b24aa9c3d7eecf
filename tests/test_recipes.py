"""The recipes from Python (`from chanprune_cli import prune_checkpoint`, ...): each does what its
command does, on the bundled 8×8 digits with `digits_cnn`, and `chanprune prune` writes the very
same bytes as `prune_checkpoint` with the same options. The options objects check their values
when they are made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import chanprune_cli
from chanprune_cli import (
    AllocationOptions,
    AnalyzeOptions,
    BenchOptions,
    DataOptions,
    ExportOptions,
    FinetuneOptions,
    ModelOptions,
    PruneOptions,
    ScheduleOptions,
    ScoreOptions,
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
DIGITS = ModelOptions(arch="digits_cnn")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained digits_cnn state dict (needs --arch digits_cnn)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save(build_model(parse_arch("digits_cnn")).state_dict(), path)
    return path


def test_recipes_load_lazily_from_the_package() -> None:
    from chanprune_cli import recipes

    assert {"prune_checkpoint", "PruneOptions", "ModelOptions", "AllocationOptions"} <= set(recipes.__all__)
    assert set(recipes.__all__) <= set(dir(chanprune_cli)) and chanprune_cli.__all__ == ["__version__", *recipes.__all__]
    assert chanprune_cli.prune_checkpoint is recipes.prune_checkpoint
    with pytest.raises(AttributeError):
        chanprune_cli.no_such_recipe  # noqa: B018
    # the command line's help must not pay for torch, nor `from chanprune_cli import <submodule>`
    code = ("import sys, chanprune_cli, chanprune_cli.cli; from chanprune_cli import errors; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_prune_checkpoint_is_byte_identical_to_the_command(ckpt: Path, tmp_path: Path) -> None:
    flags = {"arch": "digits_cnn", "criterion": "taylor", "data": "digits:train", "calib_batches": 2, "batch_size": 32,
             "target_flops": 0.4, "rounds": 2, "recalibrate_bn": 2, "val_data": "digits:test", "round_to": 2,
             "device": "cpu"}  # bitwise equal on the CPU; taylor's backward on CUDA is not
    options = PruneOptions(AllocationOptions(target_flops=0.4, rounds=2, round_to=2), criterion="taylor",
                           recalibrate_bn=2, val_data="digits:test", out=str(tmp_path / "python.safetensors"),
                           model=ModelOptions(arch="digits_cnn", device="cpu"),
                           data=DataOptions("digits:train", batch_size=32, calib_batches=2))
    result = prune_checkpoint(str(ckpt), options)
    run = CliRunner().invoke(app, ["prune", str(ckpt), *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()],
                                   "--out", str(tmp_path / "cli.safetensors"), "--json", str(tmp_path / "cli.json")],
                             env={"CHANPRUNE_DEBUG": None})
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
    scored = score_checkpoint(str(ckpt), ScoreOptions("l1", criterion_options={"side": "both"}, model=DIGITS,
                                                      out=str(tmp_path / "s.safetensors")))
    assert scored is not None and Path(scored.output).is_file()
    assert scored.criterion.options == {"side": "both"}
    assert [row["removed_at_ratio"] for row in scored.rows] and all(row["channels"] > 0 for row in scored.rows)
    pruned = prune_checkpoint(str(ckpt), PruneOptions(AllocationOptions(ratio=0.5), scores=scored.output, model=DIGITS,
                                                      out=str(tmp_path / "p.safetensors")))
    assert pruned.criterion.name == "l1" and pruned.criterion.recorded_options == {"side": "both"}
    assert pruned.verify is not None and pruned.verify["passed"] and pruned.after["macs"] < pruned.before["macs"]
    with pytest.raises(UserError, match="either --criterion or --scores"):
        PruneOptions(AllocationOptions(ratio=0.5), scores=scored.output, criterion="l1")


def test_options_are_checked_when_made(tmp_path: Path) -> None:
    """Each options object checks its values once, when made, with the command line's messages;
    a recipe then checks the world (files, criteria) before it reads the checkpoint."""
    with pytest.raises(UserError, match="exactly one of --ratio"):
        AllocationOptions(ratio=0.5, target_flops=0.5)
    with pytest.raises(UserError, match="--rounds needs --target-flops"):
        AllocationOptions(ratio=0.5, rounds=3)
    with pytest.raises(UserError, match="--normalize must be auto, mean or none"):
        AllocationOptions(ratio=0.5, normalize="max")
    with pytest.raises(UserError, match="--min-keep must be positive"):
        AllocationOptions(ratio=0.5, min_keep=0)
    with pytest.raises(UserError, match="expected GLOB=R"):
        AllocationOptions(ratio=0.5, layer_ratio="=0.5")
    with pytest.raises(UserError, match="C,H,W"):
        ModelOptions(input_shape="3,32,32,1")
    with pytest.raises(UserError, match="--mean"):
        ModelOptions(mean="abc")
    with pytest.raises(UserError, match="give an output index or key"):
        ModelOptions(output="1..2")
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        DataOptions(batch_size=0)
    with pytest.raises(UserError, match="--val-images sets how many images of --val-data"):
        PruneOptions(AllocationOptions(ratio=0.5), val_images=10)
    with pytest.raises(UserError, match="--ratio must be between 0 and 1"):
        ScoreOptions("l1", ratio=2)
    with pytest.raises(UserError, match="cannot tell the export format"):
        ExportOptions(str(tmp_path / "model.bin"))
    with pytest.raises(UserError, match="--gate-batch 8 is not one of --batch-sizes 1,32"):
        BenchOptions(gate_batch=8)
    with pytest.raises(UserError, match="--dcph belongs to --schedule cac"):
        ScheduleOptions("sfp", dcph=True)
    assert ScheduleOptions("cac", dcph=True).ratio == 0.5  # --dcph prunes half unless told otherwise
    # given as the command line writes them, values are parsed once
    parsed = ModelOptions(input_shape="3, 32,32", mean="0.5", classes="cat,dog", output=" 1.logits ")
    assert (parsed.input_shape, parsed.mean, parsed.classes, parsed.output) == ((3, 32, 32), (0.5,), ("cat", "dog"),
                                                                               "1.logits")
    assert AllocationOptions(ratio=0.5, layer_ratio=["conv*=0.2", {"fc": 0}]).layer_ratio == {"conv*": 0.2, "fc": 0.0}
    assert BenchOptions(batch_sizes="32,1,32").batch_sizes == (1, 32)

    missing = str(tmp_path / "absent.pt")  # what depends on the world fails before the checkpoint is read
    with pytest.raises(UserError, match="unknown criterion"):
        score_checkpoint(missing, ScoreOptions("l7"))
    with pytest.raises(UserError, match="needs calibration data"):
        prune_checkpoint(missing, PruneOptions(AllocationOptions(ratio=0.5), criterion="hrank"))


def test_analyze_checkpoint(ckpt: Path) -> None:
    options = AnalyzeOptions(model=DIGITS, data=DataOptions("digits:test", calib_batches=1, batch_size=16))
    report = analyze_checkpoint(str(ckpt), options)
    assert report.input_shape == (1, 8, 8) and report.params > 0 and report.macs > 0
    assert report.accuracy is not None and report.accuracy["images"] == 16
    assert any(g["prunable"] for g in report.groups or [])


def test_finetune_checkpoint_records_the_steps(ckpt: Path, tmp_path: Path) -> None:
    shown: list[str] = []
    out = tmp_path / "ft.safetensors"
    options = FinetuneOptions("digits:train", out=str(out), model=DIGITS,
                              schedule=ScheduleOptions("sfp", ratio=0.25, prune_every=2),
                              train=TrainConfig(max_steps=4, batch_size=32, progress=False))
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
    options = FinetuneOptions("digits:train", model=DIGITS, train=TrainConfig(max_steps=1, batch_size=16, progress=False))
    result = finetune_checkpoint(str(own), options, show=lambda text: None)
    assert result is not None and result.paths.out == Path("digits.finetuned.safetensors")  # in the working directory
    assert load_checkpoint(result.paths.out).history[-1]["command"] == "finetune"


def test_prune_checkpoint_dry_run_and_layer_ratios(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    options = PruneOptions(AllocationOptions(ratio=0.5, layer_ratio={"conv2": 0.75, "fc*": 0}), model=DIGITS,
                           out=str(out), dry_run=True)
    result = prune_checkpoint(str(ckpt), options)
    assert result.dry_run and result.output is None and not out.exists()
    assert result.layer_ratio == {"patterns": {"conv2": 0.75, "fc*": 0.0}, "groups": {"conv2": 0.75, "fc1": 0.0}}
    widths = {r["name"]: r["out_after"] for r in result.layers}
    assert widths == {"conv1": 8, "conv2": 8, "conv3": 16, "fc1": 64, "fc2": 10}
    assert result.verify is not None and result.verify["passed"]  # verified in memory
    written = prune_checkpoint(str(ckpt), PruneOptions(AllocationOptions(ratio=0.5, layer_ratio=["conv2=0.75", "fc*=0"]),
                                                       model=DIGITS, out=str(out)))
    assert written.output == str(out) and written.layers == result.layers
    assert load_checkpoint(out).history[-1]["layer_ratio"] == result.layer_ratio


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "onnx"])
def test_export_checkpoint_checks_what_it_writes(ckpt: Path, tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / {"torchscript": "m.ts", "safetensors": "m.safetensors", "onnx": "m.onnx"}[fmt]
    outcome = export_checkpoint(str(ckpt), ExportOptions(str(out), model=DIGITS))
    assert outcome.exported.format == fmt and outcome.exported.passed and out.is_file()
    assert outcome.exported.max_abs_diff <= outcome.exported.tolerance
    assert (outcome.exported.spec_path is not None) == (fmt == "safetensors")
    if outcome.exported.spec_path is not None:
        assert json.loads(Path(outcome.exported.spec_path).read_text())["arch"]["name"] == "digits_cnn"


def test_bench_checkpoints_measures_and_evaluates_gates(ckpt: Path, tmp_path: Path) -> None:
    pruned = prune_checkpoint(str(ckpt), PruneOptions(AllocationOptions(ratio=0.5), criterion="l1", model=DIGITS,
                                                      out=str(tmp_path / "p.safetensors")))
    options = BenchOptions(batch_sizes=[1], warmup=0, repeats=2, max_time=0, min_speedup=1000.0, model=DIGITS,
                           data=DataOptions("digits:test", calib_batches=1, batch_size=16))
    report = bench_checkpoints([str(ckpt), str(pruned.output)], options)
    assert [m.path for m in report.models] == [str(ckpt), pruned.output]
    assert report.models[1].macs < report.models[0].macs
    assert all(m.accuracy is not None and 1 in m.latency for m in report.models)
    assert [g.passed for g in report.gates] == [False]  # recorded, not raised: the command exits 3


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (From Python)", "exec"), {})
    assert "verified: True" in capsys.readouterr().out
    assert load_checkpoint("digits-half.safetensors").history[-1]["command"] == "prune"

"""Every file in sample_configs/ runs end to end with `chanprune run` on small data.

The configs name real data (../shared CIFAR-10, or an ImageFolder of the user's); here the
checkpoint and data paths are swapped for tiny stand-ins with `--set`, and the long budgets
(fine-tune steps, timing repeats, image size) are cut, so that what is tested is the file itself:
its keys are valid options, its stages wire together, its gates are evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.models import build_model, parse_arch

SAMPLES = Path(__file__).resolve().parents[1] / "sample_configs"
SYNTHETIC = "synthetic:3x32x32:10:48"
# Short budgets; `--set KEY=VALUE` (shared keys) beat the tables of the file, like every later file.
FAST = ["--set", "bench.repeats=2", "--set", "bench.warmup=0", "--set", "bench.max_time=1", "--set", "batch_size=8",
        "--set", "prune.recalibrate_bn=2", "--set", "calib_batches=2"]
runner = CliRunner()


def run(config: Path, *args: str) -> object:
    return runner.invoke(app, ["run", str(config), "--dir", "out", *args], env={"CHANPRUNE_NO_PROJECT_CONFIG": "1"})


def save_random(arch: str, path: Path, **kwargs: object) -> str:
    torch.manual_seed(0)
    torch.save(build_model(parse_arch(arch, json.dumps(kwargs) if kwargs else None)).state_dict(), path)
    return str(path)


def stages_ran(directory: Path) -> set[str]:
    return set(json.loads((directory / "run.json").read_text())["stages"])


def test_every_sample_config_is_covered() -> None:
    assert {p.name for p in SAMPLES.glob("*.toml")} == {
        "resnet56_l1.toml", "resnet56_sensitivity_global.toml", "resnet56_lossless.toml", "resnet18_imagefolder.toml",
        "ci_gates.toml"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_resnet56_l1(workdir: Path) -> None:
    ckpt = save_random("cifar_resnet56", workdir / "r56.pt")
    result = run(SAMPLES / "resnet56_l1.toml", "--set", f"checkpoint={ckpt}", "--set", f"data={SYNTHETIC}",
                 "--set", f"bench.data={SYNTHETIC}", *FAST)
    assert result.exit_code == 0, result.output
    assert stages_ran(workdir / "out") == {"analyze", "score", "prune", "bench"}
    prune = json.loads((workdir / "out" / "prune.json").read_text())
    assert prune["criterion"] == "l1" and prune["requested"]["ratio"] == 0.5 and prune["verify"]["passed"]


def test_resnet56_sensitivity_global(workdir: Path) -> None:
    ckpt = save_random("cifar_resnet56", workdir / "r56.pt")
    result = run(SAMPLES / "resnet56_sensitivity_global.toml", "--set", f"checkpoint={ckpt}", "--set", f"data={SYNTHETIC}",
                 "--set", "score.calib_batches=2", "--set", "finetune.max_steps=2", "--set", f"finetune.teacher={ckpt}",
                 "--set", f"finetune.val_data={SYNTHETIC}", "--set", "finetune.val_images=16",
                 "--set", f"bench.data={SYNTHETIC}", *FAST)
    assert result.exit_code == 0, result.output
    assert stages_ran(workdir / "out") == {"analyze", "score", "prune", "finetune", "export", "bench"}
    prune = json.loads((workdir / "out" / "prune.json").read_text())
    assert prune["criterion"] == "sensitivity" and prune["requested"]["target_flops"] == 0.5
    assert 1 - prune["after"]["macs"] / prune["before"]["macs"] == pytest.approx(0.5, abs=0.05)
    assert json.loads((workdir / "out" / "export.json").read_text())["passed"]


def test_resnet56_lossless(workdir: Path) -> None:
    ckpt = save_random("cifar_resnet56", workdir / "r56.pt")
    result = run(SAMPLES / "resnet56_lossless.toml", "--set", f"checkpoint={ckpt}", "--set", f"data={SYNTHETIC}",
                 "--set", "score.calib_batches=2", "--set", "score.batch_size=8", "--set", "finetune.epochs=1",
                 "--set", "finetune.batch_size=8", "--set", f"finetune.teacher={ckpt}", "--set", f"finetune.val_data={SYNTHETIC}",
                 "--set", f"bench.data={SYNTHETIC}", "--set", "bench.batch_sizes=1,8", *FAST)
    assert stages_ran(workdir / "out") == {"score", "prune", "finetune", "bench"}
    prune = json.loads((workdir / "out" / "prune.json").read_text())
    assert prune["criterion"] == "sensitivity" and prune["requested"]["target_flops"] == 0.5 and prune["verify"]["passed"]
    finetune = json.loads((workdir / "out" / "finetune.json").read_text())
    assert finetune["epochs"] == 1 and finetune["teacher"]
    [gate] = json.loads((workdir / "out" / "bench.json").read_text())["gates"]
    assert gate["name"] == "max-acc-drop" and gate["limit"] == 0.0
    # Random weights decide pass or fail; the exit code must agree with the gate.
    assert result.exit_code == (0 if gate["passed"] else 3), result.output


def test_resnet18_imagefolder(workdir: Path) -> None:
    # The config's relative paths (resnet18.pt, data/train, data/val) resolve against its folder,
    # so a copy of it sits in a folder that has them.
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = workdir / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    save_random("torchvision:resnet18", workdir / "resnet18.pt", num_classes=10)
    config = workdir / "resnet18_imagefolder.toml"
    config.write_text((SAMPLES / "resnet18_imagefolder.toml").read_text())
    result = run(config, "--set", "input_shape=[3,32,32]", "--set", "finetune.epochs=1", *FAST)
    assert result.exit_code == 0, result.output
    assert stages_ran(workdir / "out") == {"analyze", "score", "prune", "finetune", "export", "bench"}
    prune = json.loads((workdir / "out" / "prune.json").read_text())
    assert prune["criterion"] == "taylor" and prune["verify"]["passed"]
    widths = [layer["out_after"] for layer in prune["layers"] if layer["out_after"] != layer["out_before"]]
    assert widths and all(w % 8 == 0 for w in widths)  # round_to = 8
    assert (workdir / "out" / "model.ts.pt").is_file()


def test_ci_gates(workdir: Path) -> None:
    ckpt = save_random("cifar_resnet20", workdir / "r20.pt")
    result = run(SAMPLES / "ci_gates.toml", "--set", f"checkpoint={ckpt}", "--set", f"data={SYNTHETIC}",
                 "--set", "finetune.max_steps=2", "--set", f"finetune.val_data={SYNTHETIC}", "--set", "finetune.val_images=16",
                 "--set", f"bench.data={SYNTHETIC}", *FAST, "--json", "summary.json")
    bench = json.loads((workdir / "out" / "bench.json").read_text())
    gates = {g["name"]: g for g in bench["gates"]}
    assert set(gates) == {"max-acc-drop", "min-speedup"}
    assert gates["max-acc-drop"]["limit"] == 1.0 and gates["min-speedup"]["limit"] == 1.3
    # Random weights and two timing runs decide pass or fail; the exit code must agree with the report.
    assert result.exit_code == (0 if all(g["passed"] for g in gates.values()) else 3), result.output
    assert json.loads(Path("summary.json").read_text())["passed"] == (result.exit_code == 0)  # written either way

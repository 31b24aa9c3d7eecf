"""The `chanprune` command line through its real entry points (names, JSON, exit codes).

Most tests drive the Typer app in-process with CliRunner (fast); a few run
`python -m chanprune_cli` in a subprocess to cover the console entry, stdout/stderr separation
and exit codes exactly as a shell sees them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli import __version__
from chanprune_cli.checkpoint import load_checkpoint
from chanprune_cli.cli import app, main
from chanprune_cli.models import build_model, parse_arch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET56 = SHARED / "checkpoints" / "resnet56-4bfd9763.th"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg-test.tar.gz"
needs_shared = pytest.mark.skipif(not (RESNET56.exists() and CIFAR_TEST.exists()), reason="../shared is absent")

runner = CliRunner()


def cli(*args: str) -> object:
    """Invoke the app in-process; CHANPRUNE_DEBUG from the caller's environment must not leak in."""
    return runner.invoke(app, list(args), env={"CHANPRUNE_DEBUG": None})


def run_module(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CHANPRUNE_DEBUG"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "chanprune_cli", *args],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600,
    )


def assert_one_line_error(stderr: str, *, contains: str = "") -> None:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("progress: ")]
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    assert contains.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) digits_cnn saved the way most training scripts do: {'state_dict', 'arch'}."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save({"state_dict": build_model(parse_arch("digits_cnn", None)).state_dict(), "arch": "digits_cnn"}, path)
    return path


# --------------------------------------------------------------------------------------------
# help, version


def test_help_lists_analyze_with_description() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    assert "analyze" in result.stdout
    assert "MACs" in result.stdout  # the one-line description is shown next to the name
    assert "Exit codes" in result.stdout


def test_analyze_help_shows_examples() -> None:
    result = cli("analyze", "--help")
    assert result.exit_code == 0
    assert "Examples" in result.stdout
    assert "chanprune analyze" in result.stdout
    for option in ("--arch", "--arch-kwargs", "--input-shape", "--trust-pickle", "--device", "--data",
                   "--mean", "--std", "--batch-size", "--workers", "--seed", "--json", "--list-archs"):
        assert option in result.stdout, option


def test_python_dash_m_help_and_version() -> None:
    proc = run_module("--help")
    assert proc.returncode == 0, proc.stderr
    assert "analyze" in proc.stdout
    proc = run_module("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"chanprune {__version__}"


def test_list_archs_needs_no_checkpoint() -> None:
    result = cli("analyze", "--list-archs")
    assert result.exit_code == 0
    for name in ("cifar_resnet20", "cifar_resnet56", "cifar_resnet110", "digits_cnn", "torchvision:"):
        assert name in result.stdout


# --------------------------------------------------------------------------------------------
# analyze


def test_analyze_table(digits_ckpt: Path) -> None:
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("conv1", "bn1", "fc2", "Conv2d", "BatchNorm2d", "Linear", "16→32", "3×3", "params", "MACs", "size"):
        assert text in out, text
    assert "top-1" not in out  # no accuracy without --data


def test_analyze_json_with_data(digits_ckpt: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--data", "digits:test",
                 "--mean", "0.5", "--std", "0.5", "--seed", "3", "--json", str(report))
    assert result.exit_code == 0, result.stderr
    assert "top-1" in result.stdout
    doc = json.loads(report.read_text())
    assert doc["schema_version"] == 1
    assert doc["command"] == "analyze"
    assert doc["tool"] == {"name": "chanprune", "version": __version__}
    assert doc["torch_version"] == torch.__version__
    assert doc["seed"] == 3
    assert doc["checkpoint"] == {"path": str(digits_ckpt), "format": "state_dict"}
    assert doc["arch"] == {"name": "digits_cnn", "kwargs": {}}
    assert doc["input_shape"] == [1, 8, 8]
    model = build_model(parse_arch("digits_cnn", None))
    assert isinstance(doc["model"]["params"], int) and doc["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert isinstance(doc["model"]["macs"], int) and doc["model"]["macs"] > 0
    assert doc["model"]["size_mb"] > 0
    acc = doc["accuracy"]
    assert 0 <= acc["top1"] <= 100 and 0 <= acc["top5"] <= 100 and acc["top1"] <= acc["top5"]
    assert isinstance(acc["images"], int) and acc["images"] > 0
    layers = {row["name"]: row for row in doc["layers"]}
    assert layers["conv2"]["in_channels"] == 16 and layers["conv2"]["out_channels"] == 32
    assert layers["conv2"]["kernel"] == [3, 3]
    assert layers["fc1"]["type"] == "Linear" and layers["fc1"]["kernel"] is None
    assert all(isinstance(row["macs"], int) and isinstance(row["params"], int) for row in doc["layers"])
    assert sum(row["macs"] for row in doc["layers"]) <= doc["model"]["macs"]


def test_analyze_json_existing_output_needs_force(digits_ckpt: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text("keep me")
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--json", str(report))
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, contains="--force")
    assert report.read_text() == "keep me"
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--json", str(report), "--force")
    assert result.exit_code == 0, result.stderr
    assert json.loads(report.read_text())["schema_version"] == 1


def test_analyze_json_to_stdout_subprocess(digits_ckpt: Path) -> None:
    """`--json -`: stdout is exactly the JSON document; the table goes to stderr."""
    proc = run_module("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--data", "digits:test",
                      "--calib-batches", "2", "--batch-size", "16", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["accuracy"]["images"] == 32
    assert doc["accuracy"]["max_batches"] == 2
    assert "conv1" in proc.stderr


def test_unreadable_image_is_one_warning_line(digits_ckpt: Path, tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--data", str(tmp_path / "imgs"), "--input-shape", "1,8,8",
                 "--classes", "a,b,c,d,e,f,g,h,i,j")  # 2 of 10 classes, named: no class warning
    assert result.exit_code == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("warning: "), result.stderr
    assert "broken.png" in warning_lines[0]
    assert "top-1" in result.stdout


def test_trusted_pickle_needs_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(build_model(parse_arch("digits_cnn", None)), path)
    result = cli("analyze", str(path), "--trust-pickle")
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, contains="--input-shape")
    result = cli("analyze", str(path), "--trust-pickle", "--input-shape", "1,8,8")
    assert result.exit_code == 0, result.stderr
    assert "fc2" in result.stdout


# --------------------------------------------------------------------------------------------
# errors: one line on stderr, exit 2, no traceback


@pytest.mark.parametrize(
    ("case", "contains"),
    [
        ("missing_file", "does not exist"),
        ("unknown_arch", "unknown architecture"),
        ("bad_kwargs_json", "--arch-kwargs"),
        ("weights_do_not_fit", "do not fit"),
        ("pickle_untrusted", "--trust-pickle"),
        ("empty_data_dir", "empty"),
        ("bad_input_shape", "3,32,32"),
        ("bad_mean", "--mean"),
    ],
)
def test_user_errors(case: str, contains: str, digits_ckpt: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "whole.pt"
    torch.save(build_model(parse_arch("digits_cnn", None)), pickled)
    (tmp_path / "empty").mkdir()
    ck = str(digits_ckpt)
    args = {
        "missing_file": ["analyze", str(tmp_path / "missing.pt"), "--arch", "digits_cnn"],
        "unknown_arch": ["analyze", ck, "--arch", "no_such_net"],
        "bad_kwargs_json": ["analyze", ck, "--arch", "digits_cnn", "--arch-kwargs", "{num_classes: 10"],
        "weights_do_not_fit": ["analyze", ck, "--arch", "cifar_resnet20"],
        "pickle_untrusted": ["analyze", str(pickled)],
        "empty_data_dir": ["analyze", ck, "--arch", "digits_cnn", "--data", str(tmp_path / "empty")],
        "bad_input_shape": ["analyze", ck, "--arch", "digits_cnn", "--input-shape", "3,32,32,1"],
        "bad_mean": ["analyze", ck, "--arch", "digits_cnn", "--data", "digits:test", "--mean", "abc"],
    }[case]
    result = cli(*args)
    assert result.exit_code == 2, result.stderr
    assert_one_line_error(result.stderr, contains=contains)
    assert result.stdout == ""


def test_user_error_subprocess(digits_ckpt: Path, tmp_path: Path) -> None:
    proc = run_module("analyze", str(digits_ckpt), "--arch", "no_such_net", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, contains="unknown architecture")
    assert proc.stdout == ""


def test_usage_error_exit_2() -> None:
    result = cli("analyze", "x.pt", "--no-such-option")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert cli("no-such-command").exit_code == 2
    assert cli("analyze").exit_code == 2  # neither CKPT nor --list-archs


@pytest.mark.parametrize("form", ["global", "command", "env"])
def test_debug_shows_traceback(form: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pt")
    args = {"global": ["--debug", "analyze", missing], "command": ["analyze", missing, "--debug"], "env": ["analyze", missing]}[form]
    env = {"CHANPRUNE_DEBUG": "1" if form == "env" else None}
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2  # same exit code, more detail
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_unexpected_exception_one_line_exit_1(digits_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr("chanprune_cli.measure.count_macs", boom)
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, contains="RuntimeError: simulated failure second line (re-run with --debug")


def test_keyboard_interrupt_exit_130(digits_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_args: object, **_kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("chanprune_cli.measure.count_macs", interrupt)
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn")
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted"


def test_main_returns_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "missing.pt"), "--arch", "digits_cnn"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["--version"]) == 0


# --------------------------------------------------------------------------------------------
# the shared pretrained ResNet-56 (../shared/README.md numbers)


def _analyze_resnet56(tmp_path: Path, *extra: str) -> dict:
    report = tmp_path / "r56.json"
    result = cli("analyze", str(RESNET56), "--arch", "cifar_resnet56", "--json", str(report), *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(report.read_text())


@needs_shared
def test_resnet56_params_and_macs(tmp_path: Path) -> None:
    doc = _analyze_resnet56(tmp_path)
    assert doc["model"]["params"] == 853_018
    assert doc["model"]["macs"] == pytest.approx(126.6e6, rel=0.005)
    assert doc["input_shape"] == [3, 32, 32]


@needs_shared
def test_resnet56_accuracy_subset(tmp_path: Path) -> None:
    """4 random batches of the JPEG test set: a quick sanity check of loading + normalisation."""
    doc = _analyze_resnet56(tmp_path, "--data", str(CIFAR_TEST), "--calib-batches", "4", "--batch-size", "128")
    assert doc["accuracy"]["images"] == 512
    assert 70 <= doc["accuracy"]["top1"] <= 95


@pytest.mark.slow
@needs_shared
def test_resnet56_accuracy_full(tmp_path: Path) -> None:
    """The full 10 000-image JPEG test set: 83.20 % (../shared/README.md). ~2 min on 2 cores."""
    doc = _analyze_resnet56(tmp_path, "--data", str(CIFAR_TEST), "--batch-size", "200")
    assert doc["accuracy"]["images"] == 10_000
    assert doc["accuracy"]["top1"] == pytest.approx(83.20, abs=0.05)


# --------------------------------------------------------------------------------------------
# the release engineer's path: help as written, progress, bounded and dry runs, per-layer
# ratios, recorded normalisation, default outputs and their permissions


def _commands() -> dict[str, Any]:
    from typer.main import get_command

    return dict(get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_shows_every_bracketed_word(name: str) -> None:
    """Help texts are rendered as written: "[prune] table", "CxHxW[:K[:N]]" keep their brackets.
    (Epilogs, the examples, are markup on purpose and escape what they show.)"""
    command = _commands()[name]
    result = runner.invoke(app, [name, "--help"], env={"CHANPRUNE_DEBUG": None, "COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    texts = [t.replace("\\[", "[") for t in [command.help, *(getattr(p, "help", None) for p in command.params)] if t]
    bracketed = [m for text in texts for m in re.findall(r"\[[^\]\[]*\]", text)]
    assert name not in ("run", "init") or bracketed  # run's and init's help texts have some
    for word in bracketed:
        assert word in shown, f"{name} --help lost {word!r}"
    for markup in ("[b]", "[/b]", "[bold]"):
        assert markup not in shown
    assert "  ,  " not in shown and "(default:  " not in shown and "for ." not in shown


def test_help_of_run_init_and_score_keep_their_words() -> None:
    env = {"CHANPRUNE_DEBUG": None, "COLUMNS": "1000", "TERMINAL_WIDTH": "1000"}
    run_help = " ".join(runner.invoke(app, ["run", "--help"], env=env).stdout.split())
    assert "shared keys plus [score], [prune], [finetune], [export], [bench] and [run] tables" in run_help
    assert "(default: [run] stages" in run_help
    init_help = " ".join(runner.invoke(app, ["init", "--help"], env=env).stdout.split())
    assert "Criterion for [score]." in init_help and "[bench] gate." in init_help
    score_help = " ".join(runner.invoke(app, ["score", "--help"], env=env).stdout.split())
    assert "see chanprune score --help" not in score_help
    assert "Channel-importance criterion (chanprune score --list-criteria lists them)" in score_help
    assert "synthetic:CxHxW[:K[:N]]" in score_help


def _terminal(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """Progress bars as on a terminal (they are drawn only there): the environment for CliRunner."""
    from chanprune_cli.support import progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    return {"CHANPRUNE_DEBUG": None, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "200"}


def test_prune_labels_every_long_step_and_bounds_val_data(digits_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    args = ["prune", str(digits_ckpt), "--arch", "digits_cnn", "--ratio", "0.5", "--data", "digits:train",
            "--recalibrate-bn", "2", "--val-data", "digits:test", "--val-images", "100", "--seed", "3"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a.safetensors"), "--json", str(tmp_path / "a.json")],
                           env=_terminal(monkeypatch))
    assert result.exit_code == 0, result.output
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stderr)
    for label in ("tracing the channel graph", "removing channels and verifying", "re-estimating BatchNorm statistics",
                  "top-1 before pruning", "top-1 after pruning", "top-1 after BN recalibration"):
        assert label in drawn, label
    accuracy = json.loads((tmp_path / "a.json").read_text())["accuracy"]
    assert accuracy["val_images"] == 100
    assert {"top1_before", "top1_pruned", "top1_recalibrated"} <= set(accuracy)
    for value in (accuracy["top1_before"], accuracy["top1_pruned"], accuracy["top1_recalibrated"]):
        assert round(value) == value  # whole percents: 100 images
    # the same seed draws the same images; off a terminal no bar is drawn (only steps that take a while log lines)
    monkeypatch.undo()
    again = cli(*args, "--out", str(tmp_path / "b.safetensors"), "--json", str(tmp_path / "b.json"))
    assert again.exit_code == 0 and all(line.startswith("progress: ") for line in again.stderr.splitlines())
    assert json.loads((tmp_path / "b.json").read_text())["accuracy"] == accuracy


def test_long_steps_log_progress_lines_off_a_terminal(digits_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a CI log (stderr no terminal) a step that takes a while says what it does and how far it
    got, a `progress:` line every few seconds (here every 10 ms), and when it is done."""
    from chanprune_cli.support import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.01)
    result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--data", "digits:test", "--batch-size", "16")
    assert result.exit_code == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert any(re.fullmatch(r"progress: evaluating · \d+/23 · [\d,]+ img/s · \d+ s", line) for line in said), said
    assert any(line.startswith("progress: evaluating · 23/23 ·") and line.endswith(" s") and "done in" in line
               for line in said), said
    assert "\x1b" not in result.stderr  # plain lines, no terminal codes


MODEL_COMMANDS = ("analyze", "score", "prune", "finetune", "export", "bench")


def test_threads_is_one_option_of_every_command_that_runs_a_model() -> None:
    import typer.main

    group = typer.main.get_command(app)
    helps = {name: next(p.help for p in group.commands[name].params if "--threads" in p.opts) for name in MODEL_COMMANDS}
    assert len(set(helps.values())) == 1 and "CPU threads torch runs the model on" in helps["analyze"]


def test_threads_run_the_model_and_are_recorded_where_it_is_timed(digits_ckpt: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import chanprune_cli.recipes.analyze as analyze_recipe

    seen: list[int] = []
    real = analyze_recipe.build_graph
    monkeypatch.setattr(analyze_recipe, "build_graph", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = cli("analyze", str(digits_ckpt), "--arch", "digits_cnn", "--threads", "1")
        assert result.exit_code == 0, result.stderr
        assert seen == [1] and torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
    result = cli("bench", str(digits_ckpt), "--arch", "digits_cnn", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
                 "--threads", "1", "--json", str(tmp_path / "bench.json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["threads"] == 1
    assert_one_line_error(cli("score", str(digits_ckpt), "--arch", "digits_cnn", "--criterion", "l1", "--threads", "0").stderr,
                          contains="--threads")


def test_prune_dry_run_writes_nothing(digits_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.safetensors"
    result = cli("prune", str(digits_ckpt), "--arch", "digits_cnn", "--target-flops", "0.5", "--out", str(out),
                 "--dry-run", "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True and doc["output"] is None and doc["verify"]["passed"]
    assert doc["after"]["macs"] <= 0.5 * doc["before"]["macs"] and doc["layers"]
    assert any(r["out_after"] < r["out_before"] for r in doc["layers"])
    assert not out.exists() and not Path(".chanprune").exists()
    assert "dry run" in result.stderr  # the table went to stderr (--json -)
    out.write_text("the user's file")  # an existing --out is no obstacle: nothing is written
    assert cli("prune", str(digits_ckpt), "--arch", "digits_cnn", "--ratio", "0.5", "--out", str(out), "--dry-run").exit_code == 0
    assert out.read_text() == "the user's file"


def test_layer_ratio_flags_and_config_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pt"
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), ckpt)
    common = ["prune", str(ckpt), "--arch", "cifar_resnet20", "--ratio", "0.5"]
    result = cli(*common, "--layer-ratio", "layer3.*=0.75", "--layer-ratio", "layer1.0.conv1=0",
                 "--out", str(tmp_path / "flags.safetensors"), "--json", str(tmp_path / "flags.json"))
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tmp_path / "flags.json").read_text())
    widths = {r["name"]: (r["out_before"], r["out_after"]) for r in doc["layers"]}
    assert widths["layer3.0.conv1"] == (64, 16) and widths["layer1.0.conv1"] == (16, 16)
    assert widths["layer2.0.conv1"] == (32, 16)  # --ratio for the rest
    assert widths["conv1"] == (16, 8)  # the residual stream spans every stage: layer3.* does not select it
    assert doc["layer_ratio"] == {"patterns": {"layer3.*": 0.75, "layer1.0.conv1": 0},
                                  "groups": {"layer1.0.conv1": 0, "layer3.0.conv1": 0.75, "layer3.1.conv1": 0.75,
                                             "layer3.2.conv1": 0.75}}
    history = load_checkpoint(tmp_path / "flags.safetensors").history[-1]
    assert history["layer_ratio"] == doc["layer_ratio"]

    config = tmp_path / "lr.toml"
    config.write_text('[prune]\nlayer_ratio = { "layer3.*" = 0.75, "layer1.0.conv1" = 0 }\n')
    result = cli(*common, "--config", str(config), "--out", str(tmp_path / "table.safetensors"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "table.safetensors").read_bytes() == (tmp_path / "flags.safetensors").read_bytes()
    config.write_text('[prune]\nlayer_ratio = ["layer3.*=0.75", "layer1.0.conv1=0"]\n')
    result = cli(*common, "--config", str(config), "--out", str(tmp_path / "list.safetensors"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "list.safetensors").read_bytes() == (tmp_path / "flags.safetensors").read_bytes()


def test_layer_ratio_with_target_flops_is_fixed_outside_the_ranking(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "r20.pt"
    torch.save(build_model(parse_arch("cifar_resnet20")).state_dict(), ckpt)
    result = cli("prune", str(ckpt), "--arch", "cifar_resnet20", "--target-flops", "0.4", "--layer-ratio", "layer3.*=0.25",
                 "--layer-ratio", "layer1.*=0", "--dry-run", "--json", "-")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    widths = {r["name"]: (r["out_before"], r["out_after"]) for r in doc["layers"]}
    assert all(widths[f"layer3.{i}.conv1"] == (64, 48) for i in range(3))
    assert all(widths[f"layer1.{i}.conv1"] == (16, 16) for i in range(3))
    assert doc["achieved"]["macs_reduction_pct"] >= 39  # the ranking of the other groups made up the rest


def test_normalisation_is_recorded_and_reused(digits_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first = tmp_path / "first.safetensors"
    result = cli("prune", str(digits_ckpt), "--arch", "digits_cnn", "--ratio", "0.25", "--mean", "0.5", "--std", "0.25",
                 "--out", str(first))
    assert result.exit_code == 0, result.stderr
    loaded = load_checkpoint(first)
    assert loaded.meta["normalization"] == {"mean": [0.5], "std": [0.25]} and loaded.input_shape == (1, 8, 8)

    def prune_again(name: str, *extra: str) -> dict:
        report = tmp_path / f"{name}.json"
        res = cli("prune", str(first), "--ratio", "0.25", "--val-data", "digits:test", "--val-images", "200",
                  "--out", str(tmp_path / f"{name}.safetensors"), "--json", str(report), *extra)
        assert res.exit_code == 0, res.stderr
        return json.loads(report.read_text())["accuracy"]

    assert prune_again("recorded") == prune_again("explicit", "--mean", "0.5", "--std", "0.25")
    prune_again("other", "--mean", "0", "--std", "1")
    assert load_checkpoint(tmp_path / "recorded.safetensors").meta["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert load_checkpoint(tmp_path / "other.safetensors").meta["normalization"] == {"mean": [0.0], "std": [1.0]}

    def scores(name: str, *extra: str) -> dict[str, torch.Tensor]:
        res = cli("score", str(first), "--criterion", "taylor", "--data", "digits:train", "--calib-batches", "1",
                  "--device", "cpu",  # compared bit for bit: CUDA's backward kernels are not deterministic
                  "--out", str(tmp_path / f"{name}.scores.safetensors"), *extra)
        assert res.exit_code == 0, res.stderr
        return load_file(tmp_path / f"{name}.scores.safetensors")

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    recorded = scores("recorded")
    assert same(recorded, scores("explicit", "--mean", "0.5", "--std", "0.25"))  # no flags: the recorded values
    assert not same(recorded, scores("other", "--mean", "0", "--std", "1"))  # a flag wins


def test_default_outputs_and_their_permissions(digits_ckpt: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    ckpt = shared / "model.pt"
    ckpt.write_bytes(digits_ckpt.read_bytes())
    old = os.umask(0o022)
    try:
        # score, prune and finetune write to the working directory (the checkpoint's folder may be read-only)
        shared.chmod(0o555)
        try:
            scored = cli("score", str(ckpt), "--arch", "digits_cnn", "--criterion", "l1")
            pruned = cli("prune", str(ckpt), "--arch", "digits_cnn", "--ratio", "0.5")
            tuned = cli("finetune", "model.pruned.safetensors", "--data", "digits:train", "--max-steps", "1",
                        "--batch-size", "16")
        finally:
            shared.chmod(0o755)
        for result in (scored, pruned, tuned):
            assert result.exit_code == 0, result.stderr
        outputs = [Path("model.pt.l1.scores.safetensors"), Path("model.pruned.safetensors"),
                   Path("model.pruned.finetuned.safetensors")]
        assert all(path.is_file() for path in outputs) and sorted(p.name for p in shared.iterdir()) == ["model.pt"]
        for path in outputs:  # every output honours the umask (safetensors were 0600)
            assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))
    finally:
        os.umask(old)

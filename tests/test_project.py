"""Working in a project directory: config files, precedence, chaining `score` → `prune`,
`chanprune config` / `init`, shell completion, and `chanprune run` pipelines with resumption.

Everything uses the built-in `digits_cnn` (1×8×8 inputs) and the bundled digits data, in a fresh
temporary directory per test (config discovery looks at the working directory and its parents).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.models import build_model, parse_arch

runner = CliRunner()


def cli(*args: str) -> object:
    return runner.invoke(app, list(args), env={"CHANPRUNE_DEBUG": None, "CHANPRUNE_NO_PROJECT_CONFIG": None})


def chanprune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real entry point, as a shell runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("CHANPRUNE_DEBUG", "CHANPRUNE_NO_PROJECT_CONFIG")}
    return subprocess.run([sys.executable, "-m", "chanprune_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding an untrained digits_cnn saved as a plain state dict."""
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("digits_cnn", None)).state_dict(), tmp_path / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def json_of(result: object) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def settings_of(doc: dict, command: str) -> dict[str, tuple[object, str]]:
    return {row["key"]: (row["value"], row["source"]) for row in doc["commands"][command]}


# --------------------------------------------------------------------------------------------
# the two-line flow (score, then a bare prune), through the real entry point


def test_score_then_prune_with_no_other_arguments(project: Path) -> None:
    (project / "chanprune.toml").write_text('arch = "digits_cnn"\ndata = "digits:train"\n[score]\ncalib_batches = 2\n')
    scored = chanprune("score", "ckpt.pt", "--criterion", "sensitivity", cwd=project)
    assert scored.returncode == 0, scored.stderr
    scores = project / "ckpt.pt.sensitivity.scores.safetensors"
    assert scores.is_file()
    state = json.loads((project / ".chanprune" / "last.json").read_text())
    assert state["score"]["scores"] == str(scores) and state["score"]["checkpoint"] == str(project / "ckpt.pt")

    pruned = chanprune("prune", "--ratio", "0.5", "--json", "p.json", cwd=project)
    assert pruned.returncode == 0, pruned.stderr
    said = [line for line in pruned.stderr.splitlines() if line.strip() and not line.startswith("progress: ")]
    assert len(said) == 1 and "ckpt.pt" in said[0] and "sensitivity scores" in said[0], pruned.stderr
    assert (project / "ckpt.pruned.safetensors").is_file()
    report = json.loads((project / "p.json").read_text())
    assert report["after"]["macs"] < report["before"]["macs"] and report["verify"]["passed"]

    again = chanprune("prune", "--ratio", "0.5", cwd=project)  # the default output is never overwritten
    assert again.returncode == 2 and "--force" in again.stderr


def test_prune_with_nothing_known_shows_the_full_command(project: Path) -> None:
    result = chanprune("prune", "--ratio", "0.5", cwd=project)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "chanprune score CKPT --criterion" in lines[0] and "chanprune prune --ratio 0.5" in lines[0]


def test_prune_of_another_checkpoint_ignores_the_last_scores(project: Path) -> None:
    assert cli("score", "ckpt.pt", "--arch", "digits_cnn", "--criterion", "l1").exit_code == 0
    torch.save(build_model(parse_arch("digits_cnn", None)).state_dict(), project / "other.pt")
    result = cli("prune", "other.pt", "--arch", "digits_cnn", "--ratio", "0.25", "--json", "-")
    doc = json_of(result)
    assert doc["criterion"] == "l1" and "last 'chanprune score'" not in result.stderr
    assert (project / "other.pruned.safetensors").is_file()


def test_prune_of_the_scored_checkpoint_uses_the_default_and_says_which(project: Path) -> None:
    """A checkpoint given explicitly is pruned as documented (--criterion l1 by default), not with
    whatever an earlier `score` left here; the line says so and how to use those scores."""
    assert cli("score", "ckpt.pt", "--arch", "digits_cnn", "--criterion", "fpgm").exit_code == 0
    result = cli("prune", "ckpt.pt", "--arch", "digits_cnn", "--ratio", "0.25", "--out", "p.safetensors", "--json", "-")
    assert json_of(result)["criterion"] == "l1"
    assert "scoring with l1, the default" in result.stderr
    assert "pass --scores ckpt.pt.fpgm.scores.safetensors to use them" in result.stderr


# --------------------------------------------------------------------------------------------
# precedence: flag > --config FILE > discovered file > built-in default


def test_precedence_of_flag_config_file_discovered_file_and_default(project: Path) -> None:
    (project / "chanprune.toml").write_text('arch = "digits_cnn"\nseed = 1\nbatch_size = 8\n[prune]\nround_to = 2\nmin_keep = 0.2\n')
    (project / "ci.toml").write_text("seed = 2\n[prune]\nround_to = 4\n")
    doc = json_of(cli("config", "prune", "--config", "ci.toml", "--json", "-"))
    got = settings_of(doc, "prune")
    assert got["round_to"] == (4, "ci.toml [prune]")  # --config beats the discovered file
    assert got["seed"] == (2, "ci.toml")
    assert got["min_keep"] == (0.2, "chanprune.toml [prune]")  # discovered beats the default
    assert got["batch_size"] == (8, "chanprune.toml")
    assert got["arch"] == ("digits_cnn", "chanprune.toml")
    assert got["workers"] == (0, "default")

    # the same values reach the command; a flag beats them all
    pruned = json_of(cli("prune", "ckpt.pt", "--criterion", "l1", "--ratio", "0.5", "--config", "ci.toml",
                         "--round-to", "8", "--json", "-", "--out", "a.safetensors"))
    widths = [layer["out_after"] for layer in pruned["layers"] if layer["out_after"] != layer["out_before"]]
    assert widths and all(w % 8 == 0 for w in widths), widths
    assert pruned["seed"] == 2


def test_command_table_beats_shared_keys_and_paths_are_relative_to_the_file(project: Path) -> None:
    sub = project / "work" / "deeper"
    sub.mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.chanprune]\narch = "digits_cnn"\n'
                                            'checkpoint = "ckpt.pt"\nseed = 3\n[tool.chanprune.prune]\nseed = 4\n')
    os.chdir(sub)
    doc = json_of(cli("config", "prune", "--json", "-"))
    got = settings_of(doc, "prune")
    assert got["seed"][0] == 4 and got["seed"][1].endswith("[tool.chanprune] [prune]")
    assert got["checkpoint"][0] == str(project / "ckpt.pt")  # found from a subdirectory, resolved against the file
    result = cli("analyze", "--json", "-")  # checkpoint and arch from pyproject.toml
    assert json_of(result)["model"]["params"] > 0


@pytest.mark.parametrize(("text", "fragment"), [
    ("ratoi = 0.5\n", "did you mean 'ratio'"),
    ("[prune]\nratoi = 0.5\n", "[prune] has no option 'ratoi'"),
    ("[prune]\nratio = \n", "not valid TOML"),
    ("prune = 3\n", "must be a table"),
])
def test_config_mistakes_are_one_line_errors(project: Path, text: str, fragment: str) -> None:
    (project / "chanprune.toml").write_text(text)
    result = cli("analyze", "ckpt.pt", "--arch", "digits_cnn")
    assert result.exit_code == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_config_file_is_an_error(project: Path) -> None:
    result = cli("analyze", "ckpt.pt", "--arch", "digits_cnn", "--config", "nope.toml")
    assert result.exit_code == 2 and "nope.toml does not exist" in result.stderr


def test_help_works_even_with_a_broken_project_file(project: Path) -> None:
    (project / "chanprune.toml").write_text("[prune\n")
    assert cli("prune", "--help").exit_code == 0


# --------------------------------------------------------------------------------------------
# init, completion


def test_init_writes_a_commented_file_that_the_commands_accept(project: Path) -> None:
    result = cli("init", "--checkpoint", "ckpt.pt", "--arch", "digits_cnn", "--data", "digits:train",
                 "--val-data", "digits:test", "--criterion", "fpgm", "--target-flops", "0.4", "--max-acc-drop", "2")
    assert result.exit_code == 0, result.output
    text = (project / "chanprune.toml").read_text()
    assert text.count("\n#") > 10  # commented
    got = {name: settings_of(json_of(cli("config", name, "--json", "-")), name) for name in ("score", "prune", "bench")}
    assert got["score"]["criterion"][0] == "fpgm"
    assert got["prune"]["target_flops"][0] == 0.4 and got["prune"]["ratio"][0] is None
    assert got["bench"]["max_acc_drop"][0] == 2.0 and got["bench"]["data"][0] == "digits:test"
    assert cli("init").exit_code == 2  # never overwrites without --force
    assert cli("init", "--force").exit_code == 0


def test_init_keeps_training_and_evaluation_data_apart(project: Path) -> None:
    common = ("init", "--checkpoint", "ckpt.pt", "--arch", "digits_cnn", "--data", "digits:train")
    refused = cli(*common, "--max-acc-drop", "1")  # a gate on the training images would pass too easily
    assert refused.exit_code == 2 and "give them with --val-data" in refused.stderr
    assert not (project / "chanprune.toml").exists()

    assert cli(*common, "--val-data", "digits:test", "--max-acc-drop", "1").exit_code == 0
    got = {name: settings_of(json_of(cli("config", name, "--json", "-")), name)
           for name in ("analyze", "score", "prune", "finetune", "bench")}
    assert [got[name]["data"][0] for name in ("score", "prune", "finetune")] == ["digits:train"] * 3
    assert [got[name]["data"][0] for name in ("analyze", "bench")] == ["digits:test"] * 2
    assert got["prune"]["val_data"][0] == got["finetune"]["val_data"][0] == "digits:test"

    assert cli(*common, "--force").exit_code == 0  # no evaluation data: nothing evaluates on the training images
    got = {name: settings_of(json_of(cli("config", name, "--json", "-")), name) for name in ("analyze", "bench")}
    assert got["analyze"]["data"][0] is None and got["bench"]["data"][0] is None


def test_shell_completion_of_commands_and_options(project: Path) -> None:
    env = {**os.environ, "_CHANPRUNE_COMPLETE": "complete_bash", "COMP_WORDS": "chanprune prune --rat", "COMP_CWORD": "2"}
    script = [sys.executable, "-c", "import sys; from chanprune_cli.cli import main; sys.exit(main())"]
    result = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
    assert "--ratio" in result.stdout.split()
    env.update(COMP_WORDS="chanprune ex", COMP_CWORD="1")
    result = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.split() == ["export"]


# --------------------------------------------------------------------------------------------
# chanprune run


PIPELINE = """
checkpoint = "ckpt.pt"
arch = "digits_cnn"
data = "digits:train"
mean = 0.5
std = 0.5
[score]
criterion = "l1"
[prune]
ratio = 0.5
[finetune]
max_steps = 3
batch_size = 16
data = "{finetune_data}"
[export]
format = "onnx"
[bench]
data = "digits:test"
batch_sizes = "1,4"
repeats = 2
warmup = 0
"""


def test_run_resumes_after_a_failure(project: Path) -> None:
    (project / "pipe.toml").write_text(PIPELINE.format(finetune_data="missing-folder"))
    failed = cli("run", "pipe.toml", "--dir", "out")
    assert failed.exit_code == 2 and "missing-folder" in failed.stderr
    done = json.loads((project / "out" / "run.json").read_text())["stages"]
    assert set(done) == {"analyze", "score", "prune"}
    assert not (project / "out" / "finetuned.safetensors").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (project / "out").iterdir()}

    (project / "pipe.toml").write_text(PIPELINE.format(finetune_data="digits:train"))
    resumed = cli("run", "pipe.toml", "--dir", "out", "--json", "-")
    doc = json_of(resumed)
    status = {s["name"]: s["status"] for s in doc["stages"]}
    assert status == {"analyze": "skipped", "score": "skipped", "prune": "skipped",
                      "finetune": "ran", "export": "ran", "bench": "ran"}
    assert all((project / "out" / n).stat().st_mtime_ns == t for n, t in mtimes.items() if n != "run.json")
    bench = json.loads((project / "out" / "bench.json").read_text())
    assert [Path(m["path"]).name for m in bench["models"]] == ["ckpt.pt", "finetuned.safetensors"]

    # a changed value re-runs the stage it feeds and everything downstream of a changed output
    changed = json_of(cli("run", "pipe.toml", "--dir", "out", "--set", "prune.ratio=0.25", "--json", "-"))
    status = {s["name"]: s["status"] for s in changed["stages"]}
    assert status["analyze"] == status["score"] == "skipped"
    assert status["prune"] == status["finetune"] == status["bench"] == "ran"

    # a run that fails leaves no earlier output that could pass for one of its own: not the reports and
    # models of the stages after the one that ran, nor the summary
    summary = project / "summary.json"
    summary.write_text("{}")  # as an earlier run's --json summary
    failed = cli("run", "pipe.toml", "--dir", "out", "--set", "prune.ratio=0.75", "--set", "finetune.data=missing-folder",
                 "--json", str(summary))
    assert failed.exit_code == 2 and "missing-folder" in failed.stderr
    assert sorted(p.name for p in (project / "out").iterdir()) == [
        "analyze.json", "prune.json", "pruned.safetensors", "run.json", "score.json", "scores.safetensors"]
    assert not summary.exists()
    removed = next(line for line in failed.stdout.splitlines() if line.startswith("[3/6] prune: removed "))
    assert all(name in removed for name in ("finetuned.safetensors", "model.onnx", "bench.json")), removed


def test_run_gate_failure_exits_3_and_keeps_the_reports(project: Path) -> None:
    (project / "pipe.toml").write_text(PIPELINE.format(finetune_data="digits:train")
                                       + "min_speedup = 1000\n" + '[run]\nstages = ["score", "prune", "bench"]\n')
    result = cli("run", "pipe.toml", "--dir", "out", "--json", "out/summary.json")
    assert result.exit_code == 3, result.output
    gates = json.loads((project / "out" / "bench.json").read_text())["gates"]
    assert [g["passed"] for g in gates] == [False]
    assert "bench" not in json.loads((project / "out" / "run.json").read_text())["stages"]
    # the run summary is written too: a CI job that fails on a gate still has it as an artifact
    summary = json.loads((project / "out" / "summary.json").read_text())
    assert summary["passed"] is False
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("score", "ran"), ("prune", "ran"), ("bench", "failed")]
    assert "--min-speedup 1000" in summary["stages"][-1]["error"]
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 gate(s) failed")


def test_run_makes_the_run_directory_its_summary_goes_in(project: Path) -> None:
    """The README's CI line on a fresh runner: --json names a file in the --dir the run creates."""
    (project / "pipe.toml").write_text(PIPELINE.format(finetune_data="digits:train") + '[run]\nstages = ["score", "prune"]\n')
    result = cli("run", "pipe.toml", "--dir", "build/compress", "--json", "build/compress/summary.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "build" / "compress" / "summary.json").read_text())
    assert summary["passed"] is True and [s["status"] for s in summary["stages"]] == ["ran", "ran"]

    # elsewhere the folder must exist, and the summary must not replace a stage's report or the run state
    for json_out, fragment in (("missing/summary.json", "missing does not exist"),
                               ("fresh/prune.json", "both name fresh/prune.json"),
                               ("fresh/run.json", "both name fresh/run.json")):
        failed = cli("run", "pipe.toml", "--dir", "fresh", "--json", json_out)
        assert failed.exit_code == 2 and fragment in failed.stderr, failed.output
        assert not (project / "fresh").exists() and not (project / "missing").exists()


def test_stage_banners_are_commands_that_do_the_same(project: Path) -> None:
    """Every option a stage gets from the config is in its banner, quoted: pasted into a shell
    (no config file involved), the command writes the same bytes."""
    (project / "pipe.toml").write_text('checkpoint = "ckpt.pt"\narch = "digits_cnn"\ndata = "digits:train"\nmean = 0.5\n'
                                       'std = 0.5\nseed = 3\n[score]\ncriterion = "fpgm"\n[prune]\nratio = 0.5\nround_to = 4\n'
                                       'min_keep = 0.25\n[run]\nstages = ["score", "prune"]\n')
    result = cli("run", "pipe.toml", "--dir", "out dir")
    assert result.exit_code == 0, result.output
    banners = {m.group(1): m.group(2) for m in re.finditer(r"^\[\d/2\] (\w+): (.*)$", result.stdout, re.MULTILINE)}
    assert set(banners) == {"score", "prune"}
    assert "'out dir/scores.safetensors'" in banners["score"] and "--criterion fpgm" in banners["score"]
    assert "--round-to 4" in banners["prune"] and "--min-keep 0.25" in banners["prune"]
    for name, output in (("score", "scores.safetensors"), ("prune", "pruned.safetensors")):
        made = (project / "out dir" / output).read_bytes()
        (project / "out dir" / output).unlink()
        argv = shlex.split(banners[name])
        assert argv[:2] == ["chanprune", name]
        again = cli(*argv[1:])
        assert again.exit_code == 0, again.output
        assert (project / "out dir" / output).read_bytes() == made, name


# Sends the process a real SIGINT while training step N+1 runs: the trainer finishes the step,
# saves its state and stops, as after a Ctrl-C at that moment.
CTRL_C_DURING_STEP = """
import os, signal, sys
from chanprune_cli.cli import main
from chanprune_cli.train.trainer import Trainer

step = Trainer._train_step

def interrupted_step(self, *args):
    if self.step == {n}:
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, *args)

Trainer._train_step = interrupted_step
sys.exit(main(sys.argv[1:]))
"""


def test_run_interrupted_in_finetune_resumes_it(project: Path) -> None:
    (project / "pipe.toml").write_text(PIPELINE.format(finetune_data="digits:train").replace(
        "max_steps = 3", "max_steps = 8\nnesterov = false") + '[run]\nstages = ["score", "prune", "finetune"]\n')
    (project / "ctrl_c.py").write_text(CTRL_C_DURING_STEP.format(n=2))
    env = {k: v for k, v in os.environ.items() if k not in ("CHANPRUNE_DEBUG", "CHANPRUNE_NO_PROJECT_CONFIG")}
    stopped = subprocess.run([sys.executable, "ctrl_c.py", "run", "pipe.toml", "--dir", "out", "--rerun"],
                             capture_output=True, text=True, cwd=project, env=env, timeout=600)
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    hint = next(line for line in stopped.stderr.splitlines() if "to continue, type:" in line)
    assert "--resume" not in stopped.stderr  # run has no such option: the line says how to continue the run
    assert "type: chanprune run pipe.toml --dir out " in hint and "--rerun" not in hint  # --rerun would start over
    state = project / "out" / "finetuned.state.pt"
    assert state.is_file() and not (project / "out" / "finetuned.safetensors").exists()
    saved = state.read_bytes()

    resumed = cli("run", "pipe.toml", "--dir", "out")  # the same command, nothing added
    assert resumed.exit_code == 0, resumed.output
    banner = next(line for line in resumed.stdout.splitlines() if line.startswith("[3/3] finetune: "))
    assert "--resume" in banner and "--no-nesterov" in banner
    report = json.loads((project / "out" / "finetune.json").read_text())
    assert report["resumed_from"] == 3 and report["steps"] == 8
    assert not state.exists()

    # a saved state from other settings is not continued: the stage starts over, and says so
    state.write_bytes(saved)
    restarted = cli("run", "pipe.toml", "--dir", "out", "--set", "finetune.lr=0.03")
    assert restarted.exit_code == 0, restarted.output
    assert "finetuned.state.pt is from a run with other inputs or settings; starting over" in restarted.stdout
    assert json.loads((project / "out" / "finetune.json").read_text())["resumed_from"] is None


def test_set_switches_the_target_as_a_flag_would(project: Path) -> None:
    (project / "t.toml").write_text('checkpoint = "ckpt.pt"\narch = "digits_cnn"\n[prune]\nratio = 0.5\n'
                                    '[run]\nstages = ["prune"]\n')
    result = cli("run", "t.toml", "--dir", "out", "--set", "prune.target_flops=0.5")
    assert result.exit_code == 0, result.output
    assert json.loads((project / "out" / "prune.json").read_text())["requested"] == {"target_flops": 0.5}


def test_finetune_export_and_bench_follow_the_newest_model(project: Path) -> None:
    """Project memory beyond prune: given no checkpoint, finetune takes the model the last prune made
    here, export and bench the newest model (bench against its original); each says so."""
    assert cli("prune", "ckpt.pt", "--arch", "digits_cnn", "--ratio", "0.5").exit_code == 0
    tuned = cli("finetune", "--data", "digits:train", "--max-steps", "1", "--batch-size", "16")
    assert tuned.exit_code == 0, tuned.output
    assert "using ckpt.pruned.safetensors, the model the last 'chanprune prune' here made" in tuned.stderr
    exported = cli("export", "--out", "m.safetensors")
    assert exported.exit_code == 0, exported.output
    assert "using ckpt.pruned.finetuned.safetensors, the model the last 'chanprune finetune' here made" in exported.stderr
    assert (project / "m.safetensors").is_file()
    bench = cli("bench", "--arch", "digits_cnn", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--json", "-")
    assert [Path(m["path"]).name for m in json_of(bench)["models"]] == ["ckpt.pt", "ckpt.pruned.finetuned.safetensors"]
    assert "comparing ckpt.pt with ckpt.pruned.finetuned.safetensors" in bench.stderr


def test_init_bounds_the_calibration_of_a_data_driven_criterion(project: Path) -> None:
    """`run` would otherwise score every training image, for minutes, with nothing in the log."""
    assert cli("init", "--criterion", "taylor", "--data", "digits:train", "--out", "taylor.toml").exit_code == 0
    assert cli("init", "--criterion", "l1", "--out", "l1.toml").exit_code == 0
    assert re.search(r"^calib_batches = 20 ", (project / "taylor.toml").read_text(), re.M)
    assert re.search(r"^# calib_batches = 20$", (project / "l1.toml").read_text(), re.M)
    scored = cli("score", "ckpt.pt", "--arch", "digits_cnn", "--criterion", "taylor", "--data", "digits:train")
    assert scored.exit_code == 0, scored.output
    assert re.search(r"scoring with taylor on all 1,43\d images of digits:train \(23 batches of 64\); --calib-batches N",
                     scored.stderr), scored.stderr


def test_run_config_mistakes(project: Path) -> None:
    (project / "a.toml").write_text('arch = "digits_cnn"\n')
    result = cli("run", "a.toml")
    assert result.exit_code == 2 and "names no checkpoint" in result.stderr
    (project / "b.toml").write_text('checkpoint = "ckpt.pt"\narch = "digits_cnn"\n[run]\nstages = ["prun"]\n')
    result = cli("run", "b.toml")
    assert result.exit_code == 2 and "unknown stage" in result.stderr
    (project / "c.toml").write_text('checkpoint = "ckpt.pt"\narch = "digits_cnn"\ncriterion = "l1"\n[prune]\nratio = 0.5\n')
    result = cli("run", "c.toml")
    assert result.exit_code == 2 and "belongs in [score]" in result.stderr

"""`chanprune run CONFIG.toml`: the whole pipeline from one config file, resumable (pipeline.py)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import UserError
from . import options as opt
from .app import app
from .configfiles import check_settings, command_keys, config_files, invoke_command, option_args, option_keys


@app.command(
    epilog=opt.examples(
        ("prune the CIFAR ResNet-56 to half its channels by L1 norm, then benchmark (outputs in runs/resnet56_l1/)",
         "chanprune run sample_configs/resnet56_l1.toml"),
        ("the same with one value changed; stages whose inputs did not change are skipped",
         "chanprune run sample_configs/resnet56_l1.toml --set prune.ratio=0.3"),
        ("a release gate in CI: exit 3 when accuracy drops more than allowed, JSON kept for the artifact",
         "chanprune run sample_configs/ci_gates.toml --dir build/compress --json build/compress/run-summary.json"),
    ),
)
def run(
    ctx: typer.Context,
    config_path: Annotated[str, typer.Argument(metavar="CONFIG.toml", help="Pipeline config: shared keys plus [score], [prune], [finetune], [export], [bench] and [run] tables (see sample_configs/).", show_default=False)],
    run_dir: Annotated[Optional[str], typer.Option("--dir", metavar="DIR", help="Run directory for every stage's output (default: [run] dir, else runs/CONFIG-STEM).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", metavar="A,B,..", help="Only these stages, e.g. score,prune (default: [run] stages, else analyze, score, prune, finetune and export when configured, bench).", show_default=False)] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config value, e.g. --set prune.ratio=0.3 or --set data=val/ (repeatable; highest precedence).", show_default=False)] = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Run every stage even when its outputs are up to date (an interrupted finetune starts over).")] = False,
    json_out: opt.JsonOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Run analyze → score → prune → finetune → export → bench from a config file; re-running resumes."""
    from ..project import pipeline
    from ..project.config import overrides, resolve

    group = ctx.find_root().command
    keys = command_keys(group)
    files = config_files(group, config_path)
    if assignments:
        files.append(overrides(assignments, keys))
    resolved = {name: resolve(name, files, keys) for name in pipeline.STAGE_ORDER}
    settings = {name: {k: s.value for k, s in found.items()} for name, found in resolved.items()}
    run_table = resolve("run", files, keys)
    tables = {name for f in files for name in f.tables}
    chosen = pipeline.choose_stages([s.strip() for s in stages.split(",")] if stages is not None
                                    else _run_value(run_table, "stages"), tables)
    checkpoint = settings["analyze"].get("checkpoint")
    if not checkpoint:
        raise UserError(f"{config_path} names no checkpoint; add a top-level line like checkpoint = \"model.pt\"")
    configured_dir = _run_value(run_table, "dir")
    directory = Path(run_dir or (configured_dir if configured_dir is not None else Path("runs") / Path(config_path).stem))
    if directory.exists() and not directory.is_dir():
        raise UserError(f"run directory {directory} is a file; give a folder with --dir")
    for name in chosen:  # every value of every stage, before the first stage runs
        check_settings(group.get_command(ctx.find_root(), name), resolved[name])
    planned = pipeline.plan(chosen, str(checkpoint), directory, settings)
    _check_stages(ctx, planned, resolved)
    _check_summary_path(json_out, directory, planned)
    if json_out is not None and json_out != "-":  # an earlier run's summary must not pass for this one's
        Path(json_out).unlink(missing_ok=True)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    again = ["chanprune", "run", config_path, "--dir", str(directory),
             *(["--stages", stages] if stages is not None else []),
             *[a for text in assignments or [] for a in ("--set", text)], *(["--json", json_out] if json_out else [])]
    try:
        _run_stages(ctx, config_path, planned, directory, settings, resolved, rerun, json_out, shlex.join(again))
    except BaseException:
        if created and not any(directory.iterdir()):  # a run that failed before any output leaves nothing
            directory.rmdir()
        raise


def _run_value(table: dict[str, Any], key: str) -> Any:
    """A [run] value (stages: a list of names or "a,b"; dir: a path), None when not set."""
    if key not in table:
        return None
    setting = table[key]
    value = setting.value
    if key == "stages" and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    ok = isinstance(value, str) if key == "dir" else isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise UserError(f"{setting.typed(key)} = {value!r}: expected "
                        + ("a folder name" if key == "dir" else "a list of stage names") + "; fix the value")
    return value


def _check_stages(ctx: typer.Context, planned: list[Any], resolved: dict[str, Any]) -> None:
    """Every stage's command checks its values as it would before running, all of them before the
    first stage runs: each is invoked with its arguments and settings under `checking_options`,
    where its recipe stops at its entry. A bad value fails naming where it was set."""
    from ..recipes.steps import OptionsChecked, checking_options

    root = ctx.find_root()
    for stage in planned:
        try:
            with checking_options():
                invoke_command(ctx, stage.name, stage.args, resolved[stage.name])
        except OptionsChecked:
            continue
        except UserError as exc:
            raise UserError(_named(str(exc), root.command.get_command(root, stage.name), stage.name,
                                   resolved[stage.name])) from None


def _named(message: str, command: Any, stage: str, settings: dict[str, Any]) -> str:
    """A stage's error, prefixed with the settings it is about, as the user wrote them: those whose
    option it names (`--set prune.ratio = 1.5: --ratio must be ...`), else those whose text value it
    quotes (`unknown criterion 'magic'`); else with the stage."""
    keys = option_keys(command)

    def flagged(key: str) -> bool:
        flags = [f for f in (*keys[key].opts, *keys[key].secondary_opts) if f.startswith("--")]
        return any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", message) for flag in flags)

    named = [key for key in settings if flagged(key)] or [
        key for key, setting in settings.items() if isinstance(setting.value, str) and repr(setting.value) in message]
    where = " and ".join(f"{settings[key].typed(key)} = {settings[key].value!r}" for key in named)
    return f"{where or f'in the {stage} stage'}: {message}"


def _check_summary_path(json_out: str | None, directory: Path, planned: list[Any]) -> None:
    """The summary (--json) is rewritten by every run; its folder must exist, or be the run directory
    this run creates, and it must not be one of the stages' own outputs."""
    from ..project.pipeline import RUN_STATE
    from ..recipes.steps import check_distinct_outputs, check_json_report

    if json_out is None or json_out == "-":
        return
    if not (os.path.abspath(Path(json_out).parent) == os.path.abspath(directory) and not directory.exists()):
        check_json_report(json_out, True)
    check_distinct_outputs(*[(f"the {s.name} stage's output", p) for s in planned for p in s.outputs],
                           ("the run state", str(directory / RUN_STATE)), ("--json", json_out))


def _run_stages(ctx: typer.Context, config_path: str, planned: list[Any], directory: Path,
                settings: dict[str, dict[str, Any]], resolved: dict[str, Any], rerun: bool, json_out: str | None,
                again: str) -> None:
    from rich.text import Text

    from ..errors import GateFailed
    from ..project import pipeline
    from ..report import run as report
    from ..support.console import make_console

    if rerun:
        (directory / pipeline.RUN_STATE).unlink(missing_ok=True)
    ctx.meta[opt.IN_RUN_KEY] = True
    console = make_console(stderr=json_out == "-")
    root = ctx.find_root()
    current: list[Any] = []

    def say(line: str) -> None:
        console.print(Text(line, style="bold"), soft_wrap=True)  # one line: the command must paste whole

    def describe(stage: Any) -> str:
        command = root.command.get_command(root, stage.name)
        return shlex.join(["chanprune", stage.name, *stage.args, *option_args(command, stage.args, resolved[stage.name])])

    def run_stage(stage: Any) -> None:
        current[:] = [stage]
        invoke_command(ctx, stage.name, stage.args, resolved[stage.name])

    # With --json -, stdout carries only the JSON document: the stages' tables go to stderr too.
    quiet = contextlib.redirect_stdout(sys.stderr) if json_out == "-" else contextlib.nullcontext()
    try:
        with quiet:
            results = pipeline.execute(planned, directory, settings, run_stage, say, describe)
    except (KeyboardInterrupt, typer.Exit) as stop:  # finetune ends a signal-stopped run with Exit(128 + signal)
        if isinstance(stop, typer.Exit) and stop.exit_code == 0:
            raise
        stage = current[0] if current else None
        resumable = stage is not None and stage.resumable is not None and os.path.exists(stage.resumable)
        typer.echo(f"run stopped in stage {stage.name if stage else 'setup'}; to continue, type: {again}"
                   + (f" (finished stages are skipped; {stage.name} resumes from {stage.resumable})" if resumable
                      else " (finished stages are skipped)"), err=True)
        raise
    report.show(results, config_path, directory, json_out)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise GateFailed(failed[0].error or f"the {failed[0].name} stage failed")

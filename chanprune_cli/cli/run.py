"""`chanprune run CONFIG.toml`: the whole pipeline from one config file, resumable (pipeline.py)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import UserError
from .app import app
from .configfiles import command_keys, config_files, invoke_command
from .options import OUTPUT_PANEL, DebugOpt, JsonOpt, examples


@app.command(
    epilog=examples(
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
    run_dir: Annotated[Optional[str], typer.Option("--dir", metavar="DIR", help="Run directory for every stage's output (default: [run] dir, else runs/CONFIG-STEM).", rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", metavar="A,B,..", help="Only these stages, e.g. score,prune (default: [run] stages, else analyze, score, prune, finetune and export when configured, bench).", show_default=False)] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config value, e.g. --set prune.ratio=0.3 or --set data=val/ (repeatable; highest precedence).", show_default=False)] = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Run every stage even when its outputs are up to date.")] = False,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run analyze → score → prune → finetune → export → bench from a config file; re-running resumes."""
    from ..project import pipeline
    from ..project.config import overrides, resolve
    from ..recipes.steps import check_json_report

    check_json_report(json_out, True)  # the summary is rewritten by every run; its folder must exist
    group = ctx.find_root().command
    keys = command_keys(group)
    files = config_files(group, config_path)
    if assignments:
        files.append(overrides(assignments, keys))
    resolved = {name: resolve(name, files, keys) for name in pipeline.STAGE_ORDER}
    settings = {name: {k: s.value for k, s in found.items()} for name, found in resolved.items()}
    run_table = resolve("run", files, keys)
    tables = {name for f in files for name in f.tables}
    requested = stages.split(",") if stages is not None else run_table["stages"].value if "stages" in run_table else None
    chosen = pipeline.choose_stages(requested, tables)
    checkpoint = settings["analyze"].get("checkpoint")
    if not checkpoint:
        raise UserError(f"{config_path} names no checkpoint; add a top-level line like checkpoint = \"model.pt\"")
    directory = Path(run_dir or (run_table["dir"].value if "dir" in run_table else Path("runs") / Path(config_path).stem))
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _run_stages(ctx, config_path, chosen, checkpoint, directory, settings, resolved, rerun, json_out)
    except BaseException:
        if created and not any(directory.iterdir()):  # a run that failed before any output leaves nothing
            directory.rmdir()
        raise


def _run_stages(ctx: typer.Context, config_path: str, chosen: list[str], checkpoint: Any, directory: Path,
                settings: dict[str, dict[str, Any]], resolved: dict[str, Any], rerun: bool, json_out: str | None) -> None:
    from ..project import pipeline
    from ..report import json_document, make_console, render_run, write_json

    if rerun:
        (directory / pipeline.RUN_STATE).unlink(missing_ok=True)
    planned = pipeline.plan(chosen, str(checkpoint), directory, settings)
    console = make_console(stderr=json_out == "-")

    def say(line: str) -> None:
        console.rule(f"[bold]{line}", align="left")

    # With --json -, stdout carries only the JSON document: the stages' tables go to stderr too.
    quiet = contextlib.redirect_stdout(sys.stderr) if json_out == "-" else contextlib.nullcontext()
    with quiet:
        results = pipeline.execute(planned, directory, settings, lambda s: invoke_command(ctx, s.name, s.args, resolved[s.name]), say)
    render_run(results, directory, console)
    if json_out is not None:
        body = {"config": config_path, "run_dir": str(directory),
                "stages": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2), "outputs": r.outputs} for r in results]}
        write_json(json_document("run", body, seed=None), json_out)

"""`chanprune run`: analyze → score → prune → finetune → export → bench as one resumable pipeline.

Every stage is the real subcommand with its inputs and outputs placed in the run directory; the
rest of its options come from the config file like for a single command. A stage is skipped when
its outputs exist and its fingerprint (argument list, resolved settings, SHA-256 of its input
files) equals the one recorded when it last succeeded, so re-running after a failure or an edit
resumes where something changed. Before a stage runs, its outputs from an earlier run and those of
every later stage that reads them are deleted, so a run that fails or is interrupted leaves no
earlier result that could pass for one of this run (the commands write atomically, so a failed
stage leaves nothing of its own either). A stage that stops with a resumable state (finetune:
Ctrl-C, SIGTERM or an error mid-training) is recorded with its fingerprint, and the next run with
the same fingerprint continues it (`--resume`) instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import GateFailed, UserError
from ..support.fsutil import write_text_atomic
from ..train.outputs import OutputPaths

STAGE_ORDER = ("analyze", "score", "prune", "finetune", "export", "bench")
# Stages that need a table in the config to be meaningful (finetune needs training data, export a
# format); the others run by default.
OPTIONAL_STAGES = ("finetune", "export")
EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts.pt", "safetensors": ".export.safetensors"}
RUN_STATE = "run.json"


@dataclass(frozen=True)
class Stage:
    name: str
    args: list[str]  # the subcommand's arguments (positional + options), as typed after `chanprune NAME`
    inputs: list[str]  # files whose content the stage depends on
    outputs: list[str]  # files the stage must leave behind
    resumable: str | None = None  # the state file an interrupted run of the stage leaves (continued with --resume)


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "skipped" | "failed" (its gates; the run then exits 3)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    error: str | None = None  # why it failed


def choose_stages(requested: Sequence[str] | None, tables: Mapping[str, Any]) -> list[str]:
    """The stages to run, in pipeline order: `[run] stages`, else the default set."""
    if requested is None:
        return [s for s in STAGE_ORDER if s not in OPTIONAL_STAGES or s in tables]
    unknown = [s for s in requested if s not in STAGE_ORDER]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)} in [run] stages; choose from {', '.join(STAGE_ORDER)}")
    if not requested:
        raise UserError("[run] stages is empty; list at least one of " + ", ".join(STAGE_ORDER))
    return [s for s in STAGE_ORDER if s in requested]


def plan(stages: Sequence[str], checkpoint: str, run_dir: Path, settings: Mapping[str, Mapping[str, Any]]) -> list[Stage]:
    """Stage argument lists wiring each stage's output into the next; `settings`: per stage, the
    option values the config files give it (to add what a stage needs and was not configured)."""
    d = run_dir
    out: list[Stage] = []
    model = checkpoint  # the newest model: pruned, then fine-tuned
    scores: str | None = None
    for name in stages:
        given = settings.get(name, {})
        js = str(d / f"{name}.json")
        if name == "analyze":
            out.append(Stage(name, [model, "--json", js, "--force"], [model], [js]))
        elif name == "score":
            scores = str(d / "scores.safetensors")
            extra = [] if "criterion" in given else ["--criterion", "l1"]
            out.append(Stage(name, [model, *extra, "--out", scores, "--json", js, "--force"], [model], [scores, js]))
        elif name == "prune":
            if scores is not None and "criterion" in given:
                raise UserError("in a run, 'criterion' belongs in [score] (prune uses the score stage's scores); "
                                "move it out of [prune] / the top level")
            if not {"ratio", "target_flops", "target_latency"} & set(given):
                raise UserError("the prune stage needs ratio, target_flops or target_latency in [prune]; "
                                "e.g. add 'ratio = 0.5'")
            pruned = str(d / "pruned.safetensors")
            source = ["--scores", scores] if scores is not None else []
            out.append(Stage(name, [model, *source, "--out", pruned, "--json", js, "--force"],
                             [model] + ([scores] if scores else []), [pruned, js]))
            model = pruned
        elif name == "finetune":
            tuned = str(d / "finetuned.safetensors")
            out.append(Stage(name, [model, "--out", tuned, "--json", js, "--force"], [model], [tuned, js],
                             resumable=str(OutputPaths.for_out(tuned).state)))
            model = tuned
        elif name == "export":
            fmt = str(given.get("format", "onnx"))
            exported = str(d / ("model" + EXPORT_SUFFIX.get(fmt, "." + fmt)))
            extra = [] if "format" in given else ["--format", fmt]
            out.append(Stage(name, [model, *extra, "--out", exported, "--json", js, "--force"], [model], [exported, js]))
        elif name == "bench":
            models = [checkpoint] if model == checkpoint else [checkpoint, model]
            out.append(Stage(name, [*models, "--json", js, "--force"], models, [js]))
    return out


def stale_outputs(stages: Sequence[Stage], index: int) -> list[str]:
    """What running `stages[index]` makes stale: its own outputs and those of every later stage
    that reads one of them, directly or through another."""
    changing = set(stages[index].outputs)
    stale = list(stages[index].outputs)
    for later in stages[index + 1:]:
        if changing & set(later.inputs):
            changing |= set(later.outputs)
            stale += later.outputs
    return stale


def file_digest(path: str) -> str | None:
    """SHA-256 of a file; None when it cannot be read (the stage itself then reports why)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def fingerprint(stage: Stage, settings: Mapping[str, Any]) -> str:
    doc = {"args": stage.args, "settings": {k: settings[k] for k in sorted(settings)},
           "inputs": {p: file_digest(p) for p in stage.inputs}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def read_run_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / RUN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def execute(stages: Sequence[Stage], run_dir: Path, settings: Mapping[str, Mapping[str, Any]],
            run_stage: Callable[[Stage], None], say: Callable[[str], None],
            describe: Callable[[Stage], str]) -> list[StageResult]:
    """Run the stages in order, skipping those that are up to date; the run state is saved after
    every stage that succeeds, so a failure keeps the finished stages' records. `describe`: the
    stage's command line, for its banner. A failed gate ends the run with a "failed" result (the
    caller reports the run, then exits 3); any other failure propagates."""
    state = read_run_state(run_dir)
    done: dict[str, Any] = state.setdefault("stages", {})
    interrupted: dict[str, Any] = state.setdefault("interrupted", {})
    results: list[StageResult] = []
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage.name}"
        key = fingerprint(stage, settings.get(stage.name, {}))
        record = done.get(stage.name)
        if isinstance(record, dict) and record.get("fingerprint") == key and all(os.path.exists(p) for p in stage.outputs):
            say(f"{tag}: up to date, skipped")
            results.append(StageResult(stage.name, "skipped", outputs=stage.outputs))
            continue
        invoked = stage
        if stage.resumable is not None and os.path.exists(stage.resumable):
            if interrupted.get(stage.name) == key:
                invoked = replace(stage, args=[*stage.args, "--resume"])
            else:  # its inputs or settings changed since: continuing would mix two runs
                say(f"{tag}: {stage.resumable} is from a run with other inputs or settings; starting over")
        removed = [path for path in stale_outputs(stages, i - 1) if os.path.exists(path)]
        for path in removed:
            os.remove(path)
        later = [path for path in removed if path not in stage.outputs]
        if later:
            say(f"{tag}: removed {', '.join(later)}: made from this stage's earlier outputs")
        say(f"{tag}: {describe(invoked)}")
        start = time.perf_counter()
        try:
            run_stage(invoked)
        except GateFailed as exc:
            results.append(StageResult(stage.name, "failed", time.perf_counter() - start, stage.outputs, str(exc)))
            return results
        except BaseException:
            if stage.resumable is not None and os.path.exists(stage.resumable):
                interrupted[stage.name] = key
                write_text_atomic(run_dir / RUN_STATE, json.dumps(state, indent=2) + "\n")
            raise
        seconds = time.perf_counter() - start
        interrupted.pop(stage.name, None)
        done[stage.name] = {"fingerprint": key, "outputs": stage.outputs, "seconds": round(seconds, 2),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(run_dir / RUN_STATE, json.dumps(state, indent=2) + "\n")
        results.append(StageResult(stage.name, "ran", seconds, stage.outputs))
    return results

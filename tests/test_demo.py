"""The built-in demo (`make demo`) end to end, in a temporary directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "chanprune_cli.demo", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

    # Stage 1 saved a plain state-dict checkpoint that loads without pickle.
    ckpt = torch.load(out / "digits_cnn.pt", weights_only=True)
    assert ckpt["arch"] == "digits_cnn"
    assert "conv1.weight" in ckpt["state_dict"]

    # Stage 2 ran the whole pipeline with `chanprune run`: every stage's report is in run/.
    run = out / "run"
    assert "$ chanprune run" in proc.stdout
    summary = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["analyze", "score", "prune", "finetune", "export", "bench"]
    doc = json.loads((run / "analyze.json").read_text())
    assert doc["accuracy"]["images"] > 300  # the whole digits test split
    assert doc["accuracy"]["top1"] > 90
    prune = json.loads((run / "prune.json").read_text())
    assert prune["verify"]["passed"] and prune["after"]["macs"] < 0.55 * prune["before"]["macs"]
    # Fine-tuning recovers the pruned model (~19 % right after pruning) to > 90 %.
    assert json.loads((run / "finetune.json").read_text())["final"]["top1"] > 90
    assert json.loads((run / "export.json").read_text())["passed"]
    bench = json.loads((run / "bench.json").read_text())
    assert len(bench["models"]) == 2 and [g["passed"] for g in bench["gates"]] == [True]
    # ... and the final bench table is what the demo prints last.
    tail = proc.stdout[proc.stdout.rindex("[6/6] bench"):]
    assert "speed-up" in tail and "gate" in tail

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

    # Stage 2 ran `chanprune analyze` with accuracy: table on stdout, JSON report on disk.
    assert "$ chanprune analyze" in proc.stdout
    assert "conv1" in proc.stdout and "top-1" in proc.stdout
    doc = json.loads((out / "analyze.json").read_text())
    assert doc["accuracy"]["images"] > 300  # the whole digits test split
    assert doc["accuracy"]["top1"] > 90

    # The finetune stage recovers the pruned model (~19 % right after pruning) to > 90 %.
    assert "$ chanprune finetune" in proc.stdout
    tuned = json.loads((out / "finetune.json").read_text())
    assert tuned["final"]["top1"] > 90
    assert (out / "digits_cnn.finetuned.safetensors").exists()

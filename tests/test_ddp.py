"""`chanprune finetune` and `chanprune score` under torchrun: 2 CPU processes (gloo) give the
single-process result.

Same seed, same global batch: every global batch is the same slice of the same permutation with
the same per-sample augmentation, each rank computes the gradient of its half and DDP averages
them, so the weights after N steps equal a one-process run up to floating-point summation order.
The model has no BatchNorm (per-rank batch statistics would differ by design; SyncBatchNorm needs
GPUs). A soft-filter-pruning schedule runs too: its selections, the physical removal and the
sharded validation must agree across the two runs. `score` splits the calibration batches over the
ranks and reduces the scores weighted by batches: exact for a batch-mean criterion (taylor).

One torchrun launch runs both commands through a small driver (`chanprune_cli.cli.main` twice in
one process group), which keeps the test well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.checkpoint import load_checkpoint
from chanprune_cli.cli import app

TINYNET = '''
from torch import nn


def make(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''

DRIVER = '''
import sys
import torch.distributed as dist
from chanprune_cli.cli import main

dist.init_process_group("gloo")
finetune_args, score_args = sys.argv[1].split(" "), sys.argv[2].split(" ")
codes = [main(finetune_args), main(score_args)]
dist.destroy_process_group()
sys.exit(max(codes))
'''

SCORE_ARGS = ["--arch", "ddp_tinynet:make", "--input-shape", "1,8,8", "--criterion", "taylor", "--data", "digits:train",
              "--mean", "0.5", "--std", "0.5", "--batch-size", "32", "--calib-batches", "4", "--force",
              "--device", "cpu"]  # gloo CPU processes: with one GPU, auto would put rank 1 on a missing cuda:1

ARGS = ["--arch", "ddp_tinynet:make", "--input-shape", "1,8,8", "--data", "digits:train", "--val-data", "digits:test",
        "--mean", "0.5", "--std", "0.5", "--batch-size", "32", "--max-steps", "8", "--lr", "0.1", "--warmup", "2",
        "--schedule", "sfp", "--ratio", "0.25", "--prune-every", "3", "--prune-until", "0.75", "--seed", "3",
        "--threads", "1", "--eval-every", "4", "--force", "--device", "cpu"]


def test_two_gloo_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ddp_tinynet.py").write_text(TINYNET)
    sys.path.insert(0, str(tmp_path))
    try:
        import ddp_tinynet

        torch.manual_seed(0)
        torch.save(ddp_tinynet.make().state_dict(), tmp_path / "tiny.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddp_tinynet", None)

    env = {k: v for k, v in os.environ.items() if k not in ("CHANPRUNE_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    (tmp_path / "driver.py").write_text(DRIVER)
    finetune_cmd = ["finetune", "tiny.pt", *ARGS, "--out", "ddp.safetensors", "--json", "ddp.json"]
    score_cmd = ["score", "tiny.pt", *SCORE_ARGS, "--out", "ddp.scores.safetensors"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "driver.py", " ".join(finetune_cmd), " ".join(score_cmd)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Only rank 0 prints: one header, one final table.
    assert proc.stdout.count("finetune tiny.pt") == 1, proc.stdout

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = CliRunner().invoke(app, ["finetune", "tiny.pt", *ARGS, "--out", "one.safetensors", "--json", "one.json"],
                             env={"CHANPRUNE_DEBUG": None})
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["score", "tiny.pt", *SCORE_ARGS, "--out", "one.scores.safetensors"],
                             env={"CHANPRUNE_DEBUG": None})
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    ddp_scores, one_scores = load_file(tmp_path / "ddp.scores.safetensors"), load_file(tmp_path / "one.scores.safetensors")
    assert ddp_scores.keys() == one_scores.keys() and ddp_scores
    for k in ddp_scores:
        torch.testing.assert_close(ddp_scores[k], one_scores[k], rtol=1e-4, atol=1e-9, msg=k)

    ddp_doc = json.loads((tmp_path / "ddp.json").read_text())
    one_doc = json.loads((tmp_path / "one.json").read_text())
    assert ddp_doc["world_size"] == 2 and one_doc["world_size"] == 1
    assert ddp_doc["schedules"]["sfp"]["rates"] == one_doc["schedules"]["sfp"]["rates"]
    assert ddp_doc["after"] == one_doc["after"]  # the same channels were removed
    assert ddp_doc["plans"] == one_doc["plans"]
    for a, b in zip(ddp_doc["evals"], one_doc["evals"]):
        assert a["images"] == b["images"] == 359  # validation sharded over both ranks, then summed
        assert a["top1"] == pytest.approx(b["top1"], abs=0.6)  # at most two borderline images
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    ddp = load_checkpoint(tmp_path / "ddp.safetensors", arch="ddp_tinynet:make").model.state_dict()
    one = load_checkpoint(tmp_path / "one.safetensors", arch="ddp_tinynet:make").model.state_dict()
    assert ddp.keys() == one.keys()
    for k in ddp:
        assert ddp[k].shape == one[k].shape, k
        torch.testing.assert_close(ddp[k], one[k], atol=2e-5, rtol=1e-4, msg=k)

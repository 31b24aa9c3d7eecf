"""Iterative pruning (`prune --rounds N`): rescoring a masked copy between rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chanprune_cli.criteria import get_criterion
from chanprune_cli.engine.allocate import AllocationOptions, allocate
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.models import build_model, parse_arch
from chanprune_cli.prune.rounds import score_in_rounds

SHAPE = (1, 8, 8)
CPU = torch.device("cpu")


@pytest.fixture()
def model_and_graph():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(parse_arch("digits_cnn")).eval()
    return model, build_graph(model, SHAPE)


def test_one_round_is_plain_scoring(model_and_graph) -> None:  # type: ignore[no-untyped-def]
    model, graph = model_and_graph
    l1 = get_criterion("l1")
    scores, removed = score_in_rounds(model, graph, lambda m: l1.score(m, graph, None, CPU), AllocationOptions(target_flops=0.5))
    assert removed == {}
    assert all(torch.equal(s, l1.score(model, graph, None, CPU)[g]) for g, s in scores.items())


def test_later_rounds_score_the_model_with_earlier_choices_masked(model_and_graph) -> None:  # type: ignore[no-untyped-def]
    model, graph = model_and_graph
    l1 = get_criterion("l1")
    seen: list[dict[int, torch.Tensor]] = []
    refreshed: list[torch.nn.Module] = []

    def score(m: torch.nn.Module) -> dict[int, torch.Tensor]:
        seen.append(l1.score(m, graph, None, CPU))
        return seen[-1]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores, removed = score_in_rounds(model, graph, score, AllocationOptions(target_flops=0.5, rounds=3),
                                      refresh=refreshed.append)
    assert len(seen) == 3 and len(refreshed) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model itself is untouched
    round2 = allocate(graph, seen[0], AllocationOptions(target_flops=0.5 / 3)).plan
    assert round2 and all(float(seen[1][g][i]) == 0.0 for g, idx in round2.items() for i in idx)  # masked: L1 zero
    assert all(set(round2[g]) <= set(removed.get(g, [])) for g in round2)
    a = allocate(graph, scores, AllocationOptions(target_flops=0.5), removed=removed)
    assert 0.5 <= 1 - a.estimated_macs_after / a.estimated_macs_before < 0.6


def test_prune_rounds_cli_verifies_and_records(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open
    from typer.testing import CliRunner

    from chanprune_cli.cli import app

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("digits_cnn", None)).state_dict(), "d.pt")
    runner = CliRunner()
    docs = {}
    for rounds in (1, 4):
        res = runner.invoke(app, ["prune", "d.pt", "--arch", "digits_cnn", "--criterion", "taylor", "--data", "digits:test",
                                  "--calib-batches", "2", "--recalibrate-bn", "2", "--target-flops", "0.5",
                                  "--rounds", str(rounds), "--out", f"r{rounds}.safetensors", "--json", f"r{rounds}.json"])
        assert res.exit_code == 0, res.output
        assert ("round 4/4: scoring with taylor" in res.output) == (rounds == 4)
        docs[rounds] = json.loads(Path(f"r{rounds}.json").read_text())
        assert docs[rounds]["rounds"] == rounds and docs[rounds]["verify"]["passed"]
        assert 1 - docs[rounds]["after"]["macs"] / docs[rounds]["before"]["macs"] >= 0.5
        with safe_open(f"r{rounds}.safetensors", "pt") as f:
            meta = json.loads(f.metadata()["chanprune"])
        assert meta["history"][-1]["rounds"] == rounds and len(meta["plans"]) == 1
    widths = {r: [(layer["name"], layer["out_after"]) for layer in doc["layers"]] for r, doc in docs.items()}
    assert widths[1] != widths[4]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bn_recalibration_follows_the_batches_device(device: str) -> None:
    """`recalibrate_bn` runs the model where the batches go and hands it back where it was, in its mode."""
    from torch import nn

    from chanprune_cli.prune.recalibration import recalibrate_bn

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = [(torch.randn(8, 1, 8, 8) * 3 + 2, torch.zeros(8)) for _ in range(3)]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 would shift the means ~5e-4
        assert recalibrate_bn(model, batches, torch.device(device), 2) == 2
    norm = model[1]
    assert not model.training and norm.momentum == 0.1
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert not torch.allclose(norm.running_var, torch.ones(4))  # statistics re-estimated
    with torch.no_grad():
        model.train()
        conv = model[0](torch.cat([b for b, _ in batches[:2]]))
    assert torch.allclose(norm.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4)

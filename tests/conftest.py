"""Shared test fixtures. Every test runs in its own empty working directory:

commands read `chanprune.toml` from the working directory (and its parents) and record what they
did in `.chanprune/last.json` there; a shared working directory would let one test's `score`
change what another test's `prune` does. Also: `load_spy` (records checkpoint loads) and
`one_thread` (module-wide single intra-op thread for tiny tensors), `digits_model` (a trained
digits_cnn state dict, trained once per run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _private_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every checkpoint load (the first slow step of a command) of an in-process run."""
    from chanprune_cli import checkpoint

    calls: list[str] = []
    real = checkpoint.load_checkpoint

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_checkpoint", spy)
    return calls


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny tensors: intra-op threads only add synchronisation (6x the CPU time on a
    busy 2-core machine). Restored afterwards, so other test modules keep their setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_cnn trained for a few seconds (about 96 % on digits:test), as a state dict."""
    from chanprune_cli.data import open_dataset
    from chanprune_cli.models import build_model, parse_arch
    from chanprune_cli.train import TrainConfig, Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(parse_arch("digits_cnn"))
        Trainer(model, open_dataset("digits:train", train=True),
                TrainConfig(max_steps=80, lr=0.05, progress=False, save_every=None), device=torch.device("cpu")).fit()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "digits.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path

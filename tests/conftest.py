"""Every test runs in its own empty working directory.

Commands read `chanprune.toml` from the working directory (and its parents) and record what they
did in `.chanprune/last.json` there; a shared working directory would let one test's `score`
change what another test's `prune` does.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))

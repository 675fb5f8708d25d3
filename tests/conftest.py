from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> Path:
    """The full demo phantom, simulated once per test session (the same call as `qsnet simulate`)."""
    from ingest.phantom.simulate import simulate

    out = tmp_path_factory.mktemp("phantom") / "data"
    simulate(out, size="demo", seed=0, jobs=os.cpu_count())
    return out


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO

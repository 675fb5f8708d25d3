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


@pytest.fixture(scope="session")
def raw_pair(demo_tree, tmp_path_factory) -> dict[str, Path]:
    """Raw stores of one exam per phantom site (sub-A01, sub-B01), ingested once per session."""
    import shutil

    from ingest.service import ingest

    root = tmp_path_factory.mktemp("rawpair")
    for site, exam in (("site-A", "sub-A01"), ("site-B", "sub-B01")):
        shutil.copytree(demo_tree / site / exam, root / "data" / site / exam)
    ingest(root / "data", root / "raw", manifest=root / "manifest.csv", jobs=2)
    return {site: next((root / "raw" / site).glob("*.zarr")) for site in ("site-A", "site-B")}

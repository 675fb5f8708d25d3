"""DVC round trip with real DVC: ingest as a stage, push to a local remote, pull into a fresh clone."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

STAGE = """stages:
  ingest:
    cmd: qsnet ingest data stores/raw --manifest stores/manifest.csv --jobs 2
    deps:
      - data
    outs:
      - stores/raw:
          persist: true
      - stores/manifest.csv
"""


def sh(*cmd, cwd):
    res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_pull_fresh_clone(demo_tree, tmp_path):
    work, remote, clone = tmp_path / "work", tmp_path / "remote", tmp_path / "clone"
    work.mkdir()
    for site, exam in (("site-A", "sub-A01"), ("site-B", "sub-B01")):
        shutil.copytree(demo_tree / site / exam, work / "data" / site / exam)
    sh("git", "init", "-q", cwd=work)
    sh("git", "config", "user.email", "ci@example.invalid", cwd=work)
    sh("git", "config", "user.name", "ci", cwd=work)
    sh("dvc", "init", "-q", cwd=work)
    sh("dvc", "config", "core.analytics", "false", cwd=work)
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=work)
    (work / "dvc.yaml").write_text(STAGE)
    sh("dvc", "add", "data", cwd=work)
    sh("dvc", "repro", cwd=work)
    first = digest(work / "stores")
    assert any(p.endswith("zarr.json") for p in first)
    # idempotent: nothing to do, and a forced rerun rewrites nothing
    assert "didn't change" in sh("dvc", "repro", cwd=work) or "up to date" in sh("dvc", "status", cwd=work)
    sh("dvc", "repro", "--force", cwd=work)
    assert digest(work / "stores") == first
    sh("git", "add", "-A", cwd=work)
    sh("git", "commit", "-qm", "data and stores", cwd=work)
    sh("dvc", "push", cwd=work)
    sh("git", "clone", "-q", str(work), str(clone), cwd=tmp_path)
    sh("dvc", "remote", "add", "-f", "-d", "local", str(remote), cwd=clone)
    sh("dvc", "pull", cwd=clone)
    assert digest(clone / "data") == digest(work / "data")
    assert digest(clone / "stores") == first
    assert "up to date" in sh("dvc", "status", cwd=clone).lower() or sh("dvc", "status", cwd=clone).strip() == ""

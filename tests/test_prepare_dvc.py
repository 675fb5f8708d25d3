"""`dvc repro prepare`, then the whole pipeline through `evaluate`, with the project's own
dvc.yaml and params.yaml in a fresh copy of the tree (what a fresh clone holds), on four phantom
exams; a second repro has nothing to do."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


def sh(*cmd, cwd):
    res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.mark.slow
def test_dvc_repro_prepare_fresh_tree(repo, demo_tree, tmp_path):
    work = tmp_path / "clone"
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo).split("\0")
    for f in filter(None, files):
        if (repo / f).is_file() and not f.startswith(("data/", "stores/", "reports/prepare")):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, work / f)
    for site, exam in (("site-A", "sub-A01"), ("site-A", "sub-A02"), ("site-B", "sub-B01"), ("site-B", "sub-B02")):
        shutil.copytree(demo_tree / site / exam, work / "data" / site / exam)
    shutil.copy2(demo_tree / "PHANTOM.json", work / "data" / "PHANTOM.json")
    sh("git", "init", "-q", cwd=work)
    sh("dvc", "add", "-q", "data", cwd=work)
    out = sh("dvc", "repro", "prepare", cwd=work)
    assert "Running stage 'prepare'" in out
    rep = json.loads((work / "reports" / "prepare.json").read_text())
    assert rep["summary"]["prepared"] == 4, rep["excluded"]
    assert len(list((work / "stores" / "prepared").glob("*/*.zarr"))) == 4
    again = sh("dvc", "repro", "prepare", cwd=work)
    assert "Running stage" not in again, again
    assert sh("dvc", "status", "prepare", cwd=work).strip().lower() in ("", "data and pipelines are up to date.")

    # on to the trained models and their evaluation, with the demo profile cut to QS-Net, one
    # contrast and one epoch (with a scratch run, so every model folder the stages write exists)
    import yaml

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["demo"]["train"].update(archs=["qsnet"], contrasts=["t1w"], epochs=1, finetune_epochs=1,
                                   extra_runs=[{"arch": "qsnet", "stage": "scratch"}])
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", cwd=work)
    for stage in ("pretrain", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    for stage in ("pretrain", "finetune", "scratch"):
        card = json.loads((work / "models" / stage / "qsnet" / "t1w" / "card.json").read_text())
        assert card["stage"] == stage and card["profile"] == "demo"
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert {"qsnet", "physics"} <= set(metrics["site_b"]) and "qsnet_scratch" in metrics["site_b"]
    assert (work / "reports" / "evaluate" / "report.html").is_file()
    assert "Running stage" not in sh("dvc", "repro", cwd=work)

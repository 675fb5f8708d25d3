"""`qsnet evaluate` end to end on small prepared stores whose targets are made by the sites'
signal equations from the MRF maps, so the physics baseline must score (almost) perfectly, and
on a registry of untrained models: the report contract, the routing of models to cohorts,
and bad cards reported while the rest is evaluated."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from ingest.phantom.physics import TISSUE_PARAMS
from ingest.prepare.grid import apply_scale, percentile_scale
from ingest.store import write_exam_store
from train import registry
from train.evaluate.physics import signal
from train.models import build
from ingest.siteconfig import load_site

CONTRASTS = ("t1w", "t2w", "t1flair", "t2flair", "swi")
Z, N = 4, 64


def _phantom_maps(rng):
    """A disc of WM with a GM ring, a CSF centre and, for GBM subjects, a lesion."""
    yy, xx = np.mgrid[:N, :N] - N / 2
    r = np.hypot(yy, xx)
    labels = np.zeros((Z, N, N), np.uint8)
    labels[:, r < 26] = 2
    labels[:, r < 20] = 3
    labels[:, r < 5] = 1
    return labels


def _store(path, site, split, subject, rng, lesion=False, drop=()):
    labels = _phantom_maps(rng)
    if lesion:
        yy, xx = np.mgrid[:N, :N]
        spot = np.hypot(yy - 40, xx - 40) < 4
        labels[1:3, spot] = 10  # oedema
        labels[1:3, np.hypot(yy - 40, xx - 40) < 2] = 9  # enhancing
    t1 = np.zeros(labels.shape)
    t2 = np.zeros(labels.shape)
    names = {1: "csf", 2: "gm", 3: "wm", 9: "enhancing", 10: "oedema"}
    for v, name in names.items():
        t1[labels == v], t2[labels == v] = TISSUE_PARAMS[name][0], TISSUE_PARAMS[name][1]
    brain = labels > 0
    t1 = np.where(brain, t1 * (1 + 0.03 * rng.standard_normal(t1.shape)), 0)
    t2 = np.where(brain, t2 * (1 + 0.03 * rng.standard_normal(t2.shape)), 0)
    arrays, scale = {}, {}
    inputs = []
    for role, m in (("mrf_t1", t1), ("mrf_t2", t2)):
        lo, hi = percentile_scale(m, brain)
        scale[role] = {"lo": lo, "hi": hi, "units": "ms"}
        inputs.append(apply_scale(m, lo, hi, brain))
    arrays["input"] = (np.stack(inputs).astype(np.float32), {})
    series = load_site(site)["series"]
    for c in CONTRASTS:
        s = signal(np.maximum(t1, 1), np.maximum(t2, 1), series[c])
        lo, hi = percentile_scale(s, brain)
        scale[c] = {"lo": lo, "hi": hi, "units": "scanner"}
        arrays[c] = (apply_scale(s, lo, hi, brain).astype(np.float32), {})
    for role in drop:
        del arrays[role]
    arrays["brain"] = (brain.astype(np.uint8), {})
    arrays["truth_labels"] = (labels, {})
    arrays["truth_brain"] = (brain.astype(np.uint8), {})
    write_exam_store(path / site / f"{subject}.zarr", arrays,
                     {"site": site, "split": split, "subject": subject, "cohort": "gbm" if lesion else "healthy",
                      "scale": scale, "targets": [c for c in CONTRASTS if c not in drop],
                      "input_contract": {"channels": ["mrf_t1", "mrf_t2"], "normalise": {"percentiles": [0.5, 99.5]}}})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    for site, splits in (("site-A", ("train", "train", "test", "test", "test")),
                         ("site-B", ("finetune", "test", "test", "test"))):
        for i, split in enumerate(splits):
            _store(root, site, split, f"sub-{site[-1]}{i}", rng, lesion=site == "site-B")
    return root


def _registry(root, entries):
    import torch

    torch.manual_seed(0)
    for stage, arch, inputs, contrast in entries:
        m = build(arch, in_channels=2, out_channels=1, width=8)
        folder = root / stage / (arch if inputs == "mrf" else f"{arch}-mri") / contrast
        registry.save(folder, m.generator, {
            "architecture": arch, "build": m.config, "contrast": contrast, "inputs": inputs, "stage": stage,
            "trained_on": {"site": "site-A" if stage == "pretrain" else "site-B"}, "params_hash": "test",
            "input": {"channels": ["mrf_t1", "mrf_t2"], "normalise": {"percentiles": [0.5, 99.5]}}})
    return root


@pytest.fixture(scope="module")
def evaluated(stores, tmp_path_factory):
    from train.evaluate.service import evaluate

    models = _registry(tmp_path_factory.mktemp("models"), [
        ("pretrain", "qsnet", "mrf", "t1w"), ("pretrain", "qsnet", "mri", "t1w"), ("finetune", "qsnet", "mrf", "t1w"),
        ("scratch", "qsnet", "mrf", "t1w"), ("pretrain", "cgan", "mrf", "t2flair"), ("finetune", "cgan", "mrf", "t2flair"),
        ("pretrain", "qsnet", "mrf", "t1flair"), ("pretrain", "qsnet", "mri", "t1flair")])
    out = tmp_path_factory.mktemp("reports")
    res = evaluate(models, stores, out, {"profile": "test"})
    return models, out, res


def test_report_contract(evaluated):
    _, out, res = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"site_a", "site_b"}
    assert set(metrics["site_a"]) == {"qsnet", "cgan", "physics"}  # pretrained models on the home site
    assert set(metrics["site_b"]) == {"qsnet", "cgan", "physics", "qsnet_scratch"}
    assert set(metrics["site_b"]["physics"]) == set(CONTRASTS)
    for cohort in metrics.values():
        for model in cohort.values():
            for m in model.values():
                assert {"ssim", "psnr", "mae"} <= set(m) and m["n"] == 3
    gen = json.loads((out / "generalisation.json").read_text())
    assert set(gen["qsnet"]) == {"mrf", "mri", "p_values"}
    assert set(gen["qsnet"]["p_values"]["t1w"]["ssim"]) >= {"wilcoxon_p", "ttest_p", "n"}
    assert gen["cgan"]["mri"] == {}  # no mri-input cGAN in this registry
    ev = out / "evaluate"
    for name in ("subjects.csv", "regions.csv", "stats.json", "checks.json", "summary.json", "report.html"):
        assert (ev / name).is_file(), name
    assert len(list((ev / "figures").glob("grid_*.png"))) == 2
    html = (ev / "report.html").read_text()
    summary = json.loads((ev / "summary.json").read_text())
    assert "data version" in html and summary["provenance"]["evaluate_params_hash"] in html
    # each number says what it is: the physics check's pairs by metric, PSNR with its unit
    assert re.search(r"SSIM \d\.\d{3} vs \d\.\d{3}; PSNR [\d.]+ vs [\d.]+ dB; MAE [\d.]+ vs [\d.]+ 12-bit", html)
    assert "<h3>PSNR (dB)</h3>" in html
    header = (ev / "subjects.csv").read_text().splitlines()[0].split(",")
    assert {"data_version", "git_commit", "mae_native", "model_params_hash"} <= set(header)
    assert res["errors"] == []


def test_physics_baseline_is_exact_on_equation_made_data(evaluated):
    _, out, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    for cohort in ("site_a", "site_b"):
        for c in CONTRASTS:
            m = metrics[cohort]["physics"][c]
            assert m["ssim"] > 0.99 and m["mae"] < 0.01 * 4095, (cohort, c, m)
    # untrained networks are far off: the checks report that instead of passing
    checks = json.loads((out / "evaluate" / "checks.json").read_text())["checks"]
    assert checks and not any(c["passed"] for c in checks if "QS-Net" in c["check"])


def test_voxel_reference_is_reported_outside_the_contract(evaluated):
    """The reference is in the tables, the checks' notes and the report, not in metrics.json."""
    _, out, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert all("voxel" not in models for models in metrics.values())
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    assert set(summary["reference"]) == {f"{s}/{c}" for s in ("site-A", "site-B")
                                         for c in ("t1w", "t2w", "t1flair", "t2flair", "swi")}
    rows = (out / "evaluate" / "subjects.csv").read_text()
    assert ",voxel,reference," in rows
    checks = json.loads((out / "evaluate" / "checks.json").read_text())["checks"]
    failed = [c for c in checks if c["check"].endswith(">= 0.85") and not c["passed"]]
    assert failed and all("voxel-regression reference reaches" in c["note"] for c in failed)
    assert "Voxel regression (reference)" in (out / "evaluate" / "report.html").read_text()


def test_lesion_regions_and_contrast(evaluated):
    import csv

    _, out, _ = evaluated
    rows = list(csv.DictReader(open(out / "evaluate" / "regions.csv")))
    assert {r["region"] for r in rows} == {"tumour", "enhancing", "oedema", "outside_lesions"}
    assert {r["cohort"] for r in rows} == {"site_b"}  # only the GBM site has lesions
    # the rest of the brain is scored, with no lesion contrast to keep
    assert all(r["contrast_truth"] == "" for r in rows if r["region"] == "outside_lesions")
    phys = [r for r in rows if r["model"] == "physics" and r["region"] == "oedema" and r["contrast"] == "t2flair"]
    # the equation made the targets: synthetic and true lesion contrast agree
    for r in phys:
        assert float(r["contrast_truth"]) > 0 and abs(float(r["contrast_synth"]) - float(r["contrast_truth"])) < 0.05


def test_lesion_conspicuity_is_summarised_with_a_verdict(evaluated):
    """The equation-made physics synthesis keeps every lesion; the verdicts reach summary and report."""
    _, out, _ = evaluated
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    les = summary["lesions"]
    assert set(les) == {"site_b"}
    assert all("outside_lesions" not in regs for models in les["site_b"].values() for regs in models.values())
    cell = les["site_b"]["physics"]["t2flair"]["oedema"]
    assert cell["truth"] > 0.2 and abs(cell["kept"] - 1) < 0.1 and cell["verdict"] == "kept"
    assert cell["subjects"] == 3
    html = (out / "evaluate" / "report.html").read_text()
    assert "<th>kept</th>" in html and "<th>verdict</th>" in html


@pytest.mark.parametrize("truth, synth, verdict", [(0.7, 0.7, "kept"), (0.7, 0.1, "erased"), (0.7, 0.3, "faint"),
                                                   (0.7, 1.6, "exaggerated"), (-0.5, 0.2, "inverted"),
                                                   (0.1, 0.0, ""), (float("nan"), 0.1, "")])
def test_lesion_verdicts(truth, synth, verdict):
    from train.evaluate.service import _verdict

    assert _verdict(truth, synth) == verdict


def test_blurred_truth_yardstick(evaluated):
    """A 1-pixel blur of the truth scores below 1 and above a useless image, per cohort and contrast."""
    _, out, _ = evaluated
    blur = json.loads((out / "evaluate" / "summary.json").read_text())["blurred_truth_ssim"]
    assert blur["sigma_px"] == 1.0 and set(blur["ssim"]) == {"site_a", "site_b"}
    for per in blur["ssim"].values():
        assert set(per) == set(CONTRASTS)
        assert all(0.3 < v < 0.999 for v in per.values()), per
    assert "ground truth blurred by a Gaussian of 1 pixel" in (out / "evaluate" / "report.html").read_text()


def test_bad_cards_are_reported_and_the_rest_runs(stores, tmp_path):
    from train.evaluate.service import evaluate

    models = _registry(tmp_path / "models", [("finetune", "qsnet", "mrf", "t1w"), ("finetune", "qsnet", "mrf", "t2w")])
    # a contrast the stores have no ground truth for
    card = json.loads((models / "finetune/qsnet/t2w/card.json").read_text())
    card["contrast"] = "pd"
    (models / "finetune/qsnet/t2w/card.json").write_text(json.dumps(card))
    # damaged weights
    _registry(models, [("finetune", "resunet", "mrf", "t1w")])
    (models / "finetune/resunet/t1w/model.pt").write_bytes(b"not a model")
    # a model trained on MRF maps scaled as rates, the stores scaled between percentiles: it would
    # run, on numbers that mean something else
    _registry(models, [("finetune", "swin", "mrf", "t1w")])
    card = json.loads((models / "finetune/swin/t1w/card.json").read_text())
    card["input"] = {"normalise": {"inputs": "rate", "rate_ms": {"mrf_t1": 250, "mrf_t2": 20}}}
    (models / "finetune/swin/t1w/card.json").write_text(json.dumps(card))
    # a card from before cards carried an input contract: nothing says how its inputs were made
    _registry(models, [("finetune", "cgan", "mrf", "t1w")])
    card = json.loads((models / "finetune/cgan/t1w/card.json").read_text())
    del card["input"]
    (models / "finetune/cgan/t1w/card.json").write_text(json.dumps(card))
    # an mri-input model trained on slices in another order: its T1w and T2w inputs are the stores'
    _registry(models, [("pretrain", "resunet", "mri", "t1flair")])
    card = json.loads((models / "pretrain/resunet-mri/t1flair/card.json").read_text())
    card["input"]["orientation"] = "RAS"
    (models / "pretrain/resunet-mri/t1flair/card.json").write_text(json.dumps(card))
    # a card.json that is JSON but not a card
    (models / "finetune/x/t1w").mkdir(parents=True)
    (models / "finetune/x/t1w/card.json").write_text("null")
    res = evaluate(models, stores, tmp_path / "out", {})
    errs = "\n".join(res["errors"])
    assert "finetune/qsnet/t2w: not evaluated: contrast 'pd' has no ground truth" in errs
    assert "finetune/cgan/t1w: not evaluated: the model card records no input contract" in errs
    assert "pretrain/resunet-mri/t1flair: not evaluated: the model was trained on slices indexed towards RAS" in errs
    assert "finetune/x/t1w/card.json: not a model card (a JSON NoneType, not an object)" in errs
    assert "finetune/resunet/t1w/model.pt" in errs and "sha256" in errs
    assert ("finetune/swin/t1w: not evaluated: the model takes MRF inputs scaled as rates (mrf_t1 250 ms, "
            "mrf_t2 20 ms / T), the stores hold them scaled between per-exam percentiles [0.5, 99.5]") in errs
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "t1w" in metrics["site_b"]["qsnet"] and "swin" not in metrics["site_b"]


def test_a_corrupt_training_store_is_named_by_the_baselines(stores, tmp_path):
    """zarr's own errors on a damaged chunk (a checksum, a codec) say what but not where."""
    import shutil

    from train.evaluate.physics import PhysicsBaseline
    from train.evaluate.reference import VoxelRegression

    bad = tmp_path / "sub-A0.zarr"
    shutil.copytree(stores / "site-A" / "sub-A0.zarr", bad)
    shard = next(p for p in (bad / "t1w").iterdir() if p.name.startswith("c"))
    raw = bytearray(shard.read_bytes())
    raw[-12:-4] = bytes(b ^ 0x5A for b in raw[-12:-4])   # the shard index, which carries a checksum
    shard.write_bytes(bytes(raw))
    for make in (PhysicsBaseline, VoxelRegression):
        with pytest.raises(ValueError, match=f"^{bad}"):
            make("t1w").fit([bad])


def test_cli_without_test_subjects_fails_in_one_line(stores, tmp_path):
    import shutil

    root = tmp_path / "prepared"
    shutil.copytree(stores / "site-A" / "sub-A0.zarr", root / "site-A" / "sub-A0.zarr")  # a training exam only
    models = _registry(tmp_path / "models", [("pretrain", "qsnet", "mrf", "t1w")])
    res = subprocess.run([sys.executable, "-m", "ingest.cli", "evaluate", "--models", str(models), "--stores",
                          str(root), "--out", str(tmp_path / "out"), "--params", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no prepared store in split 'test'" in lines[0] and str(root) in lines[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cards_that_do_not_fit_are_reported_and_the_rest_runs(tmp_path):
    from train.evaluate.metrics import paired_tests
    from train.evaluate.service import evaluate

    rng = np.random.default_rng(1)
    stores = tmp_path / "prepared"
    for site, splits in (("site-A", ("train", "test")), ("site-B", ("finetune", "test", "test"))):
        for i, split in enumerate(splits):
            _store(stores, site, split, f"sub-{site[-1]}{i}", rng, drop=("t2w",))  # no T2w: no mri input
    models = _registry(tmp_path / "models", [("pretrain", "qsnet", "mri", "t1flair"), ("finetune", "qsnet", "mrf", "t1w"),
                                              ("finetune", "cgan", "mrf", "t1w")])
    card_path = models / "finetune/qsnet/t1w/card.json"
    card = json.loads(card_path.read_text())
    del card["stage"], card["trained_on"]  # an older card: the folder names the stage
    card_path.write_text(json.dumps(card))
    card_path = models / "finetune/cgan/t1w/card.json"
    card = json.loads(card_path.read_text())
    card["build"]["arch"] = "unet3000"
    card_path.write_text(json.dumps(card))
    res = evaluate(models, stores, tmp_path / "out", {})
    errs = "\n".join(res["errors"])
    assert "pretrain/qsnet-mri/t1flair: input kind 'mri' does not match the stores" in errs and "t2w" in errs
    assert re.search(r"finetune/cgan/t1w: not evaluated: \S*card.json: bad build config \(unknown architecture 'unet3000'", errs)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["site_b"]["qsnet"]["t1w"]["n"] == 2  # scored although its card names no stage
    assert not list(tmp_path.glob("out/.evaluate.*"))  # no temporary folder left behind
    # a perfect subject's infinite PSNR is left out of the paired tests, not turned into a difference
    assert paired_tests([float("inf"), 30.0, 31.0, 33.0], [29.0, 28.0, 30.0, 31.0])["n"] == 3


def test_mri_inputs_copied_as_predictions_are_scored_outside_the_contract(evaluated):
    import csv

    _, out, res = evaluated
    rows = list(csv.DictReader((out / "evaluate" / "subjects.csv").open()))
    copies = [r for r in rows if r["arm"] == "copy"]
    # only contrasts an mri-input model targets and does not hold: t1flair here, not t1w
    assert {(r["model"], r["contrast"], r["inputs"]) for r in copies} == {("copy_t1w", "t1flair", "mri"),
                                                                           ("copy_t2w", "t1flair", "mri")}
    assert len(copies) == 2 * 6  # every test subject of both sites
    assert not any(m.startswith("copy") for cohort in res["metrics"].values() for m in cohort)
    html = (out / "evaluate" / "report.html").read_text()
    assert "mri input copied" in html


def test_copy_note_names_the_best_input():
    from train.evaluate.service import _copy_note

    note = _copy_note({"t1w": {"ssim": 0.895}, "t2w": {"ssim": 0.2}}, "t1flair", 0.69)
    assert note.startswith("the mri input t1w alone, copied, scores SSIM 0.895 against t1flair")
    assert "0.690" in note
    assert _copy_note({}, "t1flair", 0.69) == "" and _copy_note({"t1w": {"ssim": float("nan")}}, "t1flair", 0.5) == ""


def test_failed_comparisons_say_how_much_they_mean():
    from train.evaluate.service import _reference_note, _significance

    few = _significance({"n": 3, "wilcoxon_p": 0.25, "ttest_p": 0.4})
    assert "not a significant difference" in few and "cannot go below p 0.25" in few
    many = _significance({"n": 12, "wilcoxon_p": 0.001, "ttest_p": 0.002})
    assert "not a significant" not in many and "cannot go below" not in many
    assert _significance({}) == ""
    assert "carry this contrast at the bar" in _reference_note(0.9, 0.8, 0.85)
    assert "reaches only 0.700" in _reference_note(0.7, 0.6, 0.85)
    assert "reaches only 0.8496" in _reference_note(0.8496, 0.76, 0.85)   # not rounded up to the bar
    assert "has not learned all that the maps carry" in _reference_note(0.8496, 0.76, 0.85)
    assert _reference_note(float("nan"), 0.6, 0.85) == ""


def test_voxels_without_truth_are_not_scored(tmp_path):
    """A target series that misses part of the brain (its valid_<role> mask): those voxels hold
    no truth and are not scored. A synthesis equal to the truth where it exists is perfect,
    whatever it shows where the series did not reach; without the mask it would be scored
    against a black brain."""
    from train.evaluate.service import _Exam, _score

    _store(tmp_path, "site-A", "test", "sub-A0", np.random.default_rng(0))
    path = tmp_path / "site-A" / "sub-A0.zarr"
    from ingest.store import open_store

    st = open_store(path)
    arrays = {r: (st.read(r), {}) for r in st.roles}
    brain = arrays["brain"][0] > 0
    valid = brain.copy()
    valid[0] = False                                   # the series does not reach the first slice
    truth = np.where(valid, arrays["t2w"][0], 0.0).astype(np.float32)
    arrays["t2w"] = (truth, {})
    arrays["valid_t2w"] = (valid.astype(np.uint8), {})
    write_exam_store(tmp_path / "cut.zarr", arrays, dict(st.attrs))
    ex = _Exam(tmp_path / "cut.zarr")
    pred = np.where(brain, np.where(valid, truth, 0.5), 0.0)   # a plausible brain where there is no truth
    m, _ = _score(pred, ex, "t2w", {"data_range": 4095, "k1": 0.01, "k2": 0.03})
    assert m["mae"] == 0 and m["ssim"] == pytest.approx(1.0) and m["voxels"] == int(valid.sum())
    assert (ex.mask("t1w") == brain).all()             # a role without a mask: the brain


def test_generalisation_arms_are_scored_where_the_mri_inputs_exist_too(tmp_path):
    """Where the T1w series does not reach, an mri-input model is fed zeros it never trained on:
    both arms of the comparison, and the copies, are scored only where target and inputs all
    have a series; the study's own models elsewhere on the target's whole coverage."""
    from ingest.store import open_store
    from train.evaluate.service import _Exam, _score

    _store(tmp_path, "site-B", "test", "sub-B0", np.random.default_rng(1))
    st = open_store(tmp_path / "site-B" / "sub-B0.zarr")
    arrays = {r: (st.read(r), {}) for r in st.roles}
    brain = arrays["brain"][0] > 0
    valid = brain.copy()
    valid[0] = False                                   # the T1w series misses the first slice
    arrays["t1w"] = (np.where(valid, arrays["t1w"][0], 0.0).astype(np.float32), {})
    arrays["valid_t1w"] = (valid.astype(np.uint8), {})
    write_exam_store(tmp_path / "cut.zarr", arrays, dict(st.attrs))
    ex = _Exam(tmp_path / "cut.zarr")
    truth = ex.truth("t2flair")
    pred = np.where(valid, truth, 0.0)                 # right wherever the inputs exist
    cfg = {"data_range": 4095, "k1": 0.01, "k2": 0.03}
    for arm in ("generalisation_mri", "generalisation_mrf", "copy"):
        m, _ = _score(pred, ex, "t2flair", cfg, arm)
        assert m["mae"] == 0 and m["voxels"] == int((valid & ex.mask("t2flair")).sum()), arm
    m, _ = _score(pred, ex, "t2flair", cfg, "main")
    assert m["mae"] > 0 and m["voxels"] == int(ex.mask("t2flair").sum())


def test_a_registry_with_no_loadable_model_is_an_error_not_a_baselines_only_report(stores, tmp_path):
    """The physics baseline and the reference always score: a run where no model card loads
    must fail, and leave an earlier report as it was, not replace it with the baselines alone."""
    from train.evaluate.service import EvaluateError, evaluate

    models = _registry(tmp_path / "models", [("pretrain", "qsnet", "mrf", "t1w")])
    (models / "pretrain" / "qsnet" / "t1w" / "model.pt").write_bytes(b"damaged")
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("keep")
    with pytest.raises(EvaluateError, match="no model card could be evaluated: .*sha256 differs"):
        evaluate(models, stores, out, {})
    assert (out / "metrics.json").read_text() == "keep"


def test_an_under_trained_note_names_the_input_kind():
    """The generalisation check lists both models of a contrast: two identical sentences read as a
    duplicate, and the reader cannot tell which model stopped early."""
    from train.evaluate.service import _undertrained

    training = {("pretrain", "cgan", k, "t2flair"): {"epochs": 9, "best_epoch": 9} for k in ("mrf", "mri")}
    notes = [_undertrained(training, ("pretrain", "cgan", k, "t2flair")) for k in ("mrf", "mri")]
    assert notes[0] != notes[1] and "mrf inputs" in notes[0] and "mri inputs" in notes[1]
    assert _undertrained({("pretrain", "cgan", "mrf", "t2flair"): {"epochs": 9, "best_epoch": 7}},
                         ("pretrain", "cgan", "mrf", "t2flair")) == ""


def test_a_check_that_cannot_run_is_a_failed_row_and_physics_is_compared_on_shared_subjects():
    """No finetuned QS-Net on a cohort, or no physics prediction, used to leave no row at all
    ("0/0 checks passed"). And QS-Net scored on 2 of 5 subjects was compared by its mean with the
    baseline's mean over all 5: the check must use the subjects both were scored on."""
    from train.evaluate.service import _checks

    cfg = {"min_ssim": 0.85}
    m = lambda s: {"ssim": s, "psnr": 30.0, "mae": 10.0}  # noqa: E731
    pair = lambda a, b: {"n": 2, "mean_a": a, "mean_b": b}  # noqa: E731
    tables = {"metrics": {"site_a": {}, "site_b": {"physics": {"t1w": m(0.73)}}},
              "stats": {"qsnet_vs": {}}, "generalisation": {"cgan": {"mrf": {}, "mri": {"t2flair": m(0.6)},
                                                                      "p_values": {}}}}
    rows = _checks(tables, cfg, "site-A")
    assert [r["passed"] for r in rows] == [False, False]
    assert all(r["note"].startswith("not evaluated") for r in rows)
    tables["metrics"]["site_b"]["qsnet"] = {"t1w": m(0.905), "t2w": m(0.9)}
    tables["stats"]["qsnet_vs"] = {"site_b": {"physics": {"t1w": {"ssim": pair(0.905, 0.925),
                                                                   "psnr": pair(31.0, 30.0), "mae": pair(9.0, 10.0)}}}}
    rows = {(r["check"].split(":")[1].strip()[:20], r["contrast"]): r for r in _checks(tables, cfg, "site-A")}
    beat = rows[("QS-Net beats the phy", "t1w")]
    assert not beat["passed"] and beat["value"]["ssim"] == [0.905, 0.925]   # not 0.905 vs 0.73
    assert not rows[("QS-Net beats the phy", "t2w")]["passed"]                # no baseline: a failed row


def test_generalisation_is_decided_on_shared_subjects_and_a_missing_arm_is_a_failed_row():
    from train.evaluate.service import _checks

    m = lambda s: {"ssim": s, "psnr": 30.0, "mae": 10.0, "cohort": "site_b"}  # noqa: E731
    tables = {"metrics": {"site_b": {}}, "stats": {"qsnet_vs": {}},
              "generalisation": {"qsnet": {"mrf": {"t1flair": m(0.80), "t2flair": m(0.70)},
                                           "mri": {"t1flair": m(0.78)},
                                           "p_values": {"t1flair": {"ssim": {"n": 2, "mean_a": 0.76,
                                                                             "mean_b": 0.79}}}}}}
    training = {("pretrain", "qsnet", "mri", c): {} for c in ("t1flair", "t2flair")}
    rows = {r["contrast"]: r for r in _checks(tables, {"min_ssim": 0.85}, "site-A", training)
            if r["check"].startswith("generalisation")}
    # mrf's mean over all its subjects (0.80) beat mri's (0.78); on the two both were scored on it loses
    assert not rows["t1flair"]["passed"] and rows["t1flair"]["value"] == [0.76, 0.79]
    assert not rows["t2flair"]["passed"] and "no mri-input model was scored" in rows["t2flair"]["note"]


def test_visits_of_one_patient_are_one_subject_of_the_statistics():
    """A GBM patient scanned twice (a follow-up) has two test exams: counted as two subjects they
    narrowed the sd and gave the paired tests an n they do not have. They are averaged into one."""
    from train.evaluate.service import _conspicuity, _tables, per_patient

    def row(model, subject, patient, ssim, region=None, truth=None):
        r = {"cohort": "site_b", "arm": "main", "model": model, "contrast": "t2flair", "subject": subject,
             "patient": patient, "ssim": ssim, "psnr": 30.0, "mae": 10.0}
        if region:
            r.update(region=region, voxels=10, contrast_truth=truth, contrast_synth=truth / 2)
        return r

    rows = [row(m, s, p, v + (0.1 if m == "qsnet" else 0.0))
            for m in ("qsnet", "resunet")
            for s, p, v in (("sub-1", "pat-1", 0.6), ("sub-2", "pat-1", 0.8), ("sub-3", "pat-2", 0.5),
                            ("sub-4", "pat-3", 0.7))]
    merged = per_patient(rows)
    assert len(merged) == 6 and {r["visits"] for r in merged} == {1, 2}
    one = next(r for r in merged if r["model"] == "resunet" and r["patient"] == "pat-1")
    assert one["ssim"] == pytest.approx(0.7) and one["visits"] == 2
    t = _tables(rows, "site-A")
    assert t["metrics"]["site_b"]["resunet"]["t2flair"]["n"] == 3           # patients, not exams
    assert t["metrics"]["site_b"]["resunet"]["t2flair"]["ssim"] == pytest.approx((0.7 + 0.5 + 0.7) / 3)
    assert t["stats"]["qsnet_vs"]["site_b"]["resunet"]["t2flair"]["ssim"]["n"] == 3
    # a row without a patient (a store written before prepare recorded one) stands for itself
    bare = [{k: v for k, v in r.items() if k != "patient"} for r in rows]
    assert len(per_patient(bare)) == len(bare)
    # lesion rows too, with the voxels of the visits summed and a missing contrast left missing
    regs = per_patient([row("qsnet", "sub-1", "pat-1", 0.6, "oedema", 0.6),
                        row("qsnet", "sub-2", "pat-1", 0.8, "oedema", 0.4)])
    assert len(regs) == 1 and regs[0]["voxels"] == 20 and regs[0]["contrast_truth"] == pytest.approx(0.5)
    assert _conspicuity(regs)["site_b"]["qsnet"]["t2flair"]["oedema"]["subjects"] == 1
    # paired on the exams both sides scored, then per patient: QS-Net's second visit of pat-1,
    # which the baseline did not score, must not lift QS-Net's side of the pair (0.775 against
    # 0.725 averaged first; 0.70 against 0.725 on the shared exams)
    pair = [row("qsnet", "v1", "pat-1", 0.6), row("qsnet", "v2", "pat-1", 0.9), row("qsnet", "v3", "pat-2", 0.8),
            row("physics", "v1", "pat-1", 0.7), row("physics", "v3", "pat-2", 0.75)]
    for r in pair[3:]:
        r["arm"] = "physics"
    p = _tables(pair, "site-A")["stats"]["qsnet_vs"]["site_b"]["physics"]["t2flair"]["ssim"]
    assert p["n"] == 2 and p["mean_a"] == pytest.approx(0.70) and p["mean_b"] == pytest.approx(0.725)
    gone = per_patient([{**row("qsnet", "sub-1", "pat-1", 0.6, "oedema", 0.6), "contrast_synth": None},
                        {**row("qsnet", "sub-2", "pat-1", 0.8, "oedema", 0.4), "contrast_synth": None}])
    assert gone[0]["contrast_synth"] is None


def test_the_generalisation_pair_is_also_shown_outside_and_inside_the_lesions(evaluated):
    """The whole-brain pair mixes healthy tissue of another site with lesions neither input kind
    was trained on: the summary, the report and a failed check's note say which one is which."""
    from train.evaluate.service import _region_note

    _, out, _ = evaluated
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    cells = summary["generalisation_by_region"]["site_b"]["qsnet"]["t1flair"]
    assert {"outside_lesions", "tumour", "oedema"} <= set(cells)
    assert all(v["n"] == 3 and -1 <= v["mrf"] <= 1 and -1 <= v["mri"] <= 1 for v in cells.values()), cells
    assert "outside lesions" in (out / "evaluate" / "report.html").read_text()
    note = _region_note({"tumour": {"mrf": 0.5, "mri": 0.6, "n": 3}, "outside_lesions": {"mrf": 0.8, "mri": 0.7, "n": 3}})
    assert note == "SSIM outside the lesions mrf 0.800 against mri 0.700, in the tumour mrf 0.500 against mri 0.600"
    # a failed pair's note says where it was lost
    from train.evaluate.service import _checks

    m = lambda v: {"ssim": v, "psnr": 20.0, "mae": 300.0, "cohort": "site_b"}  # noqa: E731
    tables = {"metrics": {"site_b": {}}, "stats": {"qsnet_vs": {}},
              "generalisation": {"qsnet": {"mrf": {"t2flair": m(0.70)}, "mri": {"t2flair": m(0.72)}, "p_values": {}}},
              "generalisation_regions": {"site_b": {"qsnet": {"t2flair": {
                  "outside_lesions": {"mrf": 0.75, "mri": 0.71, "n": 3}, "oedema": {"mrf": 0.6, "mri": 0.7, "n": 3}}}}}}
    row = next(r for r in _checks(tables, {"min_ssim": 0.85}, "site-A") if r["check"].startswith("generalisation"))
    assert not row["passed"]
    assert "SSIM outside the lesions mrf 0.750 against mri 0.710, in the oedema mrf 0.600 against mri 0.700" in row["note"]


def test_a_missed_bar_says_whether_it_is_lost_near_the_lesions():
    """QS-Net's mean over the brain mixes lesions, which the finetune split shows twice, with the
    rest: a failed bar's note says which one misses it."""
    from train.evaluate.service import _bar_region_note, _checks, _qsnet_by_region

    rows = [{"cohort": "site_b", "arm": "main", "model": m, "contrast": "t2flair", "region": reg, "ssim": v}
            for m, reg, v in [("qsnet", "outside_lesions", 0.86), ("qsnet", "outside_lesions", 0.88),
                              ("qsnet", "oedema", 0.6), ("swin", "oedema", 0.9)]]
    cells = _qsnet_by_region(rows)["site_b"]["t2flair"]
    assert cells == {"oedema": {"ssim": 0.6, "n": 1}, "outside_lesions": {"ssim": 0.87, "n": 2}}
    assert _bar_region_note(cells, 0.85) == ("the brain beyond 5 px of the lesions reaches 0.870, above the bar: "
                                             "the lesions and their surroundings pull the mean down (SSIM in the "
                                             "oedema 0.600)")
    assert "reaches only 0.800: short of the bar away from the lesions too" in _bar_region_note(
        {**cells, "outside_lesions": {"ssim": 0.8, "n": 2}}, 0.85)
    assert _bar_region_note({"oedema": {"ssim": 0.6, "n": 1}}, 0.85) == ""   # a cohort without lesions
    m = {"ssim": 0.83, "psnr": 20.0, "mae": 300.0}
    tables = {"metrics": {"site_b": {"qsnet": {"t2flair": m}}}, "stats": {"qsnet_vs": {}},
              "generalisation": {}, "qsnet_regions": {"site_b": {"t2flair": cells}}}
    row = next(r for r in _checks(tables, {"min_ssim": 0.85}, "site-A") if "SSIM >=" in r["check"])
    assert not row["passed"] and "reaches 0.870, above the bar" in row["note"]


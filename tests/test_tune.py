"""`qsnet tune`: the search space and its errors, seeded suggestions, and a real search on Ray Tune
(OptunaSearch + ASHA over TorchTrainer trials) that is interrupted and resumed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train_ray import site_stores

from ingest.params import ParamsError
from train.stages import check_hp, read_tuned
from tune.space import parse_space, to_train, tune_config

# the qsnet of this interpreter's environment, not another one earlier on PATH
QSNET = str(Path(sys.executable).parent / "qsnet") if (Path(sys.executable).parent / "qsnet").exists() \
    else shutil.which("qsnet")
SPACE = {"lr": {"loguniform": [1.0e-4, 3.0e-2]}, "width": {"choice": [4, 6]}}
# seed 10 suggests lr 8e-3 and 7e-3 for the first two trials and 3e-4 and 2e-4 for the next two
# (test_same_seed_same_suggestions prints the sequence): the last two are clearly worse at ASHA's
# first rung, so early stopping is not left to chance
PARAMS = {
    "train": {"archs": ["qsnet"], "contrasts": ["t1w"], "width": 4, "epochs": 3, "batch_size": 2,
              "plateau_after_epoch": 1, "checkpoint_every": 1, "max_failures": 1, "num_workers": 1, "use_gpu": False},
    "tune": {"enabled": True, "arch": "qsnet", "contrasts": ["t1w"], "num_samples": 4, "max_concurrent": 2,
             "epochs": 3, "grace_period": 1, "reduction_factor": 2, "seed": 10,
             "resources": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False}, "space": SPACE},
}


def _params(tune: dict | None = None, **extra) -> dict:
    return {"profile": "t", "seed": 0, **json.loads(json.dumps(PARAMS)), **({"tune": tune} if tune else {}), **extra}


def _write_params(path: Path, tune_section: dict) -> Path:
    doc = {"profile": "t", "seed": 0, "t": {"train": PARAMS["train"], "tune": tune_section}}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("space, needle", [
    ({}, "tune.space is empty"),
    ({"learning_rate": {"uniform": [0, 1]}}, "learning_rate: not a tunable hyperparameter"),
    ({"lr": {"uniform": [0.1, 0.01]}}, "needs low < high"),
    ({"lr": {"loguniform": [0.0, 0.1]}}, "loguniform needs low > 0"),
    ({"lr": {"normal": [0.0, 0.1]}}, "expected one of"),
    ({"width": {"uniform": [4, 8]}}, "is an integer"),
    ({"width": {"choice": []}}, "non-empty list"),
    ({"lr": [0.1, 0.2]}, "expected one of"),
])
def test_bad_spaces_are_one_line_errors(space, needle):
    with pytest.raises(ParamsError) as e:
        parse_space(space)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, needle", [
    ({"metric": "ssim"}, "is never reported by the trainable"),
    ({"mode": "best"}, "tune.mode must be min or max"),
    ({"contrasts": ["pd"]}, "tune.contrasts"),
    ({"num_samples": 0}, "tune.num_samples must be a positive integer"),
    ({"grace_period": 5}, "grace_period 5 > tune.epochs 3"),
    ({"bogus": 1}, "unknown tune key"),
    ({"resources": {"use_gpu": "false"}}, "tune.resources.use_gpu must be true, false or auto"),
    ({"resources": {"num_workers": True, "cpus_per_worker": 1}}, "tune.resources.num_workers must be a positive integer"),
    ({"enabled": "false"}, "tune.enabled must be true or false"),      # quoted: truthy, a search would run
    ({"per_contrast": "no"}, "tune.per_contrast must be true or false"),
    ({"seed": "abc"}, "tune.seed must be a whole number or null"),
    ({"resources": 2}, "tune.resources must be a mapping"),
    ({"resources": {"num_workers": 1, "cpu_per_worker": 2}},
     "unknown tune.resources key(s) ['cpu_per_worker'] (known: num_workers, cpus_per_worker, use_gpu)"),
    ({"arch": "swin"}, "tune.arch swin is not in train.archs ['qsnet']"),
    # PARAMS: 3-epoch trials, train.plateau_after_epoch 1
    ({"space": {"plateau_factor": {"uniform": [0.5, 0.9]}}},
     "tune.space.plateau_factor (with train.plateau_after_epoch 1): with plateau_after_epoch 1 the plateau rule "
     "never changes a trial of 3 epochs"),
    ({"space": {"plateau_after_epoch": {"randint": [0, 2]}}}, "leave plateau_factor and plateau_after_epoch out"),
    ({"epochs": 12, "space": {"plateau_after_epoch": {"randint": [2, 5]}}}, "keep plateau_after_epoch at 4 or less"),
    ({"epochs": 12, "space": {"plateau_after_epoch": {"choice": [0, 6]}}}, "keep plateau_after_epoch at 4 or less"),
])
def test_bad_search_settings_are_one_line_errors(change, needle):
    with pytest.raises(ParamsError) as e:
        tune_config(_params({**PARAMS["tune"], **change}))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("image_size, depths, bad", [(48, [4, 5], None), (48, [5, 6], 6), (72, [4], None),
                                                     (72, [4, 5], 5), (64, [5, 6], None), (None, [6], None)])
def test_a_searched_depth_must_fit_the_prepared_images(image_size, depths, bad):
    """Checked before any trial: the generators halve the image depth - 1 times and need at least
    2**depth pixels (72 x 72 takes 4 levels, not 5; the default image_size is 64)."""
    extra = {"prepare": {"image_size": image_size}} if image_size else {}
    params = _params({**PARAMS["tune"], "space": {"depth": {"choice": depths}}}, **extra)
    if bad is None:
        assert tune_config(params)["space"]["depth"] == ("choice", depths)
        return
    with pytest.raises(ParamsError) as e:
        tune_config(params)
    assert str(e.value).startswith(f"params: tune.space.depth: a {bad}-level U-Net does not fit the prepared "
                                   f"{image_size} x {image_size} images (prepare.image_size")


def test_the_fit_rule_is_the_models_own():
    import torch

    from train.models import build
    from train.models import depth_fits

    for depth, size in ((4, 40), (4, 36), (5, 48), (5, 40), (5, 16)):
        g = build("qsnet", width=4, depth=depth).generator.eval()
        try:
            with torch.no_grad():
                out = g(torch.zeros(1, 2, size, size))
            trains = (out[0] if isinstance(out, (list, tuple)) else out).shape[-1] == size
        except (RuntimeError, ValueError):   # a skip of another size; a 1 x 1 level's instance norm
            trains = False
        assert trains == depth_fits(size, depth), (depth, size)


def test_the_plateau_rule_s_reach_is_the_training_loop_s():
    """plateau_latest(E) is the last plateau_after_epoch whose rule lowers the learning rate of a
    later epoch of an E-epoch run, with train.loop's own Trainer (a constant validation loss: the
    soonest the rule can act)."""
    from train.loop import Trainer
    from train.models import build
    from tune.space import plateau_latest

    def changes(epochs, after):
        tr = Trainer(build("qsnet", width=4, depth=3), lr=1.0, plateau_factor=0.5, plateau_after_epoch=after)
        rates = []
        for _ in range(epochs):
            rates.append(tr.opt_g.param_groups[0]["lr"])   # the rate this epoch trains with
            tr.end_epoch(1.0)
        return len(set(rates)) > 1

    for epochs in (6, 10, 14):
        latest = plateau_latest(epochs)
        assert latest == epochs - 8
        assert not changes(epochs, latest + 1)
        if latest >= 0:
            assert changes(epochs, latest)


@pytest.mark.parametrize("spec", [{"choice": [0, 4]}, {"randint": [0, 4]}])
def test_plateau_after_epoch_zero_is_accepted_as_choice_and_randint_alike(spec):
    cfg = tune_config(_params({**PARAMS["tune"], "epochs": 12, "space": {"plateau_after_epoch": spec}}))
    assert cfg["space"]["plateau_after_epoch"][1] == list(next(iter(spec.values())))


def test_both_profiles_tune_sections_pass_the_checks():
    from ingest.params import load_params

    for profile in ("demo", "paper"):
        cfg = tune_config(load_params(Path(__file__).resolve().parents[1] / "params.yaml", profile=profile))
        assert cfg["space"]


def test_a_suggestion_becomes_train_params():
    base = {"betas": [0.5, 0.999], "ds_weights": [0.5, 0.25, 0.125, 0.0625], "augment": False}
    hp = to_train({"lr": 0.01, "beta1": 0.7, "ds_weight": 0.8, "width": 12, "depth": 5, "noise": 0.02,
                   "plateau_after_epoch": 3, "ssim_weight": 0.5}, base)
    assert hp == {"lr": 0.01, "betas": [0.7, 0.999], "ds_weights": [0.8, 0.4, 0.2, 0.1], "width": 12, "depth": 5,
                  "augment": {"elastic_px": 0.0, "noise": 0.02, "rotate_deg": 0.0}, "plateau_after_epoch": 3,
                  "ssim_weight": 0.5}
    check_hp(hp, "best.yaml: train")  # what a search writes, training must accept


@pytest.mark.parametrize("profile, want", [
    (False, {"rotate_deg": 0.0, "elastic_px": 0.0}),          # off in the profile: stays off
    (True, {"rotate_deg": 15.0, "elastic_px": 2.0}),          # on: train.data.Augment's strengths
    ({"rotate_deg": 5.0}, {"rotate_deg": 5.0, "elastic_px": 2.0}),
])
def test_a_searched_augmentation_strength_leaves_the_others_as_the_profile_has_them(profile, want):
    """A searched noise alone became augment {noise: x}, which train.data turns into Augment's
    default rotation and deformation too: switched on where the profile had augment: false."""
    from train.data import Augment

    hp = to_train({"noise": 0.02}, {"augment": profile})
    assert hp["augment"] == {**want, "noise": 0.02}
    # what a trial's dataset builds from it (train.distributed passes the mapping to Augment)
    aug = Augment(64, **hp["augment"])
    assert (aug.geometric is None) == (profile is False) and aug.noise == 0.02


def test_a_tuned_augmentation_is_checked(tmp_path):
    good = tmp_path / "best.yaml"
    good.write_text("searched: true\narch: qsnet\ntrain: {augment: {rotate_deg: 5, noise: 0.02}}\n")
    assert read_tuned(good)["train"]["augment"] == {"rotate_deg": 5, "noise": 0.02}
    for aug, needle in (("{shear: 3}", "rotate_deg"), ("{noise: -1}", "0 or more"), ("maybe", "true, false")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"searched: true\narch: qsnet\ntrain: {{augment: {aug}}}\n")
        with pytest.raises(ParamsError) as e:
            read_tuned(bad)
        assert needle in str(e.value) and "bad.yaml" in str(e.value)


def _sequence(seed: int, n: int = 6) -> list[dict]:
    from tune.search import make_searcher

    s = make_searcher({"space": parse_space(SPACE), "seed": seed, "metric": "score", "mode": "min"})
    out = []
    for i in range(n):
        out.append(s.suggest(f"t{i}"))
        s.on_trial_complete(f"t{i}", {"score": 1.0 / (i + 1)})
    return out


def test_same_seed_same_suggestions():
    a, b, c = _sequence(10), _sequence(10), _sequence(11)
    print([round(x["lr"], 5) for x in a])
    assert a == b
    assert a != c
    assert a[0]["lr"] > 5e-3 and a[1]["lr"] > 5e-3 and a[2]["lr"] < 5e-4 and a[3]["lr"] < 5e-4


def test_disabled_search_writes_a_best_yaml_that_changes_nothing(tmp_path):
    from tune.search import run_search

    summary = run_search(_params({**PARAMS["tune"], "enabled": False}), tmp_path / "none", tmp_path / "tuned",
                         tmp_path / "reports", tmp_path / "runs")
    assert summary == {"searched": False}
    assert read_tuned(tmp_path / "tuned" / "best.yaml") == {}
    assert not (tmp_path / "runs").exists()
    # the same bytes every time: the DVC stage's output, so a second `dvc repro` has nothing to do
    first = (tmp_path / "tuned" / "best.yaml").read_bytes()
    run_search(_params({**PARAMS["tune"], "enabled": False}), tmp_path / "none", tmp_path / "tuned",
               tmp_path / "reports", tmp_path / "runs")
    assert (tmp_path / "tuned" / "best.yaml").read_bytes() == first


def _best_yaml(path: Path, **fields) -> Path:
    doc = {"searched": True, "profile": "t", "arch": "qsnet",
           "scope": {"contrasts": ["t1w", "t2w"], "inputs": "mrf", "stages": ["pretrain", "finetune"]},
           "train": {}, "by_contrast": {"t1w": {"lr": 0.005}, "t2w": {"lr": 0.007, "width": 6}}, **fields}
    path.write_text(yaml.safe_dump({k: v for k, v in doc.items() if v is not None}))
    return path


def test_tuned_values_reach_only_the_runs_they_were_searched_for(tmp_path):
    from train.stages import tuned_hp

    tuned = read_tuned(_best_yaml(tmp_path / "best.yaml"), _params())
    run = {"arch": "qsnet", "contrast": "t2w", "inputs": "mrf", "stage": "pretrain"}
    assert tuned_hp(tuned, run) == {"lr": 0.007, "width": 6}
    # finetune builds the model pretrain built: it takes them too
    assert tuned_hp(tuned, {**run, "stage": "finetune"}) == {"lr": 0.007, "width": 6}
    # not the mri-input extra runs, the scratch runs, other contrasts or other architectures
    for other in ({"inputs": "mri"}, {"stage": "scratch"}, {"contrast": "swi"}, {"arch": "resunet"}):
        assert tuned_hp(tuned, {**run, **other}) == {}, other
    # a shared search's values, within its contrasts
    shared = read_tuned(_best_yaml(tmp_path / "shared.yaml", by_contrast={}, train={"lr": 0.003}))
    assert tuned_hp(shared, run) == {"lr": 0.003} and tuned_hp(shared, {**run, "contrast": "t1flair"}) == {}


def test_a_best_yaml_from_before_the_scope_applies_to_its_whole_arch(tmp_path):
    """Written before best.yaml recorded its scope and profile: read as it was then, its values go
    to every run of its architecture."""
    from train.stages import tuned_hp

    old = tmp_path / "best.yaml"
    old.write_text("searched: true\narch: qsnet\ntrain: {lr: 0.01}\nby_contrast: {}\n")
    tuned = read_tuned(old, _params())
    assert tuned["scope"] is None
    for run in ({"contrast": "t1w", "inputs": "mrf", "stage": "pretrain"},
                {"contrast": "swi", "inputs": "mri", "stage": "scratch"}):
        assert tuned_hp(tuned, {"arch": "qsnet", **run}) == {"lr": 0.01}
    assert tuned_hp(tuned, {"arch": "swin", "contrast": "t1w", "inputs": "mrf", "stage": "pretrain"}) == {}


@pytest.mark.parametrize("fields, params, needle", [
    ({"profile": "paper"}, {}, "best.yaml: searched for profile 'paper', not 't': run `qsnet tune` with this profile"),
    ({"arch": "swin"}, {}, "best.yaml: searched for architecture swin, which params' train.archs ['qsnet'] does not "
                           "train"),
    ({"scope": {"contrasts": ["t1w"], "inputs": "mrf", "stages": ["pretrain"]}}, {},
     "best.yaml: by_contrast names ['t2w'], outside its scope's contrasts ['t1w']"),
    ({"scope": {"contrasts": ["t1w", "t2w"], "inputs": "dwi", "stages": ["pretrain"]}}, {}, "best.yaml: scope must map"),
])
def test_a_best_yaml_for_other_params_is_refused(tmp_path, fields, params, needle):
    path = _best_yaml(tmp_path / "best.yaml", **fields)
    with pytest.raises(ParamsError) as e:
        read_tuned(path, _params(**params))
    assert str(e.value).startswith(f"{tmp_path / needle.split(':')[0]}:") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_pretrain_refuses_a_best_yaml_of_another_profile_before_it_trains(tmp_path):
    stores = tmp_path / "stores"   # never read: the refusal comes first
    stores.mkdir()
    params = _write_params(tmp_path / "params.yaml", PARAMS["tune"])
    best = _best_yaml(tmp_path / "best.yaml", profile="paper")
    r = subprocess.run([QSNET, "pretrain", "--params", str(params), "--stores", str(stores), "--models",
                        str(tmp_path / "models"), "--reports", str(tmp_path / "rep"), "--storage", str(tmp_path / "r"),
                        "--tuned", str(best)], capture_output=True, text=True,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"qsnet pretrain: error: {best}: searched for profile 'paper', not 't': run `qsnet tune` with this profile "
        "(or give the other profile's best.yaml)")
    assert not (tmp_path / "models").exists()


def test_cli_errors_before_ray_starts(tmp_path):
    stores = site_stores(tmp_path)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def run(tune_section, *args):
        p = _write_params(tmp_path / "params.yaml", tune_section)
        return subprocess.run([QSNET, "tune", "--params", str(p), "--stores", str(stores), "--out",
                               str(tmp_path / "tuned"), "--reports", str(tmp_path / "rep"), "--storage",
                               str(tmp_path / "runs"), *args], capture_output=True, text=True, env=env, timeout=120)

    r = run({**PARAMS["tune"], "space": {}})
    assert r.returncode == 1 and r.stderr.strip().startswith(f"qsnet tune: error: {tmp_path / 'params.yaml'}: tune.space is empty")
    r = run({**PARAMS["tune"], "metric": "ssim"})
    assert r.returncode == 1 and "never reported by the trainable" in r.stderr
    r = run(PARAMS["tune"], "--resume")
    assert r.returncode == 1 and "no search to resume here" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run(PARAMS["tune"], "--resume", "--fresh")
    assert r.returncode == 2 and r.stderr.strip() == "qsnet tune: error: --resume and --fresh contradict each other: give one"
    # a folder that holds another search (here: another space) is not resumed
    (tmp_path / "runs" / "t1w").mkdir(parents=True)
    (tmp_path / "runs" / "t1w" / "qsnet-search.json").write_text(json.dumps({"digest": "0" * 16, "space": {}}))
    r = run(PARAMS["tune"], "--resume")
    assert r.returncode == 1 and "a different search (differs from params in: " in r.stderr and "space" in r.stderr
    assert not (tmp_path / "tuned" / "best.yaml").exists()


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_search_interrupted_and_resumed_runs_only_the_rest(tmp_path):

    stores = site_stores(tmp_path)
    params = _write_params(tmp_path / "params.yaml", PARAMS["tune"])
    out, reports, runs = tmp_path / "tuned", tmp_path / "reports", tmp_path / "runs"
    cmd = [QSNET, "tune", "--params", str(params), "--stores", str(stores), "--out", str(out), "--reports",
           str(reports), "--storage", str(runs)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    events = runs / "t1w" / "events.jsonl"

    # first session: stopped (Ctrl-C) once a third trial has started, so at least one has ended
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 400
    while sum(e["event"] == "start" for e in _events(events)) < 3:
        assert proc.poll() is None and time.time() < deadline, "the search ended or stalled before its third trial"
        time.sleep(1)
    stopped_at = time.time()
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted" in log and "qsnet tune --resume" in log
    before = {e["trial"] for e in _events(events) if e["event"] == "complete"}
    assert 1 <= len(before) < 4
    assert not (out / "best.yaml").exists()

    # second session: the trials that had not ended, and only those
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    later = [e for e in _events(events) if e["time"] > stopped_at]
    started_again = {e["trial"] for e in later if e["event"] == "start"}
    assert started_again and not started_again & before
    rows = list(csv.DictReader((reports / "trials.csv").open()))
    assert len(rows) == 4 and {r["trial_id"] for r in rows} == before | {e["trial"] for e in later
                                                                           if e["event"] == "complete"}
    assert all(r["status"] in ("finished", "stopped_early") for r in rows)
    # ASHA stopped the weak trials at a rung; the table shows it
    assert any(r["status"] == "stopped_early" and int(r["epochs"]) < 3 for r in rows)
    # the trials ran the seeded sequence, in order
    rows.sort(key=lambda r: int(r["order"]))
    assert [float(r["config/lr"]) for r in rows] == pytest.approx([s["lr"] for s in _sequence(10, 4)])

    best = min((r for r in rows if r["score"]), key=lambda r: float(r["score"]))
    tuned = read_tuned(out / "best.yaml")
    assert tuned["arch"] == "qsnet"
    assert tuned["by_contrast"]["t1w"]["lr"] == pytest.approx(float(best["config/lr"]))
    assert tuned["by_contrast"]["t1w"]["width"] == int(best["config/width"])
    assert (reports / "history-t1w.png").stat().st_size > 1000
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["stopped_early"] >= 1

    # a finished search resumes to the same answer without running anything, with --resume and
    # without it (what the DVC stage runs): best.yaml written again, byte for byte
    n_events = len(_events(events))
    written = (out / "best.yaml").read_bytes()
    for extra in (["--resume"], []):
        (out / "best.yaml").unlink()
        r = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(_events(events)) == n_events
        assert (out / "best.yaml").read_bytes() == written
    assert "its 4 trials reused, none run" in r.stdout
    assert not list(runs.glob("*.previous-*"))

    # search -> train: pretrain takes the best configuration as its params for QS-Net t1w
    r = subprocess.run([QSNET, "pretrain", "--params", str(params), "--stores", str(stores), "--models",
                        str(tmp_path / "models"), "--reports", str(tmp_path / "train"), "--storage",
                        str(tmp_path / "train-runs"), "--tuned", str(out / "best.yaml")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    card = json.loads((tmp_path / "models" / "pretrain" / "qsnet" / "t1w" / "card.json").read_text())
    assert card["build"]["width"] == int(best["config/width"])
    assert card["tuned"]["hp"]["lr"] == pytest.approx(float(best["config/lr"]))
    assert card["tuned"]["sha256"] == hashlib.sha256((out / "best.yaml").read_bytes()).hexdigest()


@pytest.mark.slow
def test_shared_search_tunes_every_contrast_at_once(tmp_path):
    from train.stages import tuned_hp

    stores = site_stores(tmp_path)
    section = {**PARAMS["tune"], "per_contrast": False, "contrasts": ["t1w", "t2w"], "num_samples": 2,
               "epochs": 2, "grace_period": 2}
    params = _write_params(tmp_path / "params.yaml", section)
    r = subprocess.run([QSNET, "tune", "--params", str(params), "--stores", str(stores), "--out", str(tmp_path / "tuned"),
                        "--reports", str(tmp_path / "reports"), "--storage", str(tmp_path / "runs")],
                       capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "reports" / "trials.csv").open()))
    assert len(rows) == 2 and {row["search"] for row in rows} == {"shared"}
    # each trial trained both contrasts' models, 2 epochs each, one report per epoch
    assert max(int(row["epochs"]) for row in rows) == 4
    tuned = read_tuned(tmp_path / "tuned" / "best.yaml")
    assert tuned["by_contrast"] == {} and "lr" in tuned["train"]
    run = {"arch": "qsnet", "contrast": "t1w", "inputs": "mrf", "stage": "pretrain"}
    assert tuned_hp(tuned, {**run, "contrast": "t2w"}) == tuned_hp(tuned, run) == tuned["train"]
    assert tuned_hp(tuned, {**run, "arch": "swin"}) == {}
    # the shared search trained t1w and t2w only: the other contrasts keep the profile's params
    assert tuned_hp(tuned, {**run, "contrast": "swi"}) == {}


def _stub_plan(monkeypatch):
    """plan() without prepared stores: site_run and the stores' digests stubbed."""
    import train.stages as stages

    monkeypatch.setattr(stages, "site_run", lambda run, stores: {
        **run, "name": f"pretrain/{run['arch']}/{run['contrast']}", "site": "site-A",
        "train_stores": ["/x/a.zarr"], "val_stores": ["/x/b.zarr"], "hp": {}})
    monkeypatch.setattr(stages, "prepare_digest", lambda p: "d0")


def _stub_params(**tune) -> dict:
    return {"seed": 0, "train": {"width": 8, "epochs": 2, "use_gpu": False},
            "tune": {"enabled": True, "contrasts": ["t1w", "t2w"], "per_contrast": True, "num_samples": 2,
                     "epochs": 2, "grace_period": 1, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}, **tune}}


def test_a_trial_that_errored_then_finished_on_resume_counts_as_finished(tmp_path):
    from types import SimpleNamespace

    from tune.search import EVENTS, _best, _collect

    search = {"name": "t1w", "dir": tmp_path}
    # session 1: trial a errors, b is running at Ctrl-C; session 2 (resume_errored): a and b complete
    events = [("start", "a"), ("error", "a"), ("start", "b"), ("start", "b"), ("complete", "b"),
              ("start", "a"), ("complete", "a")]
    (tmp_path / EVENTS).write_text("".join(json.dumps({"event": e, "trial": t}) + "\n" for e, t in events))
    grid = [SimpleNamespace(metrics={"trial_id": t, "training_iteration": 2, "score": s}, path=None, error=None,
                            config={"lr": 0.01}) for t, s in (("a", 0.01), ("b", 0.5))]
    cfg = {"metric": "score", "num_samples": 2, "mode": "min"}
    result = _collect(cfg, search, grid, max_t=2)
    assert {r["trial_id"]: r["status"] for r in result["rows"]} == {"a": "finished", "b": "finished"}
    assert result["complete"] and _best(cfg, result["rows"], 2)["trial_id"] == "a"


def test_a_shared_trial_resumed_after_its_first_model_counts_every_epoch(tmp_path):
    from types import SimpleNamespace

    from tune.search import EVENTS, _best, _collect

    # two models of 3 epochs; the resumed session trained only the second (the Train checkpoint
    # held the first), so Tune counted 3 results where the trial has trained 6 epochs
    search = {"name": "shared", "dir": tmp_path}
    (tmp_path / EVENTS).write_text("".join(json.dumps({"event": e, "trial": "a"}) + "\n"
                                           for e in ("start", "start", "complete")))
    grid = [SimpleNamespace(metrics={"trial_id": "a", "training_iteration": 3, "trial_epoch": 6, "score": 0.1},
                            path=None, error=None, config={"lr": 0.01})]
    cfg = {"metric": "score", "num_samples": 1, "mode": "min"}
    rows = _collect(cfg, search, grid, max_t=6)["rows"]
    assert rows[0]["status"] == "finished" and rows[0]["epochs"] == 6
    assert _best(cfg, rows, 6, n_models=2)["trial_id"] == "a"


def test_resume_of_a_search_interrupted_in_its_first_contrast_runs_the_rest(tmp_path, monkeypatch):
    import tune.search as ts

    _stub_plan(monkeypatch)
    monkeypatch.setattr(ts, "_figures", lambda search, reports: [])
    calls = []

    def one(cfg, search, mode, progress=None):
        calls.append((search["name"], mode))
        (search["dir"] / "tuner.pkl").write_bytes(b"x")  # Tune has saved its experiment state
        done = len(calls) > 1   # the first session is stopped (Ctrl-C) during t1w
        return {"rows": [{"search": search["name"], "order": i, "trial_id": f"{search['name']}{i}",
                          "status": "finished" if done or i == 0 else "unfinished", "epochs": 2, "score": 0.1 + i}
                         for i in range(2)], "complete": done}

    monkeypatch.setattr(ts, "_one", one)
    args = (Path("/x"), tmp_path / "tuned", tmp_path / "reports", tmp_path / "runs")
    with pytest.raises(ts.SearchError, match="no search to resume here"):
        ts.run_search(_stub_params(), *args, resume=True)
    with pytest.raises(ts.Interrupted):
        ts.run_search(_stub_params(), *args)
    assert not (tmp_path / "runs" / "t2w").exists()
    summary = ts.run_search(_stub_params(), *args, resume=True)
    assert calls == [("t1w", "fresh"), ("t1w", "resume"), ("t2w", "fresh")]
    assert set(summary["searches"]) == {"t1w", "t2w"}
    assert not list((tmp_path / "runs").glob("*.previous-*"))  # nothing of the first session set aside


def _stub_one(monkeypatch, interrupt_first: bool = False) -> list:
    """_one without Ray: each call records (search, mode) and ends every trial (or, with
    ``interrupt_first``, leaves the first call's second trial unfinished)."""
    import tune.search as ts

    monkeypatch.setattr(ts, "_figures", lambda search, reports: [])
    calls = []

    def one(cfg, search, mode, progress=None):
        calls.append((search["name"], mode))
        (search["dir"] / "tuner.pkl").write_bytes(b"x")  # Tune has saved its experiment state
        done = not (interrupt_first and len(calls) == 1)
        return {"rows": [{"search": search["name"], "order": i, "trial_id": f"{search['name']}{i}",
                          "status": "finished" if done or i == 0 else "unfinished", "epochs": 2, "score": 0.1 + i,
                          "config/lr": 0.001 * (i + 1)} for i in range(2)], "complete": done}

    monkeypatch.setattr(ts, "_one", one)
    return calls


def test_a_finished_search_is_reused_and_a_changed_space_starts_afresh(tmp_path, monkeypatch):
    """What `dvc repro` runs (no --resume): a finished search of the same identity is written out
    again without training, a search of another identity is set aside and run anew."""
    import tune.search as ts

    _stub_plan(monkeypatch)
    calls = _stub_one(monkeypatch)
    args = (Path("/x"), tmp_path / "tuned", tmp_path / "reports", tmp_path / "runs")
    best = tmp_path / "tuned" / "best.yaml"
    ts.run_search(_stub_params(), *args)
    assert calls == [("t1w", "fresh"), ("t2w", "fresh")]
    written = best.read_bytes()
    doc = yaml.safe_load(written)
    assert doc["profile"] is None and doc["arch"] == "qsnet"    # _stub_params names no profile
    assert doc["scope"] == {"contrasts": ["t1w", "t2w"], "inputs": "mrf", "stages": ["pretrain", "finetune"]}
    assert set(doc["identity"]) == {"t1w", "t2w"} and doc["by_contrast"]["t1w"]["lr"] == 0.001

    said = []
    best.unlink()
    # train params no trial reads (the pretrain stage's epochs, other archs) do not make it another search
    params = _stub_params()
    params["train"].update(epochs=7, finetune_epochs=9, archs=["qsnet", "swin"])
    summary = ts.run_search(params, *args, progress=said.append)
    assert calls == [("t1w", "fresh"), ("t2w", "fresh")]           # nothing trained
    assert best.read_bytes() == written and set(summary["searches"]) == {"t1w", "t2w"}
    assert any("t1w: finished earlier with these params; its 2 trials reused, none run" in m for m in said)

    # another space: each search is set aside and searched anew
    ts.run_search(_stub_params(space={"lr": {"loguniform": [1e-5, 1e-2]}}), *args, progress=said.append)
    assert calls[2:] == [("t1w", "fresh"), ("t2w", "fresh")]
    assert any("t1w: a different search (differs from params in: space); set aside" in m for m in said)
    assert len(list((tmp_path / "runs").glob("t1w.previous-*"))) == 1
    # and --fresh searches again even when nothing changed
    ts.run_search(_stub_params(space={"lr": {"loguniform": [1e-5, 1e-2]}}), *args, fresh=True)
    assert calls[4:] == [("t1w", "fresh"), ("t2w", "fresh")]
    assert len(list((tmp_path / "runs").glob("t1w.previous-*"))) == 2
    with pytest.raises(ts.SearchError, match="--resume and --fresh contradict each other"):
        ts.run_search(_stub_params(), *args, fresh=True, resume=True)


def test_an_interrupted_search_is_resumed_without_resume(tmp_path, monkeypatch):
    import tune.search as ts

    _stub_plan(monkeypatch)
    calls = _stub_one(monkeypatch, interrupt_first=True)
    args = (Path("/x"), tmp_path / "tuned", tmp_path / "reports", tmp_path / "runs")
    with pytest.raises(ts.Interrupted, match=r"`qsnet tune --resume` \(or `qsnet tune`, `dvc repro`"):
        ts.run_search(_stub_params(), *args)
    ts.run_search(_stub_params(), *args)
    assert calls == [("t1w", "fresh"), ("t1w", "resume"), ("t2w", "fresh")]
    assert not list((tmp_path / "runs").glob("*.previous-*"))


@pytest.mark.parametrize("change, needle", [
    ({"resources": {"num_workers": 2}}, "num_workers"),      # a trial's DDP batch
    ({"resources": {"cpus_per_worker": 2}}, None),           # how fast, not what it learns
    ({"max_concurrent": 1}, None),
])
def test_what_makes_a_search_another_one(tmp_path, monkeypatch, change, needle):
    import tune.search as ts

    _stub_plan(monkeypatch)
    _, before = ts.plan(_stub_params(), Path("/x"), tmp_path)
    _, after = ts.plan(_stub_params(**change), Path("/x"), tmp_path)
    ts._fresh(before[0])
    assert ts._state(after[0])[0] == ("other" if needle else "unstarted")
    if needle:
        assert f"differs from params in: {needle})" in ts._state(after[0])[1]


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    import tune.search as ts

    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ts.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(ts.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b)))
    ts._atomic(tmp_path / "x.json", "{}\n")
    assert order == ["fsync", "replace"] and (tmp_path / "x.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_shared_search_ranks_only_trials_that_trained_every_contrast():
    from tune.search import _best

    cfg = {"metric": "score", "mode": "min"}
    # B was stopped by ASHA during its first model (t1w): its score covers t1w only, A's both contrasts
    rows = [{"trial_id": "A", "status": "finished", "epochs": 4, "score": 0.07},
            {"trial_id": "B", "status": "stopped_early", "epochs": 2, "score": 0.05}]
    assert _best(cfg, rows, max_t=4, n_models=2)["trial_id"] == "A"
    # one model per trial (a per-contrast search): every score covers the same contrast
    assert _best(cfg, rows, max_t=4, n_models=1)["trial_id"] == "B"


@pytest.mark.parametrize("train, tune, needle", [
    ({"width": 64}, {}, "train.width"),
    ({"batch_size": 4, "betas": [0.9, 0.99]}, {}, "train.batch_size, train.betas"),
    ({"inputs": "mri"}, {}, "train.inputs"),
    ({"ssim_weight": 0.3}, {}, "train.ssim_weight"),
    ({}, {"num_samples": 20}, "num_samples"),
    ({}, {"grace_period": 2, "reduction_factor": 4}, "grace_period, reduction_factor"),
])
def test_resume_with_other_train_or_search_settings_is_refused(tmp_path, monkeypatch, train, tune, needle):
    import tune.search as ts

    _stub_plan(monkeypatch)
    _, before = ts.plan(_stub_params(), Path("/x"), tmp_path)
    ts._fresh(before[0])
    changed = _stub_params(**tune)
    changed["train"].update(train)
    _, after = ts.plan(changed, Path("/x"), tmp_path)
    with pytest.raises(ts.SearchError) as e:
        ts._check_resume(after[0])
    assert f"differs from params in: {needle})" in str(e.value) and "\n" not in str(e.value)


def test_a_search_saved_before_the_ssim_term_existed_still_resumes(tmp_path, monkeypatch):
    """ssim_weight 0 trains as the loss did before the key existed: its identity leaves the key
    out, so a search interrupted then resumes on this version."""
    import tune.search as ts

    _stub_plan(monkeypatch)
    params = _stub_params()
    params["train"]["ssim_weight"] = 0.0
    _, searches = ts.plan(params, Path("/x"), tmp_path)
    assert "ssim_weight" not in searches[0]["identity"]["train"]
    ts._fresh(searches[0])
    # the identity matches; what stops this stub is the missing Ray state, the next check
    with pytest.raises(ts.SearchError, match="no Ray Tune experiment state"):
        ts._check_resume(searches[0])


@pytest.mark.parametrize("opt", ["--out", "--reports", "--storage"])
def test_tune_refuses_a_url_where_it_writes_folders(tmp_path, opt):
    params = _write_params(tmp_path / "params.yaml", {**PARAMS["tune"], "enabled": False})
    r = subprocess.run([QSNET, "tune", "--params", str(params), opt, "s3://bucket/x"], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"qsnet tune: error: {opt} s3://bucket/x: a URL is not supported here; give a folder (for --storage, one "
        "every node sees, e.g. a shared volume)")
    assert not (tmp_path / "s3:").exists()


def test_submit_refuses_a_url_for_tune_outputs(tmp_path):
    from train.submit import SubmitError, preflight

    (tmp_path / "params.yaml").write_text("profile: t\n")
    with pytest.raises(SubmitError, match=r"^--storage s3://b/runs: qsnet tune writes to folders, not URLs"):
        preflight("http://127.0.0.1:9", tmp_path, ["qsnet", "tune", "--storage", "s3://b/runs"])


@pytest.mark.parametrize("command, needle", [
    (["qsnet", "prepare", "/data/raw", "s3://b/prepared"], r"^DST s3://b/prepared: qsnet prepare writes to folders"),
    # flags and short options before the positionals are read as prepare's own CLI reads them
    (["qsnet", "prepare", "--strict", "-j", "2", "/data/raw", "s3://b/prepared"], r"^DST s3://b/prepared: qsnet"),
    (["qsnet", "prepare", "-j", "2", "stores/raw", "/shared/prepared"], r"^SRC stores/raw: a local folder the job"),
    (["qsnet", "evaluate", "--stores", "/shared/prepared"], r"^--models models \(the default\): a local folder the "
                                                            r"job cannot read: models/ is never uploaded"),
    (["qsnet", "finetune", "--stores=/shared/p", "--models", "models/x"], r"^--models models/x: a local folder"),
])
def test_submit_refuses_locations_the_job_cannot_use(tmp_path, command, needle):
    """Defaults and prepare's positionals are locations too; evaluate's --models is read, not written."""
    from train.submit import SubmitError, preflight

    (tmp_path / "params.yaml").write_text("profile: t\n")
    with pytest.raises(SubmitError, match=needle):
        preflight("http://127.0.0.1:9", tmp_path, command)


def test_submit_warns_of_default_outputs_that_stay_on_the_head(tmp_path, monkeypatch):
    import train.submit as sub

    monkeypatch.setattr(sub, "probe", lambda address: {})
    (tmp_path / "params.yaml").write_text("profile: t\nt: {train: {use_gpu: false}}\n")
    _, _, warnings = sub.preflight("http://127.0.0.1:9", tmp_path, ["qsnet", "pretrain", "--stores", "/shared/p",
                                                                   "--models", "/shared/models"])
    assert [w.split(":")[0] for w in warnings] == ["--reports reports/train (the default)", "--storage runs (the default)"]


@pytest.mark.parametrize("runtime_env", [None, Path(__file__).resolve().parents[1] / "platform" / "runtime_env.yaml"])
def test_submitted_working_dir_never_carries_secrets(tmp_path, runtime_env):
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from train.submit import read_runtime_env

    tree = tmp_path / "tree"
    secrets = [".env", ".env.local", ".env.production", ".aws/credentials", "credentials", "kuberay/s3-secret.env",
               "secrets/key.pem", "id_rsa", "id_rsa.pub", ".netrc", ".git/config", ".dvc/config.local"]
    for rel in secrets + ["train/stages.py", "params.yaml", ".dvc/config"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=True, excludes=read_runtime_env(runtime_env)["excludes"])
    names = {n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}
    assert names == {"train/stages.py", "params.yaml", ".dvc/config"}


@pytest.mark.parametrize("runtime_env", [None, Path(__file__).resolve().parents[1] / "platform" / "runtime_env.yaml"])
def test_submitted_working_dir_never_carries_bulk(tmp_path, runtime_env):
    """Without --runtime-env only .gitignore kept data out, and only what it names: a second
    simulator output (data-paper/, as the README makes one) went into the cluster's GCS."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from train.submit import read_runtime_env

    tree = tmp_path / "tree"
    for rel in ("data-paper/site-A/x.dcm", "stores/raw/a.zarr/zarr.json", "runs/ckpt.pt", "models/m.pt",
                ".venv/bin/python", "reports/evaluate/report.html", "train/models.py", "params.yaml"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=False, excludes=read_runtime_env(runtime_env)["excludes"])
    names = {n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}
    assert names == {"train/models.py", "params.yaml"}


@pytest.mark.parametrize("address, want", [("auto", "http://127.0.0.1:8265"), ("head:8265", "http://head:8265"),
                                           ("head:6379", "GCS"), ("ray://head:10001", "Ray Client")])
def test_cluster_addresses_that_are_not_a_dashboard(monkeypatch, address, want):
    from train.submit import SubmitError, dashboard_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if want.startswith("http"):
        assert dashboard_address(address) == want
    else:
        with pytest.raises(SubmitError, match=want):
            dashboard_address(address)


@pytest.mark.parametrize("space, needle", [
    ({"width": {"randint": [0, 4]}}, "width: values must be at least 1, got 0"),
    ({"depth": {"randint": [-2, 3]}}, "depth: values must be 3 to 8 U-Net levels"),
    ({"depth": {"choice": [2, 5]}}, "depth: values must be 3 to 8 U-Net levels"),   # a winner pretrain refused
    ({"lr": {"loguniform": ["1e-4", "1e-2"]}}, "YAML reads 1e-4 as text: write 1.0e-4"),
    ({"batch_size": {"choice": [True, 2]}}, "batch_size: choices must be whole numbers"),
    ({"width": {"choice": [0, 4]}}, "width: values must be at least 1, got 0"),
    ({"lr": {"choice": ["fast"]}}, "lr: choices must be numbers"),
    ({"lr": {"uniform": [-0.01, 0.01]}}, "lr: values must be > 0"),
    ({"beta1": {"uniform": [0.5, 1.5]}}, "beta1: values must be in (0, 1)"),
    ({"noise": {"uniform": [-1, 0.5]}}, "noise: values must be >= 0"),
])
def test_spaces_a_trial_cannot_train_with_are_refused(space, needle):
    with pytest.raises(ParamsError) as e:
        parse_space(space)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, needle", [
    ({"contrasts": ["t1w", "t1w"]}, "names a contrast twice"),
    ({"mode": "max"}, "tune.mode max with tune.metric score (a loss"),
])
def test_search_settings_that_cannot_mean_anything_are_refused(change, needle):
    with pytest.raises(ParamsError) as e:
        tune_config(_params({**PARAMS["tune"], **change}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_trial_without_a_score_yet_is_stopped_not_the_search(tmp_path):
    """A trial whose first validation loss is not finite reports no score: ASHA multiplied None
    and the error ended the whole search."""
    from ray.tune.schedulers import TrialScheduler

    from tune.resumable import ResumableASHA

    asha = ResumableASHA(str(tmp_path / "asha.pkl"), time_attr="training_iteration", max_t=4, grace_period=1,
                         reduction_factor=2)
    asha.set_search_properties("score", "min")

    class Trial:
        trial_id, config = "t1", {}

    assert asha.on_trial_result(None, Trial(), {"training_iteration": 1, "score": None}) == TrialScheduler.STOP


def test_a_trial_stopped_without_a_score_ends_cleanly(tmp_path):
    """Tune ends a trial the scheduler stopped with on_trial_complete and the same score-less
    result: ASHA multiplied None there, the trial ended in ERROR and a resume trained it again."""
    from ray.tune.schedulers import TrialScheduler

    from tune.resumable import ResumableASHA

    state = tmp_path / "asha.pkl"
    asha = ResumableASHA(str(state), time_attr="trial_epoch", max_t=4, grace_period=1, reduction_factor=2)
    asha.set_search_properties("score", "min")

    class Trial:
        config = {}

        def __init__(self, tid):
            self.trial_id = tid

    bad, good = Trial("bad"), Trial("good")
    for t in (bad, good):
        asha.on_trial_add(None, t)
    nothing = {"trial_epoch": 1, "score": None}
    assert asha.on_trial_result(None, bad, nothing) == TrialScheduler.STOP
    asha.on_trial_complete(None, bad, nothing)     # raised TypeError
    assert asha.on_trial_result(None, good, {"trial_epoch": 1, "score": 0.2}) == TrialScheduler.CONTINUE
    asha.on_trial_complete(None, good, {"trial_epoch": 4, "score": 0.1})
    assert asha._trial_info == {}
    # the state file follows every change: a restored copy knows neither trial is running
    again = ResumableASHA(str(state), time_attr="trial_epoch", max_t=4, grace_period=1, reduction_factor=2)
    again._load()
    assert again._trial_info == {}
    # a pending trial removed (Ctrl-C before it started) leaves the saved state too
    pending = Trial("pending")
    again.on_trial_add(None, pending)
    again.on_trial_remove(None, pending)
    third = ResumableASHA(str(state), time_attr="trial_epoch", max_t=4, grace_period=1, reduction_factor=2)
    third._load()
    assert "pending" not in third._trial_info


def test_a_search_saved_by_an_older_version_resumes_on_this_version_s_clock(tmp_path):
    from tune.resumable import ResumableASHA
    from tune.search import EPOCHS

    old = ResumableASHA(str(tmp_path / "asha.pkl"), time_attr="training_iteration", max_t=4, grace_period=1)
    old._save()
    new = ResumableASHA(str(tmp_path / "asha.pkl"), time_attr=EPOCHS, max_t=4, grace_period=1)
    new._load()
    assert new._time_attr == EPOCHS


@pytest.mark.parametrize("driver_code, want, log_drops", [(130, 130, False), (2, 2, False), (None, 1, False),
                                                      (None, 1, True), (-9, 137, False)])
def test_submit_returns_the_driver_s_exit_status(monkeypatch, tmp_path, driver_code, want, log_drops):
    """tune's 130 (interrupted: resume it) and a usage error's 2 came back as 1; a log stream that
    drops (a network blip) must not decide the exit either."""
    import ray.job_submission as js

    from train.submit import submit

    class Info:
        message, driver_exit_code = "the driver exited", driver_code

    class Client:
        def __init__(self, address):
            self.polls = 0

        def submit_job(self, **kw):
            return "job-1"

        async def tail_job_logs(self, job):
            yield "a log line\n"
            if log_drops:
                raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

        def get_job_status(self, job):  # still running at the first poll, final at the next
            self.polls += 1
            return js.JobStatus.RUNNING if self.polls == 1 else js.JobStatus.FAILED

        def get_job_info(self, job):
            return Info()

    monkeypatch.setattr(js, "JobSubmissionClient", Client)
    said = []
    assert submit("http://127.0.0.1:8265", tmp_path, ["qsnet", "tune"], {}, echo=said.append) == want
    assert any("FAILED: the driver exited" in s for s in said)
    assert any("lost the job's log stream" in s for s in said) == log_drops

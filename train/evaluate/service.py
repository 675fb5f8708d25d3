"""``qsnet evaluate``: every model of a registry on the test subjects of prepared stores.

Which model is scored on which subjects follows from its card, so the same code serves the
paper's study and a site checking the models on its own data:

- the pretraining site (site A, healthy) is the *home* cohort: the pretrained ``mrf`` models
  are its main comparison (the paper's figure 3, top row);
- every other site is a *new* cohort: the finetuned models (figure 3, bottom row), QS-Net from
  scratch (``<arch>_scratch``), and the site-A-only models with ``mrf`` and with ``mri``
  inputs (the generalisation study, figure 5);
- the physics baseline (:mod:`train.evaluate.physics`) for every cohort and contrast, fitted
  on that site's training exams.

A card that cannot be scored (its contrast has no ground truth in the stores, its input kind
is missing from them, its weights do not load) is reported with the reason and the rest runs.

Outputs under ``out`` (the report contract): ``metrics.json``, ``generalisation.json``, and
``evaluate/`` with per-subject and per-region CSV tables, ``stats.json`` (paired tests),
``checks.json``, ``summary.json`` (provenance, timings, errors), figures and ``report.html``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ingest import first_line
from ingest.prepare.service import contract_mismatch, geometry_mismatch
from train.evaluate.metrics import lesion_contrast, masked_metrics, paired_tests, region_metrics, to_12bit

__all__ = ["evaluate", "predict", "EvaluateError", "CONTRASTS", "METRICS"]

CONTRASTS = ("t1w", "t2w", "t1flair", "t2flair", "swi")
METRICS = ("ssim", "psnr", "mae")
HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "mae": False}
# phantom label values (ingest.phantom.anatomy.LABELS) of the lesion regions and the reference tissue
REGIONS = {"tumour": (8, 9, 11), "enhancing": (9,), "oedema": (10,)}
NAWM = 3
# The brain away from every lesion label, scored beside the lesions: a model trained on healthy
# exams can do well there and badly inside a lesion, and the whole-brain mean hides which.
# "Away" is beyond the reach of the SSIM window (Gaussian sigma 1.5 truncated at 3.5: 5 pixels
# in-plane, a square support), so no voxel of it scores a window that sees a lesion.
OUTSIDE = "outside_lesions"
OUTSIDE_MARGIN_PX = 5


def outside_first(regions) -> list[str]:
    """Region names in the order the report and the notes give them: the brain away from the
    lesions, then the lesion regions by name."""
    return sorted(regions, key=lambda r: (r != OUTSIDE, r))
EVAL_DEFAULTS = {"data_range": 4095.0, "k1": 0.01, "k2": 0.03, "min_ssim": 0.85}


class EvaluateError(ValueError):
    """The whole evaluation cannot run (no test subjects, no usable model)."""


def cohort_name(site: str) -> str:
    return str(site).lower().replace("-", "_")


def _model_key(card: dict) -> str:
    return f"{card['architecture']}_scratch" if card.get("stage") == "scratch" else card["architecture"]


def _json(obj) -> str:
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, float)):
            v = float(v)
            return v if math.isfinite(v) else None  # JSON has no inf/NaN: PSNR of identical images is null
        if isinstance(v, np.integer):
            return int(v)
        return v
    return json.dumps(clean(obj), indent=1, sort_keys=True) + "\n"


class _Exam:
    """One test subject: its store, brain mask, lesion regions; arrays read once, on demand."""

    def __init__(self, path: Path):
        from ingest.storage import name_parts
        from ingest.store import open_store

        self.path = path
        self.store = open_store(path)
        a = self.store.attrs
        site, subject = name_parts(path)
        self.site = str(a.get("site", site))
        self.subject = str(a.get("subject", subject))
        # visits of one patient are one subject of the statistics (prepare deals them into one split)
        self.patient = str(a.get("patient") or self.subject)
        self.cohort = cohort_name(self.site)
        self.health = str(a.get("cohort", ""))
        self.targets = set(a.get("targets") or [c for c in CONTRASTS if c in self.store])
        self.brain = np.asarray(self.store.read("brain")).astype(bool)
        self._inputs: dict = {}
        self._truth: dict = {}
        self._mask: dict = {}
        self.regions: dict[str, np.ndarray] = {}
        if "truth_labels" in self.store:
            lab = np.asarray(self.store.read("truth_labels"))
            self.regions = {k: np.isin(lab, v) & self.brain for k, v in REGIONS.items()}
            self.regions = {k: m for k, m in self.regions.items() if m.any()}
            if self.regions:
                from scipy import ndimage

                lesion = np.isin(lab, sorted({v for vs in REGIONS.values() for v in vs}))
                reach = np.ones((1, 2 * OUTSIDE_MARGIN_PX + 1, 2 * OUTSIDE_MARGIN_PX + 1), bool)
                away = self.brain & ~ndimage.binary_dilation(lesion, structure=reach)
                if away.any():
                    self.regions[OUTSIDE] = away
            self.nawm = (lab == NAWM) & self.brain
        else:
            self.nawm = None

    def input(self, kind: str) -> np.ndarray:
        from train.data import exam_input

        if kind not in self._inputs:
            self._inputs[kind] = exam_input(self.store, kind)
        return self._inputs[kind]

    def truth(self, contrast: str) -> np.ndarray:
        if contrast not in self._truth:
            self._truth[contrast] = np.asarray(self.store.read(contrast), dtype=np.float32)
        return self._truth[contrast]

    def scale(self, contrast: str) -> dict:
        return (self.store.attrs.get("scale") or {}).get(contrast) or {}

    def mask(self, contrast: str, with_mri_inputs: bool = False) -> np.ndarray:
        """The brain voxels where ``contrast`` has a truth: its series covers them. With
        ``with_mri_inputs``, only those where the mri inputs (T1w and T2w) have one too."""
        from ingest.prepare.service import scored_mask
        from train.data import INPUT_KINDS

        roles = [contrast] + ([r for r in INPUT_KINDS["mri"] if r in self.store] if with_mri_inputs else [])
        for r in roles:
            if r not in self._mask:
                self._mask[r] = scored_mask(self.store, r, self.brain)
        out = self._mask[contrast]
        for r in roles[1:]:
            out = out & self._mask[r]
        return out


def predict(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """A generator's [0, 1] output for model inputs ``x`` (N, C, H, W), in batches (evaluate's forward)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch])).float()[:, 0].numpy())
    return np.concatenate(out)


# The generalisation study's arms, scored on the same voxels: where its inputs are missing (a T1w
# or T2w series that does not cover the slice) an mri-input model sees zeros, which training
# never shows it (SliceDataset leaves such slices out), and a comparison there would be decided
# by coverage, not by the inputs' kind.
_PAIRED_ON_MRI_INPUTS = ("generalisation_mrf", "generalisation_mri", "copy")


def _score(pred01: np.ndarray, ex: _Exam, contrast: str, cfg: dict, arm: str = "main") -> tuple[dict, list[dict]]:
    L, k1, k2 = float(cfg["data_range"]), float(cfg["k1"]), float(cfg["k2"])
    p, t = to_12bit(pred01, L), to_12bit(ex.truth(contrast), L)
    mask = ex.mask(contrast, with_mri_inputs=arm in _PAIRED_ON_MRI_INPUTS)
    m = masked_metrics(p, t, mask, L, k1, k2)
    sc = ex.scale(contrast)
    if "lo" in sc and "hi" in sc:  # the normalisation is linear: scanner-unit MAE is the prepared one rescaled
        m["mae_native"] = m["mae"] / L * (float(sc["hi"]) - float(sc["lo"]))
        m["native_units"] = sc.get("units", "")
    regions = []
    if ex.regions:
        nawm = ex.nawm & mask if ex.nawm is not None else None
        for name, r in region_metrics(p, t, mask, ex.regions, L, k1, k2).items():
            lesion = name != OUTSIDE   # the rest of the brain has no contrast against NAWM to keep
            regions.append({"region": name, **{k: r[k] for k in ("mae", "ssim", "psnr", "voxels")},
                            "contrast_truth": lesion_contrast(t, ex.regions[name] & mask, nawm) if lesion else None,
                            "contrast_synth": lesion_contrast(p, ex.regions[name] & mask, nawm) if lesion else None})
    return m, regions


def _cards(models: Path, errors: list[str]):
    from train.registry import RegistryError, find_cards, read_card

    cards = []
    for path in find_cards(models):
        try:
            cards.append(read_card(path))
        except RegistryError as exc:
            errors.append(str(exc))
    return cards


def _fit_baselines(stores: Path, sites: set[str], errors: list[str], make, label: str) -> dict:
    """``make(contrast).fit(training exams)`` per (site, contrast): the physics baseline or the
    voxel-regression reference; what cannot be fitted is reported and left out."""
    from train.data import find_stores
    from train.evaluate.physics import PhysicsUnavailable

    fitted = {}
    for site in sorted(sites):
        train = find_stores(stores, splits=["train", "finetune"], sites=[site])
        if not train:
            errors.append(f"{stores}: no training exams of {site}: no {label} to fit for it")
            continue
        for c in CONTRASTS:
            try:
                fitted[(site, c)] = make(c).fit(train)
            except (PhysicsUnavailable, ValueError, KeyError) as exc:
                errors.append(f"{label} {site}/{c}: {exc}")
    return fitted


def evaluate(models: Path, stores: Path, out: Path, params: dict | None = None, progress=None) -> dict:
    """Score every usable model card under ``models`` on the test subjects under ``stores``."""
    from train import registry
    from train.data import INPUT_KINDS, find_stores
    from train.stages import DATA

    cfg = {**EVAL_DEFAULTS, **((params or {}).get("evaluate") or {})}
    models, stores, out = Path(models), Path(stores), Path(out)
    home = DATA["pretrain"][0]
    errors: list[str] = []
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()

    test = find_stores(stores, splits=["test"])
    if not test:
        raise EvaluateError(f"{stores}: no prepared store in split 'test' (run `qsnet prepare`; "
                            "its report lists the splits)")
    exams = []
    for p in test:
        try:
            exams.append(_Exam(p))
        except Exception as exc:  # noqa: BLE001 - a damaged test store is reported; the others are scored
            errors.append(f"{p}: test store not evaluated: {first_line(exc)}")
    if not exams:
        raise EvaluateError(f"{stores}: no readable prepared store in split 'test': {'; '.join(errors[:2])}")
    cards = _cards(models, errors)
    if not cards:
        raise EvaluateError(f"{models}: no usable model card (<stage>/<arch>/<contrast>/card.json) to evaluate"
                            + (f" ({'; '.join(errors[:2])})" if errors else ""))

    rows: list[dict] = []
    region_rows: list[dict] = []
    grids: dict = defaultdict(dict)  # (site, subject) -> {(model, contrast): prediction}, for the figures
    shown = _pick_grid_subjects(exams, home)
    timing = {"predict_s": 0.0, "metrics_s": 0.0, "pairs": 0}

    def record(ex, model_key, arm, contrast, pred, card=None, inputs="mrf"):
        t0 = time.perf_counter()
        try:
            m, regs = _score(pred, ex, contrast, cfg, arm)
        except OSError as exc:   # the truth or a mask of a damaged store: that score, not the run
            errors.append(f"{ex.path}: {contrast} not scored for {model_key} "
                          f"({first_line(exc)})")
            return
        timing["metrics_s"] += time.perf_counter() - t0
        timing["pairs"] += 1
        base = {"cohort": ex.cohort, "site": ex.site, "subject": ex.subject, "patient": ex.patient,
                "health": ex.health,
                "model": model_key, "arm": arm, "contrast": contrast,
                "stage": card.get("stage") if card else arm,
                "inputs": card.get("inputs") if card else inputs,
                "card": str(Path(card["_path"]).relative_to(models)) if card else "",
                "model_params_hash": card.get("params_hash") if card else "",
                "model_git_commit": card.get("git_commit") if card else ""}
        key = (ex.cohort, arm, model_key, contrast, ex.subject)
        if key in seen:  # two cards claiming the same table cell: the first one stays, the clash is reported
            errors.append(f"{base['card']}: scores the same {ex.cohort}/{model_key}/{contrast} as {seen[key]}; "
                          "not counted")
            return
        seen[key] = base["card"] or arm
        rows.append({**base, **m})
        region_rows.extend({**base, **r} for r in regs)
        if (ex.site, ex.subject) in shown and arm in ("main", "physics"):
            grids[(ex.site, ex.subject)][(model_key, contrast)] = pred

    seen: dict = {}
    for card in cards:
        name = str(Path(card["_path"]).parent.relative_to(models))
        c, kind = card["contrast"], card.get("inputs", "mrf")
        stage = card.get("stage") or Path(name).parts[0]  # the registry's folder names the stage
        trained = (card.get("trained_on") or {}).get("site") or DATA.get(stage, (home,))[0]
        targets = []
        for ex in exams:
            if stage == "pretrain" and ex.site == trained and kind == "mrf":
                targets.append((ex, "main"))
            elif stage == "pretrain" and ex.site != trained:
                targets.append((ex, f"generalisation_{kind}"))
            elif stage in ("finetune", "scratch") and ex.site == trained and kind == "mrf":
                targets.append((ex, "main"))
        if not targets:
            why = (f"stage {stage!r} with {kind!r} inputs is not part of any comparison"
                   if stage in ("finetune", "scratch") and kind != "mrf" or stage not in DATA
                   else f"no test subject of {trained} or of another site in {stores}")
            errors.append(f"{name}: not evaluated: {why}")
            continue
        if not any(c in ex.targets for ex, _ in targets):
            errors.append(f"{name}: not evaluated: contrast {c!r} has no ground truth in the test stores under {stores}")
            continue
        # scaled another way, or another size, the input would not fail: the model would
        # synthesise from numbers that mean something else (an mri model's input is the stores'
        # T1w and T2w, whose geometry the card's contract still names)
        check = contract_mismatch if kind == "mrf" else geometry_mismatch
        why = next((w for ex, _ in targets if (w := check(card.get("input"), ex.store.attrs.get("input_contract")))),
                   None)
        if why:
            errors.append(f"{name}: not evaluated: {why}")
            continue
        card = {**card, "stage": stage}
        try:
            model = registry.load(card)
        except Exception as exc:  # noqa: BLE001 - a card that does not load is reported, the rest runs
            errors.append(f"{name}: not evaluated: {first_line(exc)}")
            continue
        say(f"evaluate: {name} on {len(targets)} subject(s)")
        for ex, arm in targets:
            if c not in ex.targets:
                errors.append(f"{name}: {ex.path}: no ground truth for {c!r}")
                continue
            try:
                x = ex.input(kind)
            except ValueError as exc:
                errors.append(f"{name}: input kind {kind!r} does not match the stores: {exc}")
                break
            except OSError as exc:   # a damaged store (a missing data file): this exam, not the run
                errors.append(f"{name}: {ex.path}: input not readable ({first_line(exc)})")
                continue
            t0 = time.perf_counter()
            try:
                pred = predict(model, x)
            except Exception as exc:  # noqa: BLE001 - shape and size errors come as several types
                errors.append(f"{name}: {ex.path}: the model does not take this input "
                              f"({first_line(exc)})")
                break
            timing["predict_s"] += time.perf_counter() - t0
            if pred.shape != ex.brain.shape:
                errors.append(f"{name}: {ex.path}: the model gives {pred.shape[1:]} images for "
                              f"{ex.brain.shape[1:]} inputs: not scored")
                break
            record(ex, _model_key(card), arm, c, pred * ex.brain, card)

    from train.evaluate.physics import PhysicsBaseline, PhysicsUnavailable
    from train.evaluate.reference import VoxelRegression

    baselines = {}
    # every cohort also gets these, fitted on its site's training exams: arm, model key, class, name
    for arm, key, make, label in (("physics", "physics", PhysicsBaseline, "physics baseline"),
                                  ("reference", "voxel", VoxelRegression, "voxel-regression reference")):
        fitted = baselines[arm] = _fit_baselines(stores, {ex.site for ex in exams}, errors, make, label)
        for ex in exams:
            for c in CONTRASTS:
                if (ex.site, c) in fitted and c in ex.targets:
                    t0 = time.perf_counter()
                    try:
                        pred = fitted[(ex.site, c)].predict(ex.store.path)
                    except (PhysicsUnavailable, ValueError, KeyError) as exc:
                        errors.append(f"{label} {ex.site}/{c}: {exc}")
                        continue
                    timing["predict_s"] += time.perf_counter() - t0
                    record(ex, key, arm, c, pred)
    # The generalisation study's shortcut: an mri-input model may copy one of its inputs. Each
    # input scored as the prediction of each contrast the mri models target (outside the
    # contract, like the reference) shows how far a copy alone goes on each site.
    gen_targets = {r["contrast"] for r in rows if r["arm"] == "generalisation_mri"} - set(INPUT_KINDS["mri"])
    for ex in exams:
        for c in sorted(gen_targets & set(ex.targets)):
            for source in INPUT_KINDS["mri"]:
                if source in ex.targets:
                    try:
                        copied = ex.truth(source) * ex.brain
                    except OSError as exc:
                        errors.append(f"{ex.path}: {source} not readable for the copy arm ({first_line(exc)})")
                        continue
                    record(ex, f"copy_{source}", "copy", c, copied, inputs="mri")
    # the baselines always score: a report of them alone would stand in for the models' one
    if not any(r["card"] for r in rows):
        raise EvaluateError("no model card could be evaluated: " + ("; ".join(errors[:3]) or
                                                                    "no model matches the stores"))

    tables = _tables(rows, home)
    patient_regions = per_patient(region_rows)
    tables["lesions"] = _conspicuity(patient_regions)
    tables["generalisation_regions"] = _generalisation_by_region(region_rows)
    tables["qsnet_regions"] = _qsnet_by_region(patient_regions)
    tables["blur"] = _blur_yardstick(exams, cfg)
    data_version = registry.data_version()
    card_versions = sorted({c.get("data_version") for c in cards if c.get("data_version")})
    if data_version and card_versions and card_versions != [data_version]:
        # scored all the same: a site checks models on its own exams this way
        errors.append(f"note: model cards were trained on data version(s) {', '.join(card_versions)}, the stores "
                      f"evaluated come from {data_version}: scored as on any other site's data")
    provenance = {"data_version": data_version, "model_data_versions": card_versions,
                  "git_commit": registry.git_commit(), "git_dirty": _git_dirty(),
                  "profile": (params or {}).get("profile"),
                  "evaluate_params": cfg,
                  "evaluate_params_hash": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
                  "model_params_hashes": sorted({c.get("params_hash") for c in cards if c.get("params_hash")}),
                  "model_git_commits": sorted({c.get("git_commit") for c in cards if c.get("git_commit")})}
    n_subj_contrast = len({(r["subject"], r["contrast"]) for r in rows})
    timing.update(total_s=time.perf_counter() - t_start, subject_contrasts=n_subj_contrast,
                  per_model_subject_contrast_s=(timing["predict_s"] + timing["metrics_s"]) / max(1, timing["pairs"]))
    training = {(c.get("stage"), c["architecture"], c.get("inputs", "mrf"), c["contrast"]):
                {"epochs": c.get("epochs"), "best_epoch": c.get("best_epoch")} for c in cards}
    checks = _checks(tables, cfg, home, training, phantom=any(ex.regions or ex.nawm is not None for ex in exams))
    summary = {"provenance": provenance, "timing": timing, "errors": errors,
               "subjects": {ex.cohort: sorted(e.subject for e in exams if e.cohort == ex.cohort) for ex in exams},
               "physics": {f"{s}/{c}": b.to_dict() for (s, c), b in baselines["physics"].items()},
               "reference": {f"{s}/{c}": b.to_dict() for (s, c), b in baselines["reference"].items()},
               "lesions": tables["lesions"], "blurred_truth_ssim": tables["blur"],
               "generalisation_by_region": tables["generalisation_regions"],
               "cards": len(cards)}

    ev = out / "evaluate"
    tmp = out / f".evaluate.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_csv(tmp / "subjects.csv", rows, provenance)
    _write_csv(tmp / "regions.csv", region_rows, provenance)
    old = out / f".evaluate.old-{os.getpid()}"
    try:
        (tmp / "stats.json").write_text(_json({"provenance": provenance, **tables["stats"]}))
        (tmp / "checks.json").write_text(_json({"provenance": provenance, "checks": checks}))
        (tmp / "summary.json").write_text(_json(summary))
        from train.evaluate import report

        report.write(tmp, per_patient(rows), patient_regions, tables, checks, summary, grids, exams, home)
        # the two contract files are written beside the folder, then everything is swapped in;
        # the old folder moves aside first, so a failure never leaves a half-written one
        (tmp / "metrics.json").write_text(_json(tables["metrics"]))
        (tmp / "generalisation.json").write_text(_json(tables["generalisation"]))
        if ev.exists():
            os.replace(ev, old)
        for name in ("metrics.json", "generalisation.json"):
            os.replace(tmp / name, out / name)
        os.replace(tmp, ev)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return {"metrics": tables["metrics"], "generalisation": tables["generalisation"], "checks": checks,
            "errors": errors, "timing": timing, "rows": len(rows)}


def _git_dirty() -> bool | None:
    import subprocess

    try:
        # code and params only: a pipeline's own outputs (dvc.lock, reports) are always uncommitted
        # while it runs
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.yaml",
                              ":!dvc.lock"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _pick_grid_subjects(exams: list[_Exam], home: str) -> set[tuple[str, str]]:
    """One healthy subject of the home site, and the subject of every other site with the most lesion."""
    picked = set()
    for site in sorted({e.site for e in exams}):
        group = sorted((e for e in exams if e.site == site), key=lambda e: e.subject)
        if site != home:
            group.sort(key=lambda e: -int(e.regions["tumour"].sum()) if "tumour" in e.regions else 0)
        picked.add((site, group[0].subject))
    return picked


def _mean(v) -> float:
    v = [x for x in v if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


# per-exam numbers a patient's visits are averaged over (voxels are summed)
_VISIT_MEANS = (*METRICS, "mae_native", "contrast_truth", "contrast_synth")


def per_patient(rows: list[dict]) -> list[dict]:
    """One row per patient for each (cohort, arm, model, contrast, region): the means over its
    visits, ``visits`` their number. Two exams of one patient are not two independent subjects:
    counted apart they would narrow the sd and inflate the paired tests' n. A row without a
    patient stands for itself."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["cohort"], r["arm"], r["model"], r["contrast"], r.get("region", ""),
                r.get("patient") or r["subject"])].append(r)
    out = []
    for key, rs in groups.items():
        row = {**rs[0], "patient": key[-1], "visits": len(rs)}
        if len(rs) > 1:
            row["subject"] = key[-1]
            for k in _VISIT_MEANS:
                if k in row:
                    v = [r[k] for r in rs if r.get(k) is not None]
                    row[k] = _mean(v) if v else None
            if "voxels" in row:
                row["voxels"] = sum(int(r.get("voxels") or 0) for r in rs)
        out.append(row)
    return out


def _shared_by_patient(a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    """Two sides' ``{exam: row}`` cut to the exams both were scored on, then averaged per
    patient (``per_patient``), in one patient order. Averaged first, a patient's visit that only
    one side scored would weigh into its mean and not the other's."""
    shared = sorted(set(a) & set(b))
    pa = {r["patient"]: r for r in per_patient([a[s] for s in shared])}
    pb = {r["patient"]: r for r in per_patient([b[s] for s in shared])}
    return [pa[p] for p in sorted(pa)], [pb[p] for p in sorted(pa)]


def _tables(rows: list[dict], home: str) -> dict:
    """The tables of ``rows`` (one per exam): means over patients, paired tests over the
    patients of the exams both sides were scored on."""
    by = defaultdict(dict)  # (cohort, arm, model, contrast) -> {exam: row}
    for r in rows:
        by[(r["cohort"], r["arm"], r["model"], r["contrast"])][r["subject"]] = r

    def means(cells: dict) -> dict:
        patients = per_patient(list(cells.values()))
        return {m: _mean([r[m] for r in patients]) for m in METRICS} | {"n": len(patients)}

    metrics: dict = defaultdict(lambda: defaultdict(dict))
    reference: dict = defaultdict(dict)  # not in metrics.json: the report contract names its models
    copies: dict = defaultdict(dict)  # cohort -> contrast -> mri input -> its scores as a prediction
    for (cohort, arm, model, c), cells in by.items():
        if arm in ("main", "physics"):
            metrics[cohort][model][c] = means(cells)
        elif arm == "reference":
            reference[cohort][c] = means(cells)
        elif arm == "copy":
            copies[cohort].setdefault(c, {})[model.split("_", 1)[1]] = means(cells)

    def paired(a: dict, b: dict) -> dict:
        ra, rb = _shared_by_patient(a, b)
        return {m: paired_tests([r[m] for r in ra], [r[m] for r in rb]) for m in METRICS}

    stats: dict = {"qsnet_vs": defaultdict(lambda: defaultdict(dict)), "generalisation": {}, "two_stage_vs_scratch": {}}
    for (cohort, arm, model, c), cells in by.items():
        ref = by.get((cohort, "main", "qsnet", c))
        if arm in ("main", "physics", "reference") and model != "qsnet" and ref:
            stats["qsnet_vs"][cohort][model][c] = paired(ref, cells)
    # per cohort (every site the site-A-only models are tested on); generalisation.json holds
    # the first of them (site B in the paper's study), stats.json all of them
    by_cohort: dict = defaultdict(lambda: defaultdict(lambda: {"mrf": {}, "mri": {}, "p_values": {}}))
    for (cohort, arm, model, c), cells in by.items():
        if arm.startswith("generalisation_"):
            by_cohort[cohort][model][arm.split("_", 1)[1]][c] = means(cells) | {"cohort": cohort}
    for cohort, archs in by_cohort.items():
        for arch, g in archs.items():
            for c in set(g["mrf"]) & set(g["mri"]):
                g["p_values"][c] = paired(by[(cohort, "generalisation_mrf", arch, c)],
                                          by[(cohort, "generalisation_mri", arch, c)])
    gen = by_cohort[sorted(by_cohort)[0]] if by_cohort else {}
    stats["generalisation"] = {cohort: {a: g["p_values"] for a, g in archs.items()}
                               for cohort, archs in by_cohort.items()}
    for (cohort, _arm, model, c), cells in by.items():
        if model == "qsnet_scratch" and (cohort, "main", "qsnet", c) in by:
            stats["two_stage_vs_scratch"].setdefault(cohort, {})[c] = paired(by[(cohort, "main", "qsnet", c)], cells)
    return {"metrics": metrics, "reference": reference, "copies": copies, "generalisation": gen, "stats": stats,
            "home": home}


# Lesion contrasts weaker than this (relative to NAWM) are too faint to call erased or kept.
MIN_LESION_CONTRAST = 0.2


def _generalisation_by_region(region_rows: list[dict]) -> dict:
    """``{cohort: {arch: {contrast: {region: {"mrf", "mri", "n"}}}}}``: the generalisation pair's
    SSIM inside each lesion region and in the brain outside them, on the exams both input kinds
    were scored on, means over their patients (region rows, one per exam). The check is decided
    on the whole brain, as the paper's; this says where a whole-brain result comes from."""
    cells: dict = defaultdict(dict)
    for r in region_rows:
        if r["arm"].startswith("generalisation_") and r.get("ssim") is not None:
            cells[(r["cohort"], r["model"], r["contrast"], r["region"], r["arm"].split("_", 1)[1])][r["subject"]] = r
    out: dict = {}
    for (cohort, arch, c, region, kind), by in sorted(cells.items()):
        if kind != "mrf":
            continue
        ra, rb = _shared_by_patient(by, cells.get((cohort, arch, c, region, "mri"), {}))
        if ra:
            out.setdefault(cohort, {}).setdefault(arch, {}).setdefault(c, {})[region] = {
                "mrf": _mean([r["ssim"] for r in ra]), "mri": _mean([r["ssim"] for r in rb]), "n": len(ra)}
    return out


def _qsnet_by_region(region_rows: list[dict]) -> dict:
    """``{cohort: {contrast: {region: {"ssim", "n"}}}}``: the finetuned QS-Net's SSIM inside each
    lesion region and in the brain outside their reach, means over the rows (one per patient)."""
    cells = defaultdict(list)
    for r in region_rows:
        if r["arm"] == "main" and r["model"] == "qsnet" and r.get("ssim") is not None:
            cells[(r["cohort"], r["contrast"], r["region"])].append(r["ssim"])
    out: dict = {}
    for (cohort, c, region), v in sorted(cells.items()):
        out.setdefault(cohort, {}).setdefault(c, {})[region] = {"ssim": _mean(v), "n": len(v)}
    return out


def _bar_region_note(cells: dict, bar: float) -> str:
    """Where a missed SSIM bar is lost: in the lesions and near them, or in the rest of the brain too."""
    out = cells.get(OUTSIDE, {}).get("ssim", float("nan"))
    inside = [f"{reg} {cells[reg]['ssim']:.3f}" for reg in outside_first(cells)
              if reg != OUTSIDE and math.isfinite(cells[reg]["ssim"])]
    if not math.isfinite(out) or not inside:
        return ""
    where = (f"the brain beyond {OUTSIDE_MARGIN_PX} px of the lesions reaches {out:.3f}, above the bar: the lesions "
             "and their surroundings pull the mean down" if out >= bar else
             f"the brain beyond {OUTSIDE_MARGIN_PX} px of the lesions reaches only {out:.3f}: short of the bar away "
             "from the lesions too")
    return f"{where} (SSIM in the {', '.join(inside)})"


def _region_note(cells: dict) -> str:
    """Where a generalisation pair is won and lost: outside the lesions and inside them."""
    parts = [f"{'outside the lesions' if reg == OUTSIDE else 'in the ' + reg} mrf {v['mrf']:.3f} against mri "
             f"{v['mri']:.3f}" for reg in outside_first(cells) for v in [cells[reg]]
             if math.isfinite(v["mrf"]) and math.isfinite(v["mri"])]
    return ("SSIM " + ", ".join(parts)) if parts else ""


def _kept(truth: float, synth: float) -> float:
    """The share of a lesion's true contrast the synthesis keeps; NaN where the truth is too faint."""
    if not (math.isfinite(truth) and math.isfinite(synth)) or abs(truth) < MIN_LESION_CONTRAST:
        return float("nan")
    return synth / truth


def _verdict(truth: float, synth: float) -> str:
    """How a synthesis renders a lesion whose true contrast against NAWM is ``truth``."""
    kept = _kept(truth, synth)
    if not math.isfinite(kept):
        return ""
    if kept < 0:
        return "inverted"
    return "erased" if kept < 0.25 else "faint" if kept < 0.5 else "exaggerated" if kept > 2 else "kept"


def _conspicuity(region_rows: list[dict]) -> dict:
    """{cohort: {model: {contrast: {region: truth, synth, kept, verdict}}}}: the lesion contrast
    against NAWM in the truth and in each model's synthesis, means over the rows (one per
    patient: ``per_patient``). A synthesis
    can score well overall and still erase a lesion: these cells show it."""
    cells = defaultdict(list)
    for r in region_rows:
        if r["arm"] in ("main", "physics", "reference") and r["region"] != OUTSIDE \
                and r.get("contrast_truth") is not None and r.get("contrast_synth") is not None:
            cells[(r["cohort"], r["model"], r["contrast"], r["region"])].append(r)
    out: dict = {}
    for (cohort, model, c, region), rs in sorted(cells.items()):
        t, s = _mean([r["contrast_truth"] for r in rs]), _mean([r["contrast_synth"] for r in rs])
        out.setdefault(cohort, {}).setdefault(model, {}).setdefault(c, {})[region] = {
            "truth": t, "synth": s, "kept": _kept(t, s), "verdict": _verdict(t, s), "subjects": len(rs)}
    return out


def _blur_yardstick(exams: list, cfg: dict, sigma_px: float = 1.0) -> dict:
    """``{"sigma_px", "ssim": {cohort: {contrast: SSIM of the truth blurred by a Gaussian of
    sigma_px pixels, against the truth}}}``.

    How demanding an SSIM bar is depends on the grid: on a coarse one every anatomical edge is a
    pixel wide, and a synthesis a little softer than the truth loses much. This measures it on
    the stores evaluated, so the report can say what a 1-pixel blur alone costs."""
    from scipy import ndimage

    L, k1, k2 = float(cfg["data_range"]), float(cfg["k1"]), float(cfg["k2"])
    cells = defaultdict(list)
    for ex in exams:
        for c in sorted(set(CONTRASTS) & ex.targets):
            mask = ex.mask(c)
            t = to_12bit(ex.truth(c), L) * mask
            b = ndimage.gaussian_filter(t, sigma_px, axes=(-2, -1)) * mask
            cells[(ex.cohort, c)].append(masked_metrics(b, t, mask, L, k1, k2)["ssim"])
    ssim: dict = {}
    for (cohort, c), v in sorted(cells.items()):
        ssim.setdefault(cohort, {})[c] = _mean(v)
    return {"sigma_px": sigma_px, "ssim": ssim}


def _undertrained(training: dict, key: tuple) -> str:
    t = training.get(key) or {}
    if t.get("epochs") and t.get("best_epoch") == t.get("epochs"):
        # the input kind named: the generalisation study's two models of one contrast read alike otherwise
        return (f"{key[1]} {key[3]} ({key[0]}, {key[2]} inputs): validation loss still falling at its last epoch "
                f"({t['epochs']}): under-trained on this profile")
    return ""


def _reference_note(ref: float, got: float, bar: float) -> str:
    """Whether the maps carry the contrast at the bar, by the voxel-regression reference."""
    if not math.isfinite(ref):
        return ""
    if ref >= bar:
        return (f"the voxel-regression reference reaches {ref:.3f} from the same maps: they carry this contrast at "
                f"the bar, and QS-Net ({got:.3f}) has not learned it")
    shown = f"{ref:.4f}" if round(ref, 3) >= bar else f"{ref:.3f}"  # 0.8496 must not read as 0.850
    return (f"the voxel-regression reference reaches only {shown} from the same maps: near each voxel they do "
            f"not carry this contrast at {bar} (a network's wider context may carry more)"
            + (f"; QS-Net ({got:.3f}) is short of the reference too" if got < ref else "")
            + (": it has not learned all that the maps carry near a voxel" if ref - got >= 0.02 else ""))


def _significance(p: dict, alpha: float = 0.05) -> str:
    """How much a failed comparison says, from its paired tests over subjects."""
    ps = [v for v in (p.get("wilcoxon_p"), p.get("ttest_p")) if v is not None]
    if not ps:
        return ""
    text = (f"SSIM paired over {p.get('n')} subjects: Wilcoxon p {_fmt_p(p.get('wilcoxon_p'))}, "
            f"t-test p {_fmt_p(p.get('ttest_p'))}")
    if min(ps) >= alpha:
        text += ", not a significant difference either way"
    n = p.get("n") or 0
    if p.get("wilcoxon_p") is not None and 2.0 / 2 ** n >= alpha:
        # the exact two-sided test's smallest p is 2 / 2^n
        text += f" (with {n} subjects Wilcoxon cannot go below p {2.0 / 2 ** n:.3g})"
    return text


def _copy_note(copies: dict, contrast: str, mri_ssim: float) -> str:
    """How close an mri-input model gets to ``contrast`` by copying one of its inputs."""
    scored = {k: v["ssim"] for k, v in copies.items() if math.isfinite(v.get("ssim", float("nan")))}
    if not scored:
        return ""
    source = max(scored, key=scored.get)
    return (f"the mri input {source} alone, copied, scores SSIM {scored[source]:.3f} against {contrast} on this site "
            f"(the mri-input model: {mri_ssim:.3f})")


def _fmt_p(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _beats(a: float, b: float, metric: str) -> bool:
    """Strictly better; a value that is not finite never wins."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return a > b if HIGHER_IS_BETTER[metric] else a < b


def _not_run(check: str, contrast: str, why: str) -> dict:
    """A check that cannot run: a failed row saying why, not a missing one (a summary of
    "0/0 passed" would read as a pass)."""
    return {"check": check, "contrast": contrast, "value": None, "passed": False, "note": f"not evaluated: {why}"}


def _checks(tables: dict, cfg: dict, home: str, training: dict | None = None, phantom: bool = False) -> list[dict]:
    """The issue's acceptance numbers, each with pass/fail, the values behind it and, where a
    check fails and the model card shows why, a note."""
    from train.data import INPUT_KINDS

    training = training or {}
    out = []
    metrics = tables["metrics"]
    for cohort, models in sorted(metrics.items()):
        if cohort == cohort_name(home):
            continue
        bar_check = f"{cohort}: QS-Net (finetuned) SSIM >= {cfg['min_ssim']}"
        phys_check = f"{cohort}: QS-Net beats the physics baseline (SSIM, PSNR and MAE)"
        if "qsnet" not in models:
            out.append(_not_run(bar_check, "", "no finetuned QS-Net was scored on this cohort (see the errors)"))
            continue
        for c, m in sorted(models["qsnet"].items()):
            ok = bool(math.isfinite(m["ssim"]) and m["ssim"] >= cfg["min_ssim"])
            ref = (tables.get("reference", {}).get(cohort) or {}).get(c, {}).get("ssim", float("nan"))
            notes = [] if ok else [_reference_note(ref, m["ssim"], cfg["min_ssim"]),
                                   _bar_region_note(tables.get("qsnet_regions", {}).get(cohort, {}).get(c, {}),
                                                    cfg["min_ssim"]),
                                   _undertrained(training, ("finetune", "qsnet", "mrf", c))]
            out.append({"check": bar_check, "contrast": c,
                        "value": m["ssim"], "passed": ok, "note": "; ".join(n for n in notes if n)})
            phys = models.get("physics", {}).get(c)
            if not phys:
                out.append(_not_run(phys_check, c, "the physics baseline has no prediction here (see the errors)"))
            else:
                # on the subjects both were scored on: a model that failed on one exam must not be
                # compared by its mean over the others with the baseline's mean over all
                pst = tables["stats"]["qsnet_vs"].get(cohort, {}).get("physics", {}).get(c, {})
                if not (pst.get("ssim") or {}).get("n"):
                    out.append(_not_run(phys_check, c, "QS-Net and the physics baseline share no scored subject"))
                    continue
                m = {**m, **{k: pst[k]["mean_a"] for k in METRICS if (pst.get(k) or {}).get("n")}}
                phys = {**phys, **{k: pst[k]["mean_b"] for k in METRICS if (pst.get(k) or {}).get("n")}}
                wins = {k: _beats(m[k], phys[k], k) for k in METRICS}
                ok = all(wins.values())
                why = ["lost on " + ", ".join(k for k, w in wins.items() if not w), _significance(pst["ssim"])]
                if math.isfinite(ref):
                    why.append(f"the voxel-regression reference reaches SSIM {ref:.3f} against the baseline's "
                               f"{phys['ssim']:.3f}" + (": learning from these exams can beat the equation"
                                                        if ref > phys["ssim"] else ""))
                if phantom:
                    why.append("the phantom renders its contrasts with these same signal equations (plus PD, B1, "
                               "partial volume and noise), so the baseline starts close to the truth")
                why.append(_undertrained(training, ("finetune", "qsnet", "mrf", c)))
                note = "" if ok else "; ".join(w for w in why if w)
                out.append({"check": phys_check, "contrast": c, "value": {k: [m[k], phys[k]] for k in METRICS},
                            "passed": ok, "note": note.rstrip("; ")})
    gen = tables["generalisation"]
    # the study needs another site's test exams: evaluated on its own site alone, there is none to run
    other_site = any(cohort != cohort_name(home) for cohort in metrics)
    expected = {(k[1], k[3]) for k in training if k[0] == "pretrain" and k[2] == "mri"} if other_site else set()
    for arch, c in sorted(expected | {(a, c) for a, g in gen.items() for c in g["mri"]}):
        g = gen.get(arch) or {"mrf": {}, "mri": {}}
        if c not in g["mrf"] or c not in g["mri"]:
            out.append(_not_run(f"generalisation: {arch} with mrf inputs beats mri inputs (SSIM)", c,
                                f"no {'mrf' if c not in g['mrf'] else 'mri'}-input model was scored on this "
                                "contrast (see the errors)"))
    for arch, g in sorted(gen.items()):
        for c in sorted(set(g["mrf"]) & set(g["mri"])):
            a, b = g["mrf"][c], g["mri"][c]
            pv = g["p_values"].get(c, {}).get("ssim") or {}
            if pv.get("n"):   # on the subjects both models were scored on
                a, b = {**a, "ssim": pv["mean_a"]}, {**b, "ssim": pv["mean_b"]}
            ok = _beats(a["ssim"], b["ssim"], "ssim")
            notes = [] if ok else [
                _significance(g["p_values"].get(c, {}).get("ssim") or {}),
                _region_note(tables.get("generalisation_regions", {}).get(a.get("cohort"), {}).get(arch, {})
                             .get(c, {})),
                f"the mri input holds {c} itself" if c in INPUT_KINDS["mri"] else
                _copy_note(tables.get("copies", {}).get(a.get("cohort"), {}).get(c, {}), c, b["ssim"]),
                *(_undertrained(training, ("pretrain", arch, k, c)) for k in ("mrf", "mri"))]
            out.append({"check": f"generalisation: {arch} with mrf inputs beats mri inputs (SSIM)", "contrast": c,
                        "value": [a["ssim"], b["ssim"]], "passed": ok, "note": "; ".join(n for n in notes if n)})
    return out


def _write_csv(path: Path, rows: list[dict], provenance: dict) -> None:
    extra = {"data_version": provenance["data_version"], "git_commit": provenance["git_commit"],
             "evaluate_params_hash": provenance["evaluate_params_hash"]}
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + list(extra))
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["cohort"], r["arm"], r["model"], r["contrast"], r["subject"],
                                             r.get("region", ""))):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in {**r, **extra}.items()})

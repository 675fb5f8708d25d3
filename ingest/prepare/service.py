"""The prepare stage: raw exam stores -> training-ready stores on the (resized) MRF grid.

Per exam (section 2.3 of the paper): rigid registration of each mpMRI series to the MRF T1
map (elastix), resampling onto the MRF slices with a slab average, a brain mask from the
MRF T1 map, in-plane resizing to the profile's size, [0, 1] scaling inside the brain (the
MRF maps as relaxation rates on a fixed scale, each contrast between its own percentiles),
and a quality gate. Everything needed to invert the last three steps is kept in the store, so a
result can be written back onto the native MRF grid in scanner units.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PREPARE_VERSION", "PrepareError", "prepare", "prepare_exam", "prepare_inputs", "input_contract",
           "valid_name", "scored_mask",
           "input_scaling", "contract_mismatch", "geometry_mismatch", "orientation_mismatch", "assign_splits", "DEFAULTS"]

# 2: the prepared grid has one orientation (grid.canonical_grid); 3: each target has its
# valid_<role> mask of the brain voxels its series covers; 4: targets take the mpMRI slices
# as slabs (resample(slabs=True)), not as points interpolated and then averaged again
PREPARE_VERSION = "4"
INPUT_ROLES = ("mrf_t1", "mrf_t2")
TARGETS = ("t1w", "t2w", "t1flair", "t2flair", "swi")

DEFAULTS = {
    "image_size": 64,
    "fov_mm": 256.0,   # the prepared field of view: pixels of fov_mm / image_size mm, whatever the scan's
    "targets": list(TARGETS),
    "registration": {"resolutions": 3, "iterations": 300, "samples": 4096, "histogram_bins": 32, "threads": 1,
                     "max_rotation_deg": 20.0, "max_translation_mm": 30.0, "min_mi_gain": -0.02,
                     "min_mi": 1.015, "min_coverage": 0.8, "mirror_margin": 0.01},
    "brain_mask": {"t1_range_ms": [750.0, 6000.0], "opening": 1, "closing": 1, "min_voxels": 500},
    # inputs: "rate" (ref / T on a fixed scale, see grid.rate_scale) or "percentiles" (per exam,
    # as the targets). A model card without "inputs" predates the choice: "percentiles".
    "normalise": {"percentiles": [0.5, 99.5], "inputs": "rate", "rate_ms": {"mrf_t1": 250.0, "mrf_t2": 20.0}},
    "mrf_check": {"max_bad_fraction": 0.01},
    "split": {"train_fraction": {"site-A": 20 / 32, "site-B": 9 / 18}, "val_fraction": 0.2},
}


class PrepareError(ValueError):
    """An exam that cannot be prepared; the message is the reason in the report, ``details``
    (e.g. the registration measures that failed the gate) go into its report entry."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def config(params: dict) -> dict:
    """The prepare section of a profile over the defaults (nested dicts merged), plus the seed."""
    def merge(a, b):
        out = dict(a)
        for k, v in (b or {}).items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out
    cfg = merge(copy.deepcopy(DEFAULTS), params.get("prepare", {}))  # never a config sharing DEFAULTS' dicts
    cfg["seed"] = int(params.get("seed", 0))
    cfg["registration"]["seed"] = cfg["seed"]
    unknown = [t for t in cfg["targets"] if t not in TARGETS]
    if unknown:
        raise PrepareError(f"params: unknown target contrast(s) {unknown} (known: {', '.join(TARGETS)})")
    size = cfg["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 2048:
        raise PrepareError(f"params: prepare.image_size {size!r}: expected a whole number of pixels (8-2048)")
    if not (isinstance(cfg["fov_mm"], (int, float)) and 50 <= float(cfg["fov_mm"]) <= 500):
        raise PrepareError(f"params: prepare.fov_mm {cfg['fov_mm']!r}: expected a field of view in mm (50-500)")
    _check_normalise(cfg["normalise"], "params: prepare.normalise")
    return cfg


def pixel_mm(cfg: dict) -> float | None:
    """Prepared pixel size of a prepare config or an input contract (None: a contract from
    before it was fixed, whose pixels spanned each exam's own field of view)."""
    if cfg.get("pixel_mm") is not None:
        return float(cfg["pixel_mm"])
    if cfg.get("fov_mm") is not None:
        return round(float(cfg["fov_mm"]) / int(cfg["image_size"]), 6)
    return None


def valid_name(role: str) -> str:
    """The prepared array marking the brain voxels where ``role``'s series gives a truth (it
    covers them). Stores prepared before version 3 lack it: there the brain is the mask."""
    return f"valid_{role}"


def scored_mask(store, role: str, brain: np.ndarray | None = None) -> np.ndarray:
    """Where ``role`` can be learnt and scored in a prepared store: the brain, less the voxels
    its series does not cover. ``store`` is an ExamStore or a zarr group; ``brain`` saves
    reading it again."""
    def read(name):
        return np.asarray(store.read(name) if hasattr(store, "read") else store[name][...])

    brain = (read("brain") if brain is None else np.asarray(brain)).astype(bool)
    name = valid_name(role)
    return brain & (read(name) > 0) if name in store else brain


def _input_kind(norm: dict) -> str:
    # a contract without "inputs" predates the choice, when inputs were scaled as the targets
    return norm.get("inputs", "percentiles")


def _check_normalise(norm: dict, where: str) -> str:
    """The input scaling of a profile or a model card's contract: its kind, checked."""
    kind = _input_kind(norm)
    if kind not in ("rate", "percentiles"):
        raise PrepareError(f"{where}.inputs {kind!r}: expected 'rate' or 'percentiles'")
    if kind == "rate":
        ref = norm.get("rate_ms") or {}
        bad = [r for r in INPUT_ROLES if not (isinstance(ref.get(r), (int, float)) and ref[r] > 0)]
        if bad:
            raise PrepareError(f"{where}.rate_ms: needs a positive reference time (ms) for {', '.join(bad)}")
    return kind


# ----------------------------------------------------------------------------- splits

def assign_splits(exams: list[tuple], cfg: dict) -> dict[tuple[str, str], str]:
    """Deterministic split of ``(site, subject, cohort[, patient])`` exams, per site, in fixed
    proportions, dealt per patient: every visit of one patient lands in the same split (two
    visits in finetune and test would leak the patient into the test).

    Patients are ranked by a hash of (seed, pseudonym) of their first-ranked exam (a patient
    with one exam: of that exam); the first ``round(n * train_fraction)`` train (``finetune``
    for a GBM cohort), the rest test; ``val_fraction`` of the training part (at least one
    patient when it has two or more) is held out for validation. Excluded exams keep their
    place in the ranking, so excluding one never re-deals the others.
    """
    sp = cfg["split"]
    out = {}
    rank = lambda subj: hashlib.sha256(f"{cfg['seed']}:{subj}".encode()).hexdigest()  # noqa: E731
    for site in sorted({e[0] for e in exams}):
        patients: dict[str, list[tuple]] = {}
        for e in exams:
            if e[0] == site:
                patients.setdefault((e[3] if len(e) > 3 and e[3] else e[1]), []).append(e)
        order = sorted(patients.values(), key=lambda visits: min(rank(v[1]) for v in visits))
        n = len(order)
        frac = float(sp["train_fraction"].get(site, 0.5))
        n_train = min(n, max(1 if n > 1 else 0, round(n * frac)))
        n_val = round(n_train * float(sp["val_fraction"]))
        if n_train >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, n_train - 1) if n_train > 1 else 0
        for i, visits in enumerate(order):
            for s, subj, cohort, *_ in visits:
                first = "finetune" if cohort == "gbm" else "train"
                out[(s, subj)] = first if i < n_train - n_val else ("val" if i < n_train else "test")
    return out


# ----------------------------------------------------------------------------- one exam

@dataclass
class ExamTask:
    raw: str
    dst: str
    site: str
    subject: str
    split: str
    digest: str
    figure: str


def _check_map(name: str, vol: np.ndarray, cfg: dict) -> np.ndarray:
    bad = ~np.isfinite(vol)
    neg = np.isfinite(vol) & (vol < 0)
    limit = float(cfg["mrf_check"]["max_bad_fraction"])
    if bad.mean() > limit:
        raise PrepareError(f"{name}: {100 * bad.mean():.0f}% of voxels are NaN or infinite: not a usable MRF map")
    if neg.mean() > limit:
        raise PrepareError(f"{name}: {100 * neg.mean():.0f}% of voxels are negative: not a T1/T2 map in ms")
    return np.where(bad | neg, 0.0, vol).astype(np.float32)


def _phantom_error(attrs: dict, role: str, fixed_aff: np.ndarray, truth_brain: np.ndarray,
                   m: np.ndarray) -> float | None:
    """Mean distance (mm) over the true brain between where the registration and the
    simulator's poses put each MRF voxel in the mpMRI series."""
    series = (attrs.get("phantom_truth") or {}).get("series") or {}
    if "mrf_t1" not in series or role not in series or not truth_brain.any():
        return None
    pf = np.asarray(series["mrf_t1"]["pose_head_to_lps"], float)
    pm = np.asarray(series[role]["pose_head_to_lps"], float)
    true = pm @ np.linalg.inv(pf)
    idx = np.argwhere(truth_brain > 0)
    pts = fixed_aff @ np.c_[idx, np.ones(len(idx))].T
    return float(np.linalg.norm(((m - true) @ pts)[:3], axis=0).mean())


def prepare_exam(task: ExamTask, cfg: dict) -> dict:
    """Prepare one exam; returns its report entry (status ``prepared`` or ``excluded``)."""
    from threadpoolctl import threadpool_limits

    entry = {"site": task.site, "subject": task.subject, "split": task.split, "digest": task.digest}
    t0 = time.perf_counter()
    try:
        with threadpool_limits(1):
            entry.update(_prepare(task, cfg))
        entry["status"] = "prepared"
    except PrepareError as exc:
        entry.update(exc.details)
        entry.update(status="excluded", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken exam must not stop the stage
        entry.update(status="excluded", reason=f"failed ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                     # not a property of the data (a full disk, memory): the next run tries it again
                     transient=True)
    if entry["status"] == "excluded":
        _remove_store(Path(task.dst))  # never leave an earlier version for training to read
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


def _remove_store(path: Path) -> None:
    if path.is_dir() and (path / "zarr.json").exists():
        shutil.rmtree(path)


def input_contract(cfg: dict) -> dict:
    """What a model trained on this profile's stores expects as input: the settings that turn
    two MRF maps into its input (the model card carries it, so serving needs no params file)."""
    from ingest.prepare.grid import ORIENTATION

    return {"channels": list(INPUT_ROLES), "units": "ms", "image_size": int(cfg["image_size"]),
            "pixel_mm": pixel_mm(cfg), "orientation": ORIENTATION,
            **{k: cfg[k] for k in ("brain_mask", "normalise", "mrf_check")}}


def _say_orientation(code: str | None) -> str:
    return (f"slices indexed towards {code}" if code else
            "the series' own voxel order (prepare before version 2)")


def orientation_mismatch(model_contract: dict | None, orientation: str | None) -> str | None:
    """Why a model cannot take inputs whose slices are indexed in ``orientation``, or None.
    A 2D model reads a slice as a picture: rows flipped are another head to it."""
    if not isinstance(model_contract, dict):
        return None
    have = model_contract.get("orientation")
    if have == orientation:
        return None
    return (f"the model was trained on {_say_orientation(have)}, its input here has "
            f"{_say_orientation(orientation)}: retrain it on exams prepared by this version")


def input_scaling(contract: dict | None) -> dict | None:
    """What an MRF input value means under an input contract (None: the contract is unknown)."""
    if not contract:
        return None
    norm = contract.get("normalise") or {}
    kind = _input_kind(norm)
    if kind == "rate":
        ref = norm.get("rate_ms") or {}
        return {"inputs": "rate", "rate_ms": {r: float(ref[r]) if r in ref else None for r in INPUT_ROLES}}
    return {"inputs": kind, "percentiles": [float(p) for p in norm.get("percentiles", DEFAULTS["normalise"]["percentiles"])]}


def contract_mismatch(model_contract: dict | None, store_contract: dict | None) -> str | None:
    """Why a model cannot take a store's MRF input, or None. Input values scaled another way, or
    another image size, would not fail: the model would run and synthesise from numbers that
    mean something else."""
    why = geometry_mismatch(model_contract, store_contract)
    if why:
        return why
    a, b = input_scaling(model_contract), input_scaling(store_contract)
    if a is None or b is None or a == b:
        return None

    def say(x):
        return (f"as rates ({', '.join(f'{r} {v:g} ms' for r, v in x['rate_ms'].items() if v)} / T)"
                if x["inputs"] == "rate" else f"between per-exam percentiles {x.get('percentiles')}")
    return (f"the model takes MRF inputs scaled {say(a)}, the stores hold them scaled {say(b)}: "
            "prepare the exams with the model card's normalise settings")


def geometry_mismatch(model_contract: dict | None, store_contract: dict | None) -> str | None:
    """Why a model cannot take a store's prepared slices whatever its input channels (MRF maps
    or the mri T1w and T2w), or None: another orientation, image size or pixel size. A card
    without any contract, from before cards carried one, cannot be checked and is refused."""
    if model_contract is None and isinstance(store_contract, dict):
        return ("the model card records no input contract (trained before cards carried one): the "
                "orientation, size and scaling of its inputs are unknown; train it again")
    if isinstance(store_contract, dict):
        why = orientation_mismatch(model_contract, store_contract.get("orientation"))
        if why:
            return why
    sizes = [(c or {}).get("image_size") for c in (model_contract, store_contract)]
    if None not in sizes and int(sizes[0]) != int(sizes[1]):
        # a convolutional network runs at any size, on pixels of another size than it learnt
        return (f"the model was trained on {sizes[0]} x {sizes[0]} prepared images, the stores hold "
                f"{sizes[1]} x {sizes[1]}: prepare the exams with the model card's image_size")
    if isinstance(model_contract, dict) and isinstance(store_contract, dict):
        mm = [c.get("pixel_mm") for c in (model_contract, store_contract)]
        if mm[0] != mm[1] and (None in mm or abs(float(mm[0]) - float(mm[1])) > 1e-6):
            def px(v):
                return f"{float(v):g} mm pixels" if v is not None else "pixels spanning each exam's field of view"
            return (f"the model was trained on {px(mm[0])}, the stores hold {px(mm[1])}: the head would be "
                    "another size to it; prepare the exams with the card's field of view (prepare.fov_mm = "
                    "image_size x pixel_mm)")
    return None


def prepare_inputs(t1, t2, t1_affine, t2_affine, cfg: dict) -> dict:
    """The registration-free half of :func:`prepare_exam`: two MRF maps (ms, native grid) ->
    the model input on the prepared grid. ``cfg`` is a prepare config or an
    :func:`input_contract`. Serving a new exam runs exactly this, so a served synthesis equals
    the offline one of the same maps.

    Returns ``input`` (2, Z, S, S) in [0, 1], ``brain`` (prepared grid), ``shape``/``affine`` of
    the prepared grid, ``scale`` of both maps, ``inversion`` (for :func:`grid.to_native`),
    and the checked native ``t1``, ``brain_native`` and ``native_affine``.
    Raises :class:`PrepareError` for maps that are not a usable T1/T2 pair in ms.
    """
    from ingest.prepare.brainmask import brain_mask
    from ingest.prepare.grid import GridError, normalise, percentile_scale, resample, standard_grid

    t1, t2 = np.asarray(t1), np.asarray(t2)
    for name, vol in (("mrf_t1", t1), ("mrf_t2", t2)):
        if vol.ndim != 3:
            raise PrepareError(f"{name}: a {vol.ndim}-D array; an MRF map must be one volume (Z, Y, X)")
    fixed_aff = np.asarray(t1_affine, float)
    t1 = _check_map("mrf_t1", t1, cfg)
    t2 = _check_map("mrf_t2", t2, cfg)
    if t2.shape != t1.shape or not np.allclose(t2_affine, fixed_aff, atol=0.01):
        raise PrepareError("mrf_t2 is not on the grid of mrf_t1: the two maps must come from one MRF acquisition")
    brain = brain_mask(t1, cfg["brain_mask"])
    if int(brain.sum()) < int(cfg["brain_mask"]["min_voxels"]):
        raise PrepareError(f"brain mask empty or too small ({int(brain.sum())} voxels): is mrf_t1 a T1 map in ms?")
    try:
        pshape, paff = standard_grid(t1.shape, fixed_aff, int(cfg["image_size"]), pixel_mm(cfg))
    except GridError as exc:
        raise PrepareError(f"mrf_t1: {exc}") from None
    psp = np.linalg.norm(paff[:3, :3], axis=0)
    inplane = [0.0, float(psp[1]), float(psp[2])]
    pbrain = resample(brain.astype(np.float32), fixed_aff, pshape, paff, footprint_mm=inplane)[0] > 0.5
    # a fixed field of view (image_size x pixel_mm) can cut off a head that the scan's own covers
    nsp = np.linalg.norm(fixed_aff[:3, :3], axis=0)
    kept = float(pbrain.sum() * psp[1] * psp[2]) / max(float(brain.sum() * nsp[1] * nsp[2]), 1e-9)
    if kept < 0.95:
        fov = int(cfg["image_size"]) * float(psp[1])
        raise PrepareError(f"mrf_t1: the brain reaches outside the prepared {fov:g} mm field of view (only "
                           f"{100 * kept:.0f} % of it inside): is the head off centre in the scan's field of view?")
    norm = cfg["normalise"]
    kind = _check_normalise(norm, "normalise")
    scale, inputs = {}, []
    for name, vol in (("mrf_t1", t1), ("mrf_t2", t2)):
        v, _ = resample(vol, fixed_aff, pshape, paff, footprint_mm=inplane)
        lo, hi = percentile_scale(v, pbrain, norm.get("percentiles", DEFAULTS["normalise"]["percentiles"]))
        if not hi > lo:
            raise PrepareError(f"{name}: constant inside the brain ({lo:g}): nothing to learn from")
        scale[name] = ({"rate_ms": float(norm["rate_ms"][name]), "units": "ms"} if kind == "rate"
                       else {"lo": lo, "hi": hi, "units": "ms"})
        inputs.append(normalise(v, scale[name], pbrain))
    inversion = {"native_shape": list(t1.shape), "native_affine_lps": np.round(fixed_aff, 6).tolist(),
                 "prepared_affine_lps": np.round(paff, 6).tolist()}
    return {"input": np.stack(inputs), "brain": pbrain, "shape": pshape, "affine": paff, "scale": scale,
            "inversion": inversion, "t1": t1, "brain_native": brain, "native_affine": fixed_aff}


def _mirrored_fit(t1, fixed_aff, moving, maff, brain, rc: dict, native_sp) -> float:
    """Mutual information with the MRF T1 map of ``moving`` mirrored left-right, once registered.

    A rigid registration cannot undo a mirror, and a brain is near-symmetric, so a series with a
    wrong-handed geometry registers well enough to pass the other checks. Its mirror image,
    though, fits better than the series itself: on the demo's 70 series the series as stored
    fits by 0.014-0.15 higher (T1w most, SWI least)."""
    from ingest.prepare.grid import resample
    from ingest.prepare.register import mutual_information, rigid_register

    lr = int(np.argmax(np.abs(np.asarray(maff, float)[0, :3])))   # the index axis nearest patient left-right
    flipped = np.ascontiguousarray(np.flip(moving, axis=lr))
    try:
        m = rigid_register(t1, fixed_aff, flipped, maff, rc)
    except Exception:  # noqa: BLE001 - a mirror that does not even register is no evidence
        return float("-inf")
    after, _ = resample(flipped, maff, t1.shape, fixed_aff, transform=m, footprint_mm=native_sp)
    return mutual_information(t1, after, brain)


def _prepare(task: ExamTask, cfg: dict) -> dict:
    from ingest.prepare.brainmask import dice
    from ingest.prepare.grid import apply_scale, percentile_scale, resample
    from ingest.prepare.register import mutual_information, rigid_register, rotation_deg
    from ingest.store import open_store, write_exam_store

    raw = open_store(task.raw)
    attrs = dict(raw.attrs)
    need = list(INPUT_ROLES) + list(cfg["targets"])
    missing = [r for r in need if r not in raw]
    if missing:
        raise PrepareError(f"missing role(s) {', '.join(missing)}: the profile needs {', '.join(need)}")
    def affine_of(role: str):
        aff = raw.attrs_of(role).get("affine_lps")
        if aff is None:
            raise PrepareError(f"{task.raw}: {role} has no affine_lps attribute: not a store `qsnet ingest` "
                               "wrote, or one whose metadata was edited")
        return aff

    mrf = prepare_inputs(raw.read("mrf_t1"), raw.read("mrf_t2"), affine_of("mrf_t1"), affine_of("mrf_t2"), cfg)
    t1, brain, fixed_aff = mrf["t1"], mrf["brain_native"], mrf["native_affine"]
    pshape, paff, pbrain = mrf["shape"], mrf["affine"], mrf["brain"]
    out = {"native_shape": list(t1.shape)}
    truth_brain = raw.read("brain") if "brain" in raw else None
    if truth_brain is not None and truth_brain.shape == t1.shape:
        out["brain_dice"] = round(dice(brain, truth_brain), 4)

    rc = cfg["registration"]
    reg_report, targets, figure_rows = {}, {}, []
    centre = fixed_aff @ np.r_[np.argwhere(brain > 0).mean(0), 1.0]
    elastix_s = 0.0
    for role in cfg["targets"]:
        moving = raw.read(role)
        maff = np.asarray(affine_of(role), float)
        if moving.ndim != 3:
            raise PrepareError(f"{role}: a {moving.ndim}-D series; a target contrast must be one volume")
        moving = np.where(np.isfinite(moving), moving, 0.0).astype(np.float32)
        te = time.perf_counter()
        try:
            m = rigid_register(t1, fixed_aff, moving, maff, rc)
        except Exception as exc:  # noqa: BLE001 - elastix reports divergence as exceptions
            raise PrepareError(f"{role}: registration failed ({str(exc).strip().splitlines()[-1][:160]})") from None
        elastix_s += time.perf_counter() - te
        native_sp = np.linalg.norm(fixed_aff[:3, :3], axis=0)
        before, _ = resample(moving, maff, t1.shape, fixed_aff, footprint_mm=native_sp)
        after, cover = resample(moving, maff, t1.shape, fixed_aff, transform=m, footprint_mm=native_sp)
        rot = rotation_deg(m)
        shift = float(np.linalg.norm((m @ centre)[:3] - centre[:3]))
        mi0, mi1 = mutual_information(t1, before, brain), mutual_information(t1, after, brain)
        coverage = float((cover[brain > 0] > 0.5).mean())
        r = {"rotation_deg": round(rot, 3), "translation_mm": round(shift, 3), "mi_before": round(mi0, 4),
             "mi_after": round(mi1, 4), "brain_coverage": round(coverage, 4), "elastix_s": round(time.perf_counter() - te, 3),
             "matrix_fixed_to_moving": np.round(m, 6).tolist()}
        if truth_brain is not None:
            err = _phantom_error(attrs, role, fixed_aff, truth_brain, m)
            if err is not None:
                r["error_mm"] = round(err, 3)
        reg_report[role] = r
        why = []
        if rot > rc["max_rotation_deg"]:
            why.append(f"rotation {rot:.1f} deg > {rc['max_rotation_deg']}")
        if shift > rc["max_translation_mm"]:
            why.append(f"shift {shift:.1f} mm > {rc['max_translation_mm']}")
        if not (mi1 >= rc["min_mi"]):
            # a gain alone passes noise: its normalised MI is ~1.00 before and after, and a
            # registration that wanders within the rotation and shift limits keeps it so
            why.append(f"normalised mutual information {mi1:.3f} < {rc['min_mi']} after registration: the "
                       "series shares no structure with the MRF T1 map")
        if not (mi1 - mi0 >= rc["min_mi_gain"]):
            why.append(f"mutual information fell from {mi0:.3f} to {mi1:.3f}")
        if coverage < rc["min_coverage"]:
            why.append(f"the series covers {100 * coverage:.0f}% of the brain (< {100 * rc['min_coverage']:.0f}%)")
        if why:
            raise PrepareError(f"{role}: registration failed the quality gate: {'; '.join(why)}",
                               {"registration": reg_report})
        if rc.get("mirror_margin") is not None:
            te = time.perf_counter()
            mi_m = _mirrored_fit(t1, fixed_aff, moving, maff, brain, rc, native_sp)
            elastix_s += time.perf_counter() - te
            r["mi_mirrored"] = round(mi_m, 4) if np.isfinite(mi_m) else None
            if mi_m - mi1 > rc["mirror_margin"]:
                raise PrepareError(
                    f"{role}: the series looks left-right mirrored against the MRF T1 map (normalised mutual "
                    f"information {mi1:.3f} as stored, {mi_m:.3f} mirrored): check the orientation "
                    "(ImageOrientationPatient) of this series and of the MRF maps before training on it",
                    {"registration": reg_report})
        figure_rows.append((role, before, after))
        # the MRF slice is a 5 mm slab: average the mpMRI slices across it, each by its overlap
        v, cov = resample(moving, maff, pshape, paff, transform=m, slabs=True)
        # A series rarely covers every MRF slice (another slab, the registration's shift): where
        # it does not, there is no truth, not a black brain. A voxel covered in part holds the
        # mean of its covered samples, not one diluted by the zeros outside the series.
        covered = cov >= 0.5
        targets[role] = (np.where(covered, v / np.maximum(cov, 1e-6), 0.0).astype(np.float32), covered)
    out["registration"] = reg_report
    errs = [r["error_mm"] for r in reg_report.values() if "error_mm" in r]
    if errs:
        out["registration_error_mm"] = round(float(np.mean(errs)), 3)
    out["elastix_s"] = round(elastix_s, 3)

    pct = cfg["normalise"]["percentiles"]
    arrays, scale = {}, dict(mrf["scale"])
    for role, (v, covered) in targets.items():
        valid = pbrain & covered
        if not valid.any():
            raise PrepareError(f"{role}: the series covers none of the prepared brain")
        lo, hi = percentile_scale(v, valid, pct)
        if not hi > lo:
            raise PrepareError(f"{role}: constant inside the brain after registration ({lo:g})")
        scale[role] = {"lo": lo, "hi": hi, "units": raw.attrs_of(role).get("units", "scanner")}
        arrays[role] = (apply_scale(v, lo, hi, valid), {"role": role, "affine_lps": np.round(paff, 6).tolist()})
        arrays[valid_name(role)] = (valid.astype(np.uint8), {"role": valid_name(role),
                                                             "affine_lps": np.round(paff, 6).tolist()})
    arrays["input"] = (mrf["input"], {"role": "input", "channels": list(INPUT_ROLES),
                                      "affine_lps": np.round(paff, 6).tolist()})
    arrays["brain"] = (pbrain.astype(np.uint8), {"role": "brain", "affine_lps": np.round(paff, 6).tolist()})
    if truth_brain is not None and truth_brain.shape == t1.shape:
        for name in ("brain", "labels"):
            v, _ = resample(raw.read(name).astype(np.float32), fixed_aff, pshape, paff, footprint_mm=[0, 0, 0], order=0)
            arrays[f"truth_{name}"] = (v.astype(np.uint8), {"role": f"truth_{name}", "affine_lps": np.round(paff, 6).tolist()})
    if "brain_dice" in out:
        out["brain_dice_prepared"] = round(dice(pbrain, arrays["truth_brain"][0]), 4)

    inversion = mrf["inversion"]
    group = {k: attrs[k] for k in ("site", "subject", "patient", "cohort") if k in attrs}
    group.update(split=task.split, profile_image_size=int(cfg["image_size"]), prepare_version=PREPARE_VERSION,
                 prepare_digest=task.digest, raw_content_hash=raw.content_hash(), inversion=inversion, scale=scale,
                 targets=list(cfg["targets"]), input_contract=input_contract(cfg))
    if task.figure:
        _figure(Path(task.figure), task.subject, t1, figure_rows, brain)
        out["figure"] = task.figure
    group["prepare_report"] = _without_timings({k: v for k, v in out.items() if k != "native_shape"})
    write_exam_store(Path(task.dst), arrays, group)
    return out


def _without_timings(report):
    """The exam's report as its store keeps it: no wall-clock times (they stay in
    reports/prepare.json). Otherwise the same inputs made a store that differed in its
    elastix_s, and DVC retrained every model after any rerun of prepare."""
    if isinstance(report, dict):
        return {k: _without_timings(v) for k, v in report.items() if k != "elastix_s"}
    if isinstance(report, list):
        return [_without_timings(v) for v in report]
    return report


def _figure(path: Path, subject: str, fixed: np.ndarray, rows, brain: np.ndarray) -> None:
    """Registration QA: per series, the MRF T1 brain outline over the series before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax(brain.sum((1, 2))))
    fig, axes = plt.subplots(2, max(1, len(rows)), figsize=(2.2 * max(1, len(rows)), 4.6), squeeze=False)
    for j, (role, before, after) in enumerate(rows):
        for i, (img, name) in enumerate(((before, "before"), (after, "after"))):
            ax = axes[i, j]
            sl = img[z]
            ax.imshow(sl, cmap="gray", vmin=0, vmax=float(np.percentile(sl, 99.5)) or 1.0)
            ax.contour(brain[z], levels=[0.5], colors="tab:red", linewidths=0.6)
            ax.set_title(f"{role} {name}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{subject}: MRF brain outline over each series", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the stage

def _code_hash() -> str:
    """The prepare code itself: a changed method must never reuse a store the old one made."""
    from ingest.manifest import code_hash

    here = Path(__file__).resolve().parent
    return code_hash(sorted(here.glob("*.py")) + [here.parent / "store.py"])


def _digest(raw_hash: str, cfg: dict, split: str) -> str:
    h = hashlib.sha256()
    h.update(f"prepare {PREPARE_VERSION} {_code_hash()}\n{raw_hash}\n{split}\n".encode())
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return h.hexdigest()


def _run_one(args):
    return prepare_exam(*args)


def prepare(src: Path, dst: Path, report: Path, params: dict, jobs: int | None = None,
            figures: Path | None = None, progress=None) -> dict:
    """Prepare every exam store under ``src`` (``<site>/<subject>.zarr``) into ``dst``; write ``report``."""
    from ingest import storage
    from ingest.store import open_store

    # src may be a URL (s3://...): raw stores are read in place
    src, dst, report = storage.location(src), Path(dst), Path(report)
    cfg = config(params)
    if isinstance(src, Path) and not src.is_dir():
        raise PrepareError(f"{src}: input folder of raw stores does not exist")
    storage.check_access(str(src))
    raws = storage.list_stores(src)
    if not raws:
        # nothing to prepare is a wrong path, not an empty study: going on would delete every
        # prepared store in dst as the store of a removed exam
        raise PrepareError(f"{src}: no <site>/<subject>.zarr exam stores there; give the folder that "
                           "`qsnet ingest` wrote (e.g. stores/raw)")
    exams, found = [], {}
    problems = {}
    for p in raws:
        site, subject = storage.name_parts(p)
        try:
            st = open_store(p)
            a = st.attrs
            key = (str(a.get("site") or site), str(a.get("subject") or subject))
            found[key] = (p, st.content_hash())
            exams.append((*key, str(a.get("cohort", "")), str(a.get("patient") or "")))
        except Exception as exc:  # noqa: BLE001
            problems[f"{site}/{subject}"] = f"{p}: not a readable exam store ({exc})"
    splits = assign_splits(exams, cfg)
    previous = _previous(report)
    tasks, entries = [], {}
    for (site, subject), (p, raw_hash) in sorted(found.items()):
        split = splits[(site, subject)]
        digest = _digest(raw_hash, cfg, split)
        out = dst / site / f"{subject}.zarr"
        fig = str(figures / site / f"{subject}.png") if figures else ""
        # reuse: the store itself says what it was made from (DVC deletes the report before
        # a run, but keeps the persisted stores); an excluded exam has no store, so the last
        # report is the only memory of it, when there is one
        old = _store_entry(out, digest)
        if old is not None and fig and (old.get("figure") != fig or not Path(fig).exists()):
            old = None  # the QA figure is missing or elsewhere: make it again
        if old is None:
            prev = previous.get(f"{site}/{subject}")
            old = (prev if prev and prev.get("digest") == digest and prev.get("status") == "excluded"
                   and not prev.get("transient") else None)
        if old is not None:
            entries[f"{site}/{subject}"] = {**old, "reused": True}
            if progress:
                progress(old)
            continue
        tasks.append(ExamTask(str(p), str(out), site, subject, split, digest, fig))
    workers = max(1, min(jobs or os.cpu_count() or 1, len(tasks) or 1))
    args = [(t, cfg) for t in tasks]
    if workers == 1:
        results = []
        for a in args:
            results.append(_run_one(a))
            if progress:
                progress(results[-1])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for res in pool.map(_run_one, args):
                results.append(res)
                if progress:
                    progress(res)
    for r in results:
        entries[f"{r['site']}/{r['subject']}"] = {**r, "reused": False}
    for key, why in problems.items():
        entries[key] = {"status": "excluded", "reason": why}
    # prepared stores whose raw exam is gone are outputs of nothing: remove them
    keep = {f"{s}/{j}" for (s, j) in found}
    # the site folders prepare writes figures into (read before a site's last store goes): only
    # these are cleaned, --figures may be a folder other stages share
    sites = {s for (s, _) in found} | ({p.parent.name for p in dst.glob("*/*.zarr")} if dst.is_dir() else set())
    for p in sorted(dst.glob("*/*.zarr")) if dst.is_dir() else []:
        if f"{p.parent.name}/{p.stem}" not in keep:
            _remove_store(p)
    # and so are their QA figures (a DVC output too: a figure of an exam that left would stay in it)
    for p in sorted(Path(figures).glob("*/*.png")) if figures and Path(figures).is_dir() else []:
        if p.parent.name in sites and f"{p.parent.name}/{p.stem}" not in keep:
            p.unlink(missing_ok=True)
    rep = _summary(entries, cfg, params)
    report.parent.mkdir(parents=True, exist_ok=True)
    # the full report, and its summary alone for `dvc metrics show` (the per-exam detail would
    # make that table unreadable)
    for path, doc in ((report, rep), (summary_path(report), rep["summary"])):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return rep


def summary_path(report: Path) -> Path:
    return report.with_name(f"{report.stem}_summary.json")


def _store_entry(path: Path, digest: str) -> dict | None:
    """The report entry of a prepared store made from exactly these inputs, else None."""
    try:
        a = json.loads((path / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if a.get("prepare_digest") != digest or a.get("prepare_version") != PREPARE_VERSION:
        return None
    from ingest.store import open_store

    try:  # its metadata says nothing of its data files: one that went missing is made again
        st = open_store(path)
        if not all(st.has_data(r) for r in st.roles):
            return None
    except (OSError, ValueError):
        return None
    return {"site": a.get("site"), "subject": a.get("subject"), "split": a.get("split"), "digest": digest,
            "status": "prepared", "native_shape": a["inversion"]["native_shape"], **a.get("prepare_report", {})}


def _previous(report: Path) -> dict:
    try:
        return json.loads(report.read_text()).get("exams", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _summary(entries: dict, cfg: dict, params: dict) -> dict:
    prepared = {k: v for k, v in entries.items() if v.get("status") == "prepared"}
    excluded = {k: v.get("reason", "") for k, v in entries.items() if v.get("status") != "prepared"}
    splits: dict[str, dict[str, int]] = {}
    for v in prepared.values():
        splits.setdefault(v["site"], {}).setdefault(v["split"], 0)
        splits[v["site"]][v["split"]] += 1

    def mean(key):
        vals = [v[key] for v in prepared.values() if key in v]
        return round(float(np.mean(vals)), 4) if vals else None

    def worst(key):
        vals = [v[key] for v in prepared.values() if key in v]
        return round(float(np.max(vals)), 4) if vals else None

    secs = [v["seconds"] for v in prepared.values() if not v.get("reused") and "seconds" in v]
    el = [v["elastix_s"] for v in prepared.values() if not v.get("reused") and "elastix_s" in v]
    return {
        "profile": params.get("profile"), "image_size": int(cfg["image_size"]), "prepare_version": PREPARE_VERSION,
        "exams": entries, "excluded": excluded,
        "summary": {"exams": len(entries), "prepared": len(prepared), "excluded": len(excluded), "splits": splits,
                    "brain_dice_mean": mean("brain_dice"), "brain_dice_min": (round(float(min(v["brain_dice"] for v in prepared.values() if "brain_dice" in v)), 4) if any("brain_dice" in v for v in prepared.values()) else None),
                    "registration_error_mm_mean": mean("registration_error_mm"),
                    "registration_error_mm_max": worst("registration_error_mm"),
                    "seconds_per_exam": round(float(np.mean(secs)), 3) if secs else None,
                    "elastix_share": round(float(np.sum(el) / np.sum(secs)), 3) if secs and np.sum(secs) > 0 else None},
    }

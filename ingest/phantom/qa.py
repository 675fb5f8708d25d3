"""Physics QA of a phantom tree: does each contrast look the way its sequence says it should?

Reads the DICOM back (as any consumer would), maps the ground-truth labels from the MRF grid
into every series through the recorded poses, and compares label-wise mean intensities with
the expected orderings and with the signal models. The `phantom_qa` DVC stage writes the
result as metrics; the tests assert on the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from ingest.nifti import load_nifti_zyx
from ingest.phantom import physics
from ingest.phantom.anatomy import LABELS
from ingest.reader import read_series
from ingest.siteconfig import load_site

# 3T literature ranges (ms) for MRF-FISP and inversion-recovery relaxometry in adults. The
# CSF T2 range is wide on purpose: FISP fingerprints barely change with T2 above ~1 s, so
# MRF CSF T2 swings with B1 and with a few percent of tissue partial volume (reported MRF
# CSF T2 spans roughly 500-2500 ms); the simulator reproduces that, it does not hide it.
LITERATURE_MS = {
    "t1": {"wm": (700, 1100), "gm": (1100, 1900), "csf": (3000, 5000)},
    "t2": {"wm": (40, 80), "gm": (60, 120), "csf": (500, 2600)},
}
REPORTED = ("csf", "gm", "wm", "vein", "oedema", "enhancing", "necrosis")


def labels_in_series(truth: dict, labels_mrf: np.ndarray, role: str, shape) -> np.ndarray:
    """Ground-truth labels pulled into a series' grid through the recorded head poses."""
    s = truth["series"][role]
    m = truth["series"]["mrf_t1"]
    to_mrf = (np.linalg.inv(np.array(m["affine_lps"])) @ np.array(m["pose_head_to_lps"])
              @ np.linalg.inv(np.array(s["pose_head_to_lps"])) @ np.array(s["affine_lps"]))
    idx = np.indices(shape, dtype=np.float64)
    coords = [to_mrf[r, 0] * idx[0] + to_mrf[r, 1] * idx[1] + to_mrf[r, 2] * idx[2] + to_mrf[r, 3]
              for r in range(3)]
    return ndimage.map_coordinates(labels_mrf, coords, order=0, mode="constant", cval=0)


def _pure(labels: np.ndarray, value: int) -> np.ndarray:
    """Voxels of a label away from its edges, so partial volume does not blur the means."""
    m = labels == value
    eroded = ndimage.binary_erosion(m, structure=np.ones((1, 3, 3), bool))
    return eroded if eroded.sum() >= 5 else m


def exam_stats(exam: Path) -> dict:
    truth = json.loads((exam / "truth" / "truth.json").read_text())
    labels_mrf, _ = load_nifti_zyx(exam / "truth" / "labels.nii.gz")
    out = {}
    for role, s in truth["series"].items():
        files = sorted((exam / s["folder"]).iterdir())
        vol, _, _ = read_series(files)
        lab = labels_mrf if role.startswith("mrf") else labels_in_series(truth, labels_mrf, role, vol.shape)
        stats = {}
        for name in REPORTED:
            m = _pure(lab, LABELS[name])
            if m.sum() >= 3:
                stats[name] = float(np.median(vol[m])) if role.startswith("mrf") else float(vol[m].mean())
        if role == "swi":
            stats["vein_neighbourhood"] = _vein_surround(vol, lab)
        out[role] = stats
    return out


def _vein_surround(vol: np.ndarray, lab: np.ndarray) -> float | None:
    vein = lab == LABELS["vein"]
    if vein.sum() < 3:
        return None
    ring = ndimage.binary_dilation(vein, np.ones((1, 5, 5), bool)) & ~ndimage.binary_dilation(vein, np.ones((1, 3, 3), bool))
    ring &= np.isin(lab, [LABELS["gm"], LABELS["wm"]])
    return float(vol[ring].mean()) if ring.sum() >= 3 else None


def expected_ratio(site: str, role: str, a: str, b: str) -> float:
    """Signal ratio of tissue a to b that the site's protocol implies (nominal B1, no PV)."""
    series = load_site(site)["series"][role]
    lut, decay, te = physics.sequence_model(series)

    def sig(t):
        t1, t2, t2s, pd = physics.TISSUE_PARAMS[t]
        return abs(pd * lut(np.array([t1]), np.array([1.0]))[0] * np.exp(-te / (t2 if decay == "t2" else t2s)))

    return sig(a) / sig(b)


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def run_qa(root: Path) -> dict:
    root = Path(root)
    exams = sorted(p.parent.parent for p in root.glob("site-*/*/truth/truth.json"))
    if not exams:
        raise ValueError(f"{root}: no phantom exams (site-*/<exam>/truth/truth.json) found")
    per_site: dict[str, list[dict]] = {}
    for exam in exams:
        per_site.setdefault(exam.parent.name, []).append(exam_stats(exam))
    report = {"sites": {}, "checks": {}}
    for site, stats in per_site.items():
        roles = {}
        for role in stats[0]:
            keys = sorted({k for s in stats for k in s.get(role, {})})
            roles[role] = {k: _mean(s.get(role, {}).get(k) for s in stats) for k in keys}
        report["sites"][site] = {"n_exams": len(stats), "means": roles}
    checks = report["checks"]
    for site, rep in report["sites"].items():
        m = rep["means"]
        c = {}
        c["t1w_wm>gm>csf"] = m["t1w"]["wm"] > m["t1w"]["gm"] > m["t1w"]["csf"]
        c["t2w_csf>gm>wm"] = m["t2w"]["csf"] > m["t2w"]["gm"] > m["t2w"]["wm"]
        c["t1flair_wm>gm>csf"] = m["t1flair"]["wm"] > m["t1flair"]["gm"] > m["t1flair"]["csf"]
        c["t2flair_csf_darkest"] = m["t2flair"]["csf"] < min(m["t2flair"]["gm"], m["t2flair"]["wm"])
        if "oedema" in m["t2flair"]:
            c["t2flair_oedema>wm"] = m["t2flair"]["oedema"] > m["t2flair"]["wm"]
        vs = m["swi"].get("vein_neighbourhood")
        c["swi_vein<surround"] = bool(vs is not None and "vein" in m["swi"] and m["swi"]["vein"] < vs)
        for q in ("t1", "t2"):
            for t, (lo, hi) in LITERATURE_MS[q].items():
                c[f"mrf_{q}_{t}_in_{lo}-{hi}ms"] = lo <= m[f"mrf_{q}"][t] <= hi
        for role in ("t1w", "t2w", "t1flair", "t2flair"):
            exp = expected_ratio(site, role, "gm", "wm")
            got = m[role]["gm"] / m[role]["wm"]
            rep.setdefault("gm_wm_ratio", {})[role] = {"measured": round(got, 4), "protocol": round(exp, 4)}
        checks[site] = {k: bool(v) for k, v in c.items()}
    if {"site-A", "site-B"} <= set(report["sites"]):
        a, b = report["sites"]["site-A"], report["sites"]["site-B"]
        cross = {}
        for q in ("t1", "t2"):
            for t in ("wm", "gm"):
                va, vb = a["means"][f"mrf_{q}"][t], b["means"][f"mrf_{q}"][t]
                diff = abs(va - vb) / (0.5 * (va + vb))
                cross[f"mrf_{q}_{t}_rel_diff"] = round(diff, 4)
        for role in ("t1w", "t2w", "t1flair", "t2flair"):
            ra, rb = a["gm_wm_ratio"][role], b["gm_wm_ratio"][role]
            cross[f"{role}_gm_wm_ratio_A_minus_B"] = {"measured": round(ra["measured"] - rb["measured"], 4),
                                                      "protocol": round(ra["protocol"] - rb["protocol"], 4)}
        report["cross_site"] = cross
    return report

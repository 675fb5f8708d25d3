"""`qsnet simulate`: the two phantom sites of the paper, written as real DICOM.

Per exam: a subject (anatomy.py), a transmit field, and for each series its own head pose
and slab (geometry.py). The signal of each series is formed on the anatomy grid from the
sequence model (physics.py), sampled finer than the output pixels and through the slice
thickness (partial volume), Fourier-truncated to the acquisition matrix, apodised and
zero-filled as the vendor does, given coil sensitivity and complex noise (so magnitude
images carry Rician noise), scaled to the vendor's integer range and written as DICOM.
MRF maps come from EPG-simulated FISP fingerprints matched against a dictionary (mrf.py).

Deterministic: each exam draws from its own seed (seed, site, index), so the bytes do not
depend on how many processes run or in which order.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ingest import __version__
from ingest.nifti import save_nifti
from ingest.phantom import anatomy as anat_mod
from ingest.phantom import dicomio, mrf, physics
from ingest.phantom.geometry import SIZES, plan_series, sample_points, series_pose, subject_pose
from ingest.siteconfig import ROLES, load_site

# 2: UIDs depend on seed, size and anatomy; PatientAge matches the dates. 3: one receive coil per
# exam, the MPRAGE shot's full length, GE SWAN magnitude without a phase mask
SIMULATOR_VERSION = "3"
MARKER = "PHANTOM.json"
SITES = ("site-A", "site-B")


class SimulateError(ValueError):
    pass


# ---------------------------------------------------------------- per-process caches

@functools.lru_cache(maxsize=2)
def _template(anatomy_dir: str | None):
    return anat_mod.load_template(Path(anatomy_dir) if anatomy_dir else None)


@functools.lru_cache(maxsize=2)
def _head(anatomy_dir: str | None, voxel_mm: float) -> anat_mod.Anatomy:
    tpl, aff = _template(anatomy_dir)
    return anat_mod.build_head(tpl, aff, voxel_mm)


@functools.lru_cache(maxsize=32)
def _lut(series_key: str):
    series = json.loads(series_key)
    return physics.sequence_model(series)


@functools.lru_cache(maxsize=4)
def _mrf_model(kind: str, n: int, tr: float, te: float, ti: float):
    return mrf.site_model(kind, n, tr, te, ti)


# ---------------------------------------------------------------- tissue maps

class TissueMaps:
    """Per-voxel T1/T2/T2*/PD of each tissue: literature means, a per-subject offset and
    smooth within-tissue texture. Only voxels holding the tissue are kept."""

    def __init__(self, anat: anat_mod.Anatomy, rng: np.random.Generator):
        shape = anat.shape
        v = anat.voxel_mm
        fields = [anat_mod._smooth_field(rng, shape, 6.0 / v) for _ in range(3)]
        self.items = []
        for name, frac in anat.fractions.items():
            t1, t2, t2s, pd = physics.TISSUE_PARAMS[name]
            off = 1.0 + rng.normal(0.0, 0.03, 3)
            idx = np.nonzero(frac.ravel() > 1e-4)[0]
            if len(idx) == 0:
                continue
            sd = physics.TEXTURE_SD
            tex = [1.0 + sd[i] * fields[i].ravel()[idx] for i in range(3)]
            self.items.append({
                "name": name, "idx": idx, "frac": frac.ravel()[idx].astype(np.float64),
                "t1": t1 * off[0] * tex[0], "t2": t2 * off[1] * tex[1],
                "t2s": t2s * off[1] * tex[1], "pd": pd * off[2] * tex[2],
            })
        self.shape = shape
        self.size = int(np.prod(shape))


def contrast_image(tm: TissueMaps, b1: np.ndarray, series: dict) -> np.ndarray:
    lut, decay, te = _lut(json.dumps(series, sort_keys=True))
    out = np.zeros(tm.size, np.float64)
    b1f = b1.ravel()
    for it in tm.items:
        g = lut(it["t1"], b1f[it["idx"]])
        t2 = it["t2"] if decay == "t2" else it["t2s"]
        out[it["idx"]] += it["frac"] * it["pd"] * g * np.exp(-te / t2)
    return out.reshape(tm.shape)


def reference_signal(series: dict) -> float:
    """Signal of white matter at nominal B1: the yardstick for noise and scaling."""
    lut, decay, te = _lut(json.dumps(series, sort_keys=True))
    t1, t2, t2s, pd = physics.TISSUE_PARAMS["wm"]
    g = lut(np.array([t1]), np.array([1.0]))[0]
    return abs(pd * g * np.exp(-te / (t2 if decay == "t2" else t2s)))


# ---------------------------------------------------------------- acquisition

def _sample(channels: list[np.ndarray], anat_affine: np.ndarray, geo, m_fine: int, n_sub: int) -> np.ndarray:
    """Each channel sampled on the fine grid of every slice, averaged through the slice."""
    from scipy import ndimage

    inv = np.linalg.inv(anat_affine) @ np.linalg.inv(geo.pose)
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * geo.thickness
    out = np.zeros((len(channels), geo.shape[0], m_fine, m_fine), np.float64)
    for z in range(geo.shape[0]):
        p = sample_points(geo, z, m_fine, offsets)
        coords = [inv[r, 0] * p[0] + inv[r, 1] * p[1] + inv[r, 2] * p[2] + inv[r, 3] for r in range(3)]
        for c, ch in enumerate(channels):
            vals = ndimage.map_coordinates(ch, coords, order=1, mode="constant", cval=0.0)
            out[c, z] = vals.mean(axis=0)
    return out


def receive_coil(strength: float, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """One exam's head coil: its strength and centre (mm, scanner coordinates). Drawn once per
    exam: every series of it is received by the same coil at the same place, while the head
    moves inside it between series."""
    return strength * rng.uniform(0.85, 1.15), rng.normal(0.0, 8.0, 3)


def receive_field(geo, m_fine: int, coil: tuple[float, np.ndarray]) -> np.ndarray:
    """Coil sensitivity in scanner coordinates: brighter towards the surface and posteriorly
    (the head rests on the posterior elements)."""
    s, c0 = coil
    out = np.empty((geo.shape[0], m_fine, m_fine))
    for z in range(geo.shape[0]):
        p = sample_points(geo, z, m_fine, np.zeros(1))[:, 0]
        x, y, zz = p[0] - c0[0], p[1] - c0[1], p[2] - c0[2]
        out[z] = 1.0 + s * ((x ** 2 + y ** 2 + 0.5 * zz ** 2) / 90.0 ** 2) + 0.25 * s * (y / 80.0)
    return np.clip(out, 0.6, 2.5)


def kspace_recon(img: np.ndarray, acq: int, n_recon: int, filt: str, noise_sd: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Fine image -> acquired k-space window (+ noise) -> vendor filter -> zero-filled recon."""
    z, m, _ = img.shape
    k = np.fft.fftshift(np.fft.fft2(img), axes=(-2, -1)) / (m * m)
    lo = m // 2 - acq // 2
    k = k[:, lo:lo + acq, lo:lo + acq]
    noise = rng.standard_normal((z, acq, acq)) + 1j * rng.standard_normal((z, acq, acq))
    k = k + np.fft.fftshift(np.fft.fft2(noise_sd / np.sqrt(2) * noise), axes=(-2, -1)) / (acq * acq)
    if filt == "fermi":
        f = np.fft.fftshift(np.fft.fftfreq(acq)) * 2  # -1..1 of k_max
        r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        k = k / (1.0 + np.exp((r - 0.9) / 0.04))
    pad = np.zeros((z, n_recon, n_recon), complex)
    lo = n_recon // 2 - acq // 2
    pad[:, lo:lo + acq, lo:lo + acq] = k
    return np.fft.ifft2(np.fft.ifftshift(pad, axes=(-2, -1))) * (n_recon * n_recon)


def subslices(thickness: float, voxel_mm: float) -> int:
    return max(1, int(np.ceil(thickness / voxel_mm)))


def swi_postprocess(img: np.ndarray) -> np.ndarray:
    """Siemens-style SWI: homodyne high-pass phase, negative-phase mask applied 4 times. A site
    sets `swi_phase_mask: false` for a magnitude-only product (GE SWAN), whose veins are dark by
    their T2* dephasing alone."""
    z, n, _ = img.shape
    w = np.hanning(max(3, n // 4))
    win = np.zeros(n)
    lo = n // 2 - len(w) // 2
    win[lo:lo + len(w)] = w
    lowk = np.fft.fftshift(np.fft.fft2(img), axes=(-2, -1)) * (win[:, None] * win[None, :])
    low = np.fft.ifft2(np.fft.ifftshift(lowk, axes=(-2, -1)))
    phase = np.angle(img * np.conj(low))
    mask = np.where(phase < 0, (np.pi + phase) / np.pi, 1.0)
    return np.abs(img) * mask ** 4


def to_stored(mag: np.ndarray, cfg_ph: dict, rng: np.random.Generator, head: np.ndarray) -> np.ndarray:
    """Vendor scaling: the series' bright end lands somewhere in the vendor's range."""
    lo, hi = cfg_ph["scale_max"]
    target = rng.uniform(lo, hi)
    ref = np.percentile(mag[head], 99.9) if head.any() else mag.max()
    vals = np.rint(mag * (target / max(ref, 1e-12)))
    if cfg_ph["pixel_dtype"] == "uint16":
        return np.clip(vals, 0, 2 ** int(cfg_ph["bits_stored"]) - 1).astype(np.uint16)
    return np.clip(vals, 0, 32767).astype(np.int16)


# ---------------------------------------------------------------- fake identities (PHI to be removed downstream)

_GIVEN = ["ANNA", "JONAS", "MARIA", "LUCA", "SOFIA", "NOAH", "EMMA", "ELIAS", "HANNA", "FELIX",
          "LENA", "DAVID", "CLARA", "PAUL", "MIA", "OSKAR"]
_FAMILY = ["MUELLER", "SCHMIDT", "GARCIA", "NGUYEN", "KOWALSKI", "ROSSI", "JOHANSSON", "MARTIN",
           "OKAFOR", "TANAKA", "PETROV", "DUBOIS", "SILVA", "HANSEN", "MORENO", "KELLER"]


def fake_exam(cfg: dict, index: int, rng: np.random.Generator, run: str = "") -> dict:
    """Header values of one fake exam. ``run`` names what else makes this tree (seed, size,
    anatomy): UIDs derive from it too, so two different trees sent to one PACS never share one."""
    ph = cfg["phantom"]
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(22, 45)) if cfg["cohort"] == "healthy" else int(rng.integers(38, 79))
    year = 2022 + int(rng.integers(0, 3))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    study_date = f"{year:04d}{month:02d}{day:02d}"
    b_month, b_day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    birth = f"{year - age:04d}{b_month:02d}{b_day:02d}"
    age -= (month, day) < (b_month, b_day)   # PatientAge as of the study date, as a scanner writes it
    hh, mm = int(rng.integers(7, 18)), int(rng.integers(0, 60))
    key = f"{cfg['site']}|{index}" + (f"|{run}" if run else "")
    return {
        "manufacturer": cfg["manufacturer"], "model": cfg["model"],
        "software_versions": cfg["software_versions"], "station_name": cfg["station_name"],
        "field_strength": cfg["field_strength"],
        "institution": ph["people"]["institution"], "address": ph["people"]["address"],
        "physicians": ph["people"]["physicians"],
        "patient_name": f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN[rng.integers(len(_GIVEN))]}",
        "patient_id": f"{'NUH' if cfg['site'] == 'site-A' else 'SAC'}{int(rng.integers(10**6, 10**7))}",
        "birth_date": birth, "sex": sex, "age": f"{age:03d}Y",
        "weight": round(float(rng.uniform(52, 98)), 1), "height": round(float(rng.uniform(1.55, 1.95)), 2),
        "study_date": study_date, "study_time": f"{hh:02d}{mm:02d}00.000000",
        "accession": f"ACC{int(rng.integers(10**7, 10**8))}",
        "study_id": str(int(rng.integers(1000, 9999))),
        "study_uid": dicomio.dicom_uid("qsnet-phantom", key, "study"),
        "frame_of_reference_uid": dicomio.dicom_uid("qsnet-phantom", key, "for"),
        "study_description": "MRF BRAIN RESEARCH" if cfg["cohort"] == "healthy" else "BRAIN TUMOUR MRF",
        "patient_position": ph["patient_position"],
        "uid_seed": f"qsnet-phantom|{key}",
    }


# ---------------------------------------------------------------- one exam

def simulate_exam(exam_dir: Path, site: str, index: int, seed: int, size: str, anatomy_dir: str | None) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = load_site(site)
    ph = cfg["phantom"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, SITES.index(site), index]))
    voxel = SIZES[size]["anatomy_mm"]

    t0 = time.perf_counter()
    head = _head(anatomy_dir, voxel)
    subj = anat_mod.make_subject(head, rng, cfg["cohort"])
    tm = TissueMaps(subj, rng)
    b1 = physics.transmit_field(subj.shape, subj.affine, rng, ph["transmit_bias"])
    timings["anatomy"] = time.perf_counter() - t0

    exam = fake_exam(cfg, index, rng, run=f"seed {seed}|{size}|{_anatomy_id(anatomy_dir)}|v{SIMULATOR_VERSION}")
    base_pose = subject_pose(rng)
    exam_tilt = rng.normal(0.0, ph["slab_tilt_deg"])
    coil = receive_coil(ph["receive_bias"], rng)
    truth = {"site": site, "subject_index": index, "cohort": cfg["cohort"], "size": size,
             "simulator_version": SIMULATOR_VERSION, "lesions": subj.lesions, "series": {},
             "b1_range": [round(float(b1.min()), 4), round(float(b1.max()), 4)]}
    exam_dir.mkdir(parents=True)
    clock = int(exam["study_time"][:2]) * 3600 + int(exam["study_time"][2:4]) * 60

    mrf_done = None
    for role in ROLES:
        series = dict(cfg["series"][role])
        series["role"] = role
        series["series_uid"] = dicomio.dicom_uid(exam["uid_seed"], "series", role)
        clock += int(rng.integers(120, 420))
        series["acquisition_time"] = f"{clock // 3600:02d}{clock // 60 % 60:02d}{clock % 60:02d}.000000"
        t0 = time.perf_counter()
        if series["kind"] == "mrf" and mrf_done is not None:
            geo, maps = mrf_done  # T1 and T2 maps come from one acquisition
        else:
            pose = series_pose(base_pose, rng, ph["motion_deg"], ph["motion_mm"])
            geo = plan_series(series, size, pose, exam_tilt, rng, dicomio.round_affine_for_dicom)
        # The headers describe the grid as simulated (demo size rescales Table 1).
        series.update(thickness=geo.thickness, gap=geo.gap, pixel_spacing=geo.pixel_spacing,
                      acq_matrix=geo.acq_matrix)
        if series["kind"] == "mrf":
            if mrf_done is None:
                maps = simulate_mrf(subj, tm, b1, geo, series, ph, rng)
                mrf_done = (geo, maps)
                write_truth_maps(exam_dir, subj, geo)
            values = maps[series["output"]]
            slope = float(ph["mrf"]["map_rescale_slope"])
            stored = np.rint(values / slope)
            dtype = np.uint16 if ph["pixel_dtype"] == "uint16" else np.int16
            stored = np.clip(stored, 0, np.iinfo(dtype).max).astype(dtype)
            kw = {"rescale_slope": slope, "rescale_intercept": float(ph["mrf"]["map_rescale_intercept"]),
                  "rescale_type": "US"}
        else:
            mag = simulate_contrast(subj, tm, b1, geo, series, ph, rng, coil)
            head_mask = mag > 0.1 * np.percentile(mag, 99)
            stored = to_stored(mag, ph, rng, head_mask)
            kw = {}
        timings[series["kind"]] = timings.get(series["kind"], 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        folder = f"S{series['series_number']:03d}_{_safe(series['description'])}"
        dicomio.write_series(exam_dir / folder, stored, geo.affine, series, exam,
                             instance_order=ph["instance_order"],
                             transfer_syntax=ph.get("transfer_syntax", "explicit"), **kw)
        timings["dicom_write"] = timings.get("dicom_write", 0.0) + time.perf_counter() - t0
        truth["series"][role] = {
            "folder": folder, "shape": list(geo.shape),
            "affine_lps": np.round(geo.affine, 6).tolist(),
            "pose_head_to_lps": np.round(geo.pose, 8).tolist(),
            "acq_matrix": geo.acq_matrix, "thickness": geo.thickness, "gap": geo.gap,
        }
    (exam_dir / "truth" / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    timings["total"] = time.perf_counter() - t_start
    return {"exam": str(exam_dir.name), "site": site, "timings": timings}


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def simulate_contrast(subj, tm, b1, geo, series, ph, rng, coil) -> np.ndarray:
    src = contrast_image(tm, b1, series)
    m_fine = 2 * geo.acq_matrix
    n_sub = subslices(geo.thickness, subj.voxel_mm)
    if series["kind"] == "swi":
        b0_dir = np.linalg.inv(geo.pose[:3, :3]) @ np.array([0.0, 0.0, 1.0])
        field = physics.dipole_field_ppm(subj.chi, subj.voxel_mm, b0_dir)
        phase = -2 * np.pi * physics.GAMMA_BAR_HZ_PER_T * 3.0 * field * 1e-6 * series["te"] * 1e-3
        chans = [src * np.cos(phase), src * np.sin(phase)]
    else:
        chans = [src]
    fine = _sample(chans, subj.affine, geo, m_fine, n_sub)
    img = fine[0] + 1j * fine[1] if len(chans) == 2 else fine[0].astype(complex)
    img = img * receive_field(geo, m_fine, coil)
    vox = (series["fov"] / geo.acq_matrix) ** 2 * geo.thickness  # acquired voxel, mm^3
    noise = ph["noise"] * reference_signal(series) * float(np.clip(np.sqrt(1.0 / vox), 0.5, 4.0))
    rec = kspace_recon(img, geo.acq_matrix, geo.shape[1], ph["recon_filter"], noise, rng)
    if series["kind"] == "swi" and ph.get("swi_phase_mask", True):
        return swi_postprocess(rec)
    return np.abs(rec)


def simulate_mrf(subj, tm, b1, geo, series, ph, rng) -> dict[str, np.ndarray]:
    m = ph["mrf"]
    dictionary, lut = _mrf_model(m["schedule"], int(m["n_timepoints"]), float(series["tr"]),
                                 float(series["te"]), float(series["ti"]))
    k = dictionary.basis.shape[1]
    fp = np.zeros((tm.size, k), complex)
    b1f = b1.ravel()
    for it in tm.items:
        fp[it["idx"]] += (it["frac"] * it["pd"])[:, None] * lut.lookup(it["t1"], it["t2"], b1f[it["idx"]])
    chans = []
    for c in range(k):
        chans += [fp[:, c].real.reshape(tm.shape), fp[:, c].imag.reshape(tm.shape)]
    del fp
    n_sub = subslices(geo.thickness, subj.voxel_mm)
    fine = _sample(chans, subj.affine, geo, geo.shape[1], n_sub)
    x = (fine[0::2] + 1j * fine[1::2]).reshape(k, -1).T
    t1, t2, _, pd_wm = physics.TISSUE_PARAMS["wm"]
    ref = pd_wm * np.linalg.norm(lut.lookup(np.array([t1]), np.array([t2]), np.array([1.0]))[0])
    sd = float(m["noise"]) * ref
    x = x + sd / np.sqrt(2) * (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape))
    # Scanner MRF software blanks voxels without enough proton density (air, bone); the
    # norm pre-filter only spares matching voxels that cannot pass that threshold.
    t1m, t2m, pdm = (np.zeros(len(x)) for _ in range(3))
    live = np.flatnonzero(np.linalg.norm(x, axis=1) > 0.1 * ref)
    t1m[live], t2m[live], pdm[live] = dictionary.match(x[live])
    keep = pdm > 0.25 * pd_wm
    shape = geo.shape
    return {"t1": np.where(keep, t1m, 0.0).reshape(shape), "t2": np.where(keep, t2m, 0.0).reshape(shape)}


def write_truth_maps(exam_dir: Path, subj: anat_mod.Anatomy, geo) -> None:
    """Ground-truth labels and brain mask on the MRF grid (partial-volume aware), beside the DICOM."""
    names = list(subj.fractions)
    n_sub = subslices(geo.thickness, subj.voxel_mm)
    fr = _sample([subj.fractions[n] for n in names], subj.affine, geo, geo.shape[1], n_sub)
    air = 1.0 - fr.sum(0)
    lab = np.array([anat_mod.LABELS[n] for n in names], np.uint8)[np.argmax(fr, 0)]
    lab[air >= fr.max(0)] = 0
    brain = sum(fr[names.index(n)] for n in anat_mod.BRAIN_TISSUES) >= 0.5
    out = exam_dir / "truth"
    out.mkdir()
    save_nifti(out / "labels.nii.gz", lab, geo.affine)
    save_nifti(out / "brain.nii.gz", brain.astype(np.uint8), geo.affine)


# ---------------------------------------------------------------- the whole tree

def _exam_name(site: str, index: int) -> str:
    return f"sub-{site[-1]}{index + 1:02d}"


def plan(size: str, sites=SITES, subjects: int | None = None) -> list[tuple[str, int]]:
    """(site, index) of every exam; `subjects` caps the count per site (a quick look)."""
    if size not in SIZES:
        raise SimulateError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    for s in sites:
        if s not in SIZES[size]["subjects"]:
            raise SimulateError(f"unknown site {s!r}: the phantom has {', '.join(SITES)}")
    if subjects is not None and subjects < 1:
        raise SimulateError(f"--subjects must be at least 1, got {subjects}")
    return [(s, i) for s in sites for i in range(min(SIZES[size]["subjects"][s], subjects or 10**6))]


def _one_thread_per_worker() -> None:
    """Exams are the unit of parallelism; BLAS threads inside each worker would only fight them."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


@functools.lru_cache(maxsize=8)
def _anatomy_id(anatomy_dir: str | None) -> str:
    if anatomy_dir is None:
        return "mni152-2009-nilearn"
    import hashlib

    h = hashlib.sha256()
    for name in ("gm", "wm", "csf"):
        h.update((Path(anatomy_dir) / f"{name}.nii.gz").read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def _protocol_id(site: str) -> str:
    """The site's protocol as the simulator reads it (its parsed config, so comments do not count):
    a tree simulated from another protocol is out of date."""
    import hashlib

    cfg = {k: v for k, v in load_site(site).items() if not k.startswith("_")}
    return "sha256:" + hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def simulate(out: Path, size: str = "demo", anatomy_dir: Path | None = None, seed: int = 0,
             sites=SITES, subjects: int | None = None, jobs: int | None = None, force: bool = False,
             progress=None) -> dict:
    """Write the phantom tree to `out` atomically. Returns a summary (timings per exam)."""
    tasks = plan(size, sites, subjects)
    anat_key = str(Path(anatomy_dir).resolve()) if anatomy_dir else None
    _template(anat_key)  # bad anatomy fails here, before anything is written
    marker = {"generator": "qsnet simulate", "simulator_version": SIMULATOR_VERSION,
              "qsnet_version": __version__, "size": size, "seed": seed, "sites": list(sites),
              "anatomy": _anatomy_id(anat_key), "protocols": {s: _protocol_id(s) for s in sites},
              "exams": [f"{s}/{_exam_name(s, i)}" for s, i in tasks]}
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise SimulateError(f"{out}: exists and is not a folder")
        existing = out / MARKER
        if any(out.iterdir()) and not existing.exists():
            raise SimulateError(f"{out}: folder holds other files (no {MARKER}); choose an empty or new --out")
        if existing.exists() and not force:
            try:
                if json.loads(existing.read_text()) == marker:
                    return {"up_to_date": True, "out": str(out), "exams": []}
            except json.JSONDecodeError:
                pass
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    results = []
    try:
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
        args = [(tmp / s / _exam_name(s, i), s, i, seed, size, anat_key) for s, i in tasks]
        if jobs == 1:
            for a in args:
                results.append(simulate_exam(*a))
                if progress:
                    progress(results[-1])
        else:
            with ProcessPoolExecutor(max_workers=jobs, initializer=_one_thread_per_worker) as pool:
                futs = [pool.submit(simulate_exam, *a) for a in args]
                for f in futs:
                    results.append(f.result())
                    if progress:
                        progress(results[-1])
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        (tmp / "README.txt").write_text(
            "Simulated phantom data written by `qsnet simulate` (no real patient data).\n"
            "Names, IDs and dates in the DICOM headers are invented so that de-identification\n"
            "downstream is exercised. Ground truth (labels, brain mask, poses) is under each\n"
            "exam's truth/ folder, never inside the DICOM.\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"up_to_date": False, "out": str(out), "exams": results}

"""Tissue properties and sequence signal models for the phantom.

Every contrast is a function of (T1, B1) tabulated once per series on a log-T1 x B1 grid
(numerically, so inversion trains and GRE readouts need no closed form), times a T2 or T2*
decay over the echo time. Per voxel, each tissue's signal is looked up at its own T1/T2 and
the local transmit field, and the tissues of a voxel are summed *as signals*, signed: partial
volume of inverted and non-inverted tissue cancels in IR images as it does on a scanner.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GAMMA_BAR_HZ_PER_T = 42.577478518e6

# 3T relaxation (ms) and proton density. Brain values are those MRF-FISP papers report at 3T
# (Ma 2013, Jiang 2015, Badve 2017 for glioma); extracranial ones from relaxometry reviews.
TISSUE_PARAMS = {
    #              T1      T2    T2*    PD
    "csf":       (4200.0, 1800.0, 600.0, 1.00),
    "gm":        (1400.0,   85.0,  55.0, 0.80),
    "wm":        ( 850.0,   60.0,  45.0, 0.70),
    "fat":       ( 380.0,  110.0,  40.0, 0.90),
    "bone":      ( 250.0,    1.0,   0.5, 0.05),
    "muscle":    (1400.0,   40.0,  30.0, 0.75),
    "vein":      (1700.0,   35.0,  15.0, 0.85),
    "necrosis":  (2500.0,  300.0, 100.0, 0.95),
    "enhancing": (1750.0,  110.0,  45.0, 0.85),
    "oedema":    (1450.0,  140.0,  70.0, 0.88),
    "haemorrhage": (1200.0,  60.0,   8.0, 0.85),
}
# Biological spread within a tissue (relative sd of T1, T2, PD), drawn as smooth fields.
TEXTURE_SD = (0.04, 0.05, 0.03)


class SignalLUT:
    """g(T1, B1) on a grid; lookup by multilinear interpolation."""

    def __init__(self, fn, t1_range=(50.0, 6000.0), b1_range=(0.5, 1.5), shape=(160, 21)):
        self.log_t1 = np.linspace(np.log(t1_range[0]), np.log(t1_range[1]), shape[0])
        self.b1 = np.linspace(b1_range[0], b1_range[1], shape[1])
        t1, b1 = np.meshgrid(np.exp(self.log_t1), self.b1, indexing="ij")
        self.table = np.asarray(fn(t1, b1), dtype=np.float64)

    def __call__(self, t1: np.ndarray, b1: np.ndarray) -> np.ndarray:
        i = (np.log(t1) - self.log_t1[0]) / (self.log_t1[1] - self.log_t1[0])
        j = (b1 - self.b1[0]) / (self.b1[1] - self.b1[0])
        return ndimage.map_coordinates(self.table, [i, j], order=1, mode="nearest")


# ---------------------------------------------------------------- sequence models

def _relax(mz, t, t1):
    return 1.0 - (1.0 - mz) * np.exp(-t / t1)


def mprage(tr_shot, ti, flip_deg, esp, n_pulses, ti_to_centre=True, inv_eff=0.96):
    """IR-prepared 3D GRE (MPRAGE, BRAVO): Mz at the centre of the train, steady state over shots.

    Siemens' TI runs from the inversion to the centre of the train; GE's BRAVO "prep time"
    to the start of the readout (`ti_to: start` in the site file).
    """
    def fn(t1, b1):
        a = np.deg2rad(flip_deg) * b1
        first = ti - 0.5 * n_pulses * esp if ti_to_centre else ti
        tail = tr_shot - first - n_pulses * esp
        if first <= 0 or tail < 0:
            raise ValueError(f"MPRAGE timing impossible: TI {ti}, train {n_pulses} x {esp} ms, shot TR {tr_shot}")
        mz = np.ones_like(t1)
        for _ in range(8):  # shots until the steady state (converges in ~4)
            mz = -inv_eff * mz
            mz = _relax(mz, first, t1)
            centre = None
            for k in range(n_pulses):
                if k == n_pulses // 2:
                    centre = mz * np.sin(a)
                mz = _relax(mz * np.cos(a), esp, t1)
            mz = _relax(mz, tail, t1)   # first + train + tail is the whole shot
        return centre
    return fn


def spin_echo_train(tr, etl, esp, refocus_deg=180.0):
    """T2-weighted TSE/FSE/PROPELLER: Mz saturated by each train, recovering over the rest of TR."""
    def fn(t1, b1):
        recovery = np.maximum(tr - etl * esp, 1.0)
        mz = 1.0 - np.exp(-recovery / t1)
        refocus = np.sin(np.deg2rad(refocus_deg) * b1 / 2) ** 2 / np.sin(np.deg2rad(refocus_deg) / 2) ** 2
        return mz * np.sin(np.pi / 2 * b1) * refocus
    return fn


def inversion_recovery(tr, ti, readout_ms, adiabatic: bool):
    """IR-TSE (T1-FLAIR) and 3D IR-SPACE/CUBE (T2-FLAIR): signed Mz at TI.

    The readout train saturates Mz; it recovers until the next inversion. A 2D sinc inversion
    loses efficiency with B1 (-cos(pi B1)); an adiabatic 3D one does not.
    """
    def fn(t1, b1):
        dead = tr - ti - readout_ms
        if dead < 0:
            raise ValueError(f"IR timing impossible: TR {tr} < TI {ti} + readout {readout_ms} ms")
        m0 = 1.0 - np.exp(-dead / t1)
        eff = 0.96 if adiabatic else -np.cos(np.pi * b1) * 0.98
        mz = 1.0 - (1.0 + eff * m0) * np.exp(-ti / t1)
        return mz * np.sin(np.pi / 2 * b1)
    return fn


def spoiled_gre(tr, flip_deg):
    """Spoiled gradient echo steady state (Ernst), for SWI/SWAN."""
    def fn(t1, b1):
        a = np.deg2rad(flip_deg) * b1
        e1 = np.exp(-tr / t1)
        return np.sin(a) * (1 - e1) / (1 - e1 * np.cos(a))
    return fn


def sequence_model(series: dict) -> tuple[SignalLUT, str, float]:
    """(g(T1, B1) table, which decay ('t2' or 't2s'), effective TE) for a site series entry."""
    kind = series["kind"]
    te = float(series.get("te_equivalent", series["te"]))
    if kind == "mprage":
        tr = float(series["tr"])
        esp = float(series.get("echo_spacing", tr))
        shot = float(series.get("shot_tr", tr))
        fn = mprage(shot, float(series["ti"]), float(series["flip_angle"]), esp, int(series["turbo_factor"]),
                    ti_to_centre=series.get("ti_to", "centre") == "centre")
        return SignalLUT(fn), "t2s", te
    if kind == "tse":
        fn = spin_echo_train(float(series["tr"]), int(series["etl"]), float(series["echo_spacing"]),
                             float(series.get("refocus_angle", 180.0)))
        return SignalLUT(fn), "t2", te
    if kind in ("ir_tse", "flair3d"):
        readout = float(series.get("echo_train_duration", series.get("etl", 1) * series.get("echo_spacing", 0.0)))
        fn = inversion_recovery(float(series["tr"]), float(series["ti"]), readout, adiabatic=kind == "flair3d")
        return SignalLUT(fn), "t2", te
    if kind == "swi":
        return SignalLUT(spoiled_gre(float(series["tr"]), float(series["flip_angle"]))), "t2s", te
    raise ValueError(f"no signal model for series kind {kind!r}")


# ---------------------------------------------------------------- fields

def transmit_field(shape, affine, rng: np.random.Generator, strength: float) -> np.ndarray:
    """B1+ relative to nominal: central brightening of a 3T head plus a smooth random part."""
    from ingest.phantom.anatomy import _smooth_field

    idx = np.indices(shape, dtype=np.float64)
    r2 = sum((affine[k, k] * idx[k] + affine[k, 3]) ** 2 for k in range(3))
    central = np.exp(-r2 / (2 * 65.0 ** 2)) - 0.55
    rand = _smooth_field(rng, shape, 45.0 / abs(affine[0, 0]))
    return np.clip(1.0 + strength * (1.25 * central + 0.35 * rand), 0.55, 1.45)


def dipole_field_ppm(chi: np.ndarray, voxel_mm: float, b0_dir: np.ndarray) -> np.ndarray:
    """Relative field shift (ppm) from a susceptibility map by the k-space dipole kernel."""
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    k = [np.fft.fftfreq(n, d=voxel_mm) for n in chi.shape]
    kx, ky, kz = np.meshgrid(*k, indexing="ij")
    k2 = kx ** 2 + ky ** 2 + kz ** 2
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = 1.0 / 3.0 - kb ** 2 / k2
    kernel[0, 0, 0] = 0.0
    return np.real(np.fft.ifftn(kernel * np.fft.fftn(chi - chi.mean())))

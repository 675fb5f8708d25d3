"""The physics baseline: each contrast computed from the MRF T1/T2 maps by its signal equation.

For a target role, the site's protocol for that series (``ingest/sites/<site>.yaml``) gives
the sequence model of the phantom (:func:`ingest.phantom.physics.sequence_model`); the MRF
maps, taken back to ms, go through it voxel by voxel, and one global linear mapping
``a * s + b``, fitted on the training exams, takes the per-exam normalised signal to the
normalised target. That is all it knows. It does not know proton density (PD = 1), the
transmit field (B1 = 1) or the receive field, uses the MRF T2 where the sequence decays with
T2*, sees no partial volume of inverted and non-inverted tissue within a voxel (signals of a
voxel's tissues sum, not its relaxation times), and has no phase, so no SWI phase mask. A
learned model can recover some of these from the maps' spatial context, which is why it can
beat the baseline; where it does not, it has learned less than the equation already knows.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr

from ingest.phantom.physics import sequence_model
from ingest.prepare.grid import apply_scale, denormalise, percentile_scale
from ingest.prepare.service import scored_mask
from ingest.siteconfig import SiteConfigError, load_site

__all__ = ["PhysicsUnavailable", "signal", "exam_signal", "PhysicsBaseline"]

# MRF maps are 0 outside the brain after denormalise (and could be 0 at a clipped edge):
# a floor keeps log(T1) and exp(-TE / T2) finite there.
_FLOOR_MS = 1.0


class PhysicsUnavailable(Exception):
    """No signal equation for this store and role (no site config, no series, no model)."""


@lru_cache(maxsize=32)
def _model(series_json: str):
    # tabulating an MPRAGE train is the slow part: once per distinct series
    return sequence_model(json.loads(series_json))


def signal(t1_ms, t2_ms, series: dict) -> np.ndarray:
    """|lut(T1, B1 = 1) * exp(-TE / T2)| for one site series entry; T2 stands in for T2*."""
    lut, _decay, te = _model(json.dumps(series, sort_keys=True, default=str))
    t1 = np.maximum(np.asarray(t1_ms, np.float64), _FLOOR_MS)
    t2 = np.maximum(np.asarray(t2_ms, np.float64), _FLOOR_MS)
    g = lut(t1.ravel(), np.ones(t1.size)).reshape(t1.shape)
    return np.abs(g * np.exp(-te / t2))


def _open(store) -> tuple[zarr.Group, str]:
    if isinstance(store, (str, Path)):
        return zarr.open_group(str(store), mode="r"), str(store)
    root = getattr(store.store, "root", None)
    name = str(root) if root is not None else repr(store.store)
    return store, f"{name}/{store.path}" if store.path else name


@contextlib.contextmanager
def naming(name: str):
    """Errors reading one store name it: zarr's and its codecs' own (a checksum, a corrupt
    chunk) say what is wrong but not where."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        text = str(exc).strip("'\"")
        if name in text:
            raise
        raise ValueError(f"{name}: {text or type(exc).__name__}") from None


def _series(name: str, site, role: str, site_config) -> dict:
    try:
        cfg = load_site(site) if site_config is None else (
            load_site(site_config) if isinstance(site_config, (str, Path)) else site_config)
    except SiteConfigError as e:
        raise PhysicsUnavailable(f"{name}: no site config for site {site!r}: {e}") from None
    series = cfg.get("series", {}).get(role)
    if series is None:
        raise PhysicsUnavailable(f"{name}: site {cfg.get('site', site)!r} has no series for role {role!r}")
    return series


def exam_signal(store, role: str, site_config=None) -> np.ndarray:
    """(Z, H, W) signal of ``role`` from the store's MRF maps, normalised as prepare normalises
    targets (percentiles inside the brain), 0 outside the brain.

    The protocol is that of the store's own site unless ``site_config`` (a config dict, a
    site name or a site file) is given: the baseline for translating to another site.
    """
    g, name = _open(store)
    site = g.attrs.get("site")
    series = _series(name, site, role, site_config)
    scale = g.attrs.get("scale", {})
    if "mrf_t1" not in scale or "mrf_t2" not in scale:
        raise PhysicsUnavailable(f"{name}: no mrf_t1/mrf_t2 scale in the store's attributes")
    brain = np.asarray(g["brain"][...]) > 0
    x = np.asarray(g["input"][...])
    t1 = denormalise(x[0], scale["mrf_t1"], brain)
    t2 = denormalise(x[1], scale["mrf_t2"], brain)
    try:
        s = signal(t1, t2, series)
    except (KeyError, ValueError) as e:
        raise PhysicsUnavailable(f"{name}: no signal model for site {site!r} role {role!r}: {e}") from None
    try:
        lo, hi = percentile_scale(s, brain)
    except ValueError as e:
        raise PhysicsUnavailable(f"{name}: {e}") from None
    if not hi > lo:
        raise PhysicsUnavailable(f"{name}: site {site!r} role {role!r}: signal is constant inside the brain")
    return apply_scale(s, lo, hi, brain)


class PhysicsBaseline:
    """``target ~ a * exam_signal + b``: one pair (a, b) per role, fitted over training exams."""

    def __init__(self, role: str):
        self.role = role
        self.a = self.b = None
        self.voxels = 0

    def fit(self, stores) -> "PhysicsBaseline":
        # sufficient statistics, so the training exams need not all be in memory at once
        n = ss = st = s2 = t0 = 0.0
        for store in stores:
            g, name = _open(store)
            with naming(name):
                brain = scored_mask(g, self.role)   # where the series gives a truth
                s = exam_signal(g, self.role)[brain].astype(np.float64)
                t = np.asarray(g[self.role][...], np.float64)[brain]
            n += s.size
            ss += s.sum()
            t0 += t.sum()
            s2 += (s * s).sum()
            st += (s * t).sum()
        if n == 0:
            raise ValueError(f"{self.role}: no brain voxels in the training stores to fit the baseline on")
        var = s2 - ss * ss / n
        if not var > 0:
            raise ValueError(f"{self.role}: the physics signal is constant over the training voxels")
        self.a = float((st - ss * t0 / n) / var)
        self.b = float((t0 - self.a * ss) / n)
        self.voxels = int(n)
        return self

    def predict(self, store) -> np.ndarray:
        if self.a is None:
            raise RuntimeError(f"{self.role}: fit the baseline before predicting")
        g, name = _open(store)
        with naming(name):
            brain = np.asarray(g["brain"][...]) > 0
            out = self.a * exam_signal(g, self.role).astype(np.float64) + self.b
        return np.where(brain, out, 0.0).astype(np.float32)

    def to_dict(self) -> dict:
        return {"role": self.role, "a": self.a, "b": self.b, "voxels": self.voxels}

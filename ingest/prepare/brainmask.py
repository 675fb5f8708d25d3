"""Brain mask (skull stripping) from the MRF T1 map itself.

A classical method, because the learned strippers (HD-BET, SynthStrip) download their weights
at run time and these machines have no internet. On an MRF T1 map the brain is the large
compartment whose T1 lies above that of scalp fat and muscle (about 300-700 ms at 3 T;
white matter is about 850 ms, CSF up to 4500 ms), enclosed by bone, which the dictionary
match leaves empty (no signal): threshold, cut thin bridges with an in-plane opening, keep
the largest 3D component, grow back the rim the opening took, fill holes slice by slice.
It needs only the maps the serving side also receives, so train and serve mask alike.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["brain_mask", "dice"]


def brain_mask(t1: np.ndarray, cfg: dict | None = None) -> np.ndarray:
    cfg = cfg or {}
    lo, hi = cfg.get("t1_range_ms", [750.0, 6000.0])
    tissue = np.isfinite(t1) & (t1 > lo) & (t1 < hi)
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndi.generate_binary_structure(2, 1)        # slices are thick: never open across them
    m = ndi.binary_opening(tissue, structure=plane, iterations=int(cfg.get("opening", 1)))
    lab, n = ndi.label(m, structure=ndi.generate_binary_structure(3, 1))
    if n == 0:
        return np.zeros(t1.shape, np.uint8)
    sizes = ndi.sum(m, lab, range(1, n + 1))
    m = lab == (int(np.argmax(sizes)) + 1)
    m = ndi.binary_dilation(m, structure=plane, iterations=int(cfg.get("opening", 1))) & tissue
    m = ndi.binary_closing(m, structure=plane, iterations=int(cfg.get("closing", 1)))
    for z in range(m.shape[0]):
        m[z] = ndi.binary_fill_holes(m[z])
    return m.astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s

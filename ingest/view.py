"""`qsnet view`: a mosaic of the middle slice of every series of an exam, for a person to look at.

Titles carry the series description and geometry only, never header identity fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ViewError(ValueError):
    pass


def _exam_series(exam: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from ingest.reader import read_series

    out = []
    for folder in sorted(p for p in exam.iterdir() if p.is_dir() and p.name != "truth"):
        files = sorted(f for f in folder.iterdir() if f.is_file())
        if not files:
            continue
        vol, aff, meta = read_series(files)
        title = meta["series_description"] or folder.name
        colour = meta.get("samples_per_pixel", 1) != 1
        if vol.ndim - colour == 4:   # (T, Z, Y, X[, 3]): the first volume stands for the series
            title = f"{title} (volume 1 of {vol.shape[0]})"
            vol = vol[0]
        out.append((title, vol, aff))
    truth = exam / "truth" / "labels.nii.gz"
    if truth.exists():
        from ingest.nifti import load_nifti_zyx

        lab, aff = load_nifti_zyx(truth)
        out.append(("truth labels", lab.astype(np.float32), aff))
    return out


def _store_series(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from ingest.store import open_store

    st = open_store(path)
    prepared = "input" in st   # a prepared store: its `brain` is computed, truth_* are the phantom's
    out = []
    for role in st.roles:
        arr = st.array(role)
        mid = arr.shape[-3] // 2
        attrs = st.attrs_of(role)
        aff = np.array(attrs.get("affine_lps", np.eye(4)))
        missing = "" if st.has_data(role) else " (NO DATA: shard missing)"  # not a blank that looks like a scan

        def middle(role=role, mid=mid, arr=arr, missing=missing):
            # a store's reads refuse a missing data file; the view shows it, blank and named
            shape = (arr.shape[0], *arr.shape[-2:]) if len(arr.shape) == 4 else arr.shape[-2:]
            return np.zeros(shape, np.float32) if missing else st.slice(role, mid)

        if len(arr.shape) == 4:   # one panel per volume: the prepared input's MRF T1 and T2 channels
            names = attrs.get("channels") or [f"{role}[{t}]" for t in range(arr.shape[0])]
            vols = middle()
            for t in range(arr.shape[0]):
                title = f"{role}: {names[t]}" if attrs.get("channels") else names[t]
                out.append((title + missing, vols[t][None], aff, tuple(arr.shape[-3:])))
            continue
        if role in ("labels", "brain") and not prepared:
            title = f"truth {role}"
        elif role in ("truth_labels", "truth_brain"):
            title = role.replace("_", " ")
        else:
            title = role
        # a 1-slice stand-in volume keeps render() uniform: it shows the middle slice
        out.append((title + missing, middle()[None], aff, tuple(arr.shape[-3:])))
    return out


def render(path: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not path.exists():
        raise ViewError(f"{path}: does not exist")
    if not path.is_dir():
        raise ViewError(f"{path}: expected an exam folder (one sub-folder per series) or a .zarr store")
    if (path / "zarr.json").exists():
        series = _store_series(path)
    else:
        series = [(t, v, a, v.shape[:3]) for t, v, a in _exam_series(path)]
    if not series:
        raise ViewError(f"{path}: no DICOM series found")
    out_png = Path(out_png)
    if out_png.is_dir():   # `--out folder` means a file in it, not folder.png beside it
        out_png = out_png / f"{path.name.removesuffix('.zarr')}.png"
    elif out_png.suffix.lower() != ".png":
        raise ViewError(f"{out_png}: the view is a PNG; name the file .png (or give an existing folder)")
    n = len(series)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, vol, aff, shape) in zip(axes.ravel(), series):
        sl = vol[vol.shape[0] // 2]
        if sl.ndim == 3:   # RGB as stored: 8-bit samples are 0..255, wider ones up to their maximum
            ax.imshow(np.clip(sl / max(float(np.nanmax(sl)), 255.0), 0.0, 1.0))
        elif title.startswith(("truth labels", "truth brain")):
            ax.imshow(sl, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        else:
            # the window from the finite voxels: one NaN in a float map made the whole panel flat grey
            finite = sl[np.isfinite(sl)]
            lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        sp = np.linalg.norm(aff[:3, :3], axis=0)
        ax.set_title(f"{title}\n{shape[2]}x{shape[1]}x{shape[0]}, "
                     f"{sp[2]:.2f}x{sp[1]:.2f}x{sp[0]:.2f} mm", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png

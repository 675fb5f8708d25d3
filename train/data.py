"""2D axial slices of prepared stores for training, validation and test.

:class:`SliceDataset` indexes ``(store, slice)`` pairs at construction (reading only each
store's small ``brain`` and ``valid_<role>`` masks: a slice whose target series leaves part of
the brain uncovered is left out) and reads every item lazily, one slice per array, through
:meth:`ingest.store.ExamStore.slice`; stores are opened per process, so the dataset works in
DataLoader worker processes and in Ray Train workers (each with its own shard: a
``DistributedSampler``, or :meth:`shard`).

Augmentation (paper 2.3, training split only): one random rotation (up to +-15 degrees) and
one elastic deformation (dense displacement field of about 2 pixels standard deviation) as a
single geometric transform applied to input, target and brain mask together (MONAI
``Rand2DElasticd``), then Gaussian noise with a standard deviation of 1 % of the input's
intensity range on the input only. Every item's randomness comes from (seed, epoch, index),
so a run is reproducible whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SliceDataset", "Augment", "find_stores", "exam_input", "INPUT_KINDS"]

INPUT_KINDS = {"mrf": ("mrf_t1", "mrf_t2"), "mri": ("t1w", "t2w")}


def find_stores(root: Path | str, splits=None, sites=None) -> list:
    """Prepared stores under ``root`` (``<site>/<subject>.zarr``) in the given splits and sites.
    ``root`` may be an fsspec URL (``s3://...``): the stores are then URLs, read in place."""
    from ingest import storage

    root = storage.location(root)
    if isinstance(root, Path) and not root.is_dir():
        raise FileNotFoundError(f"{root}: no prepared stores here (run `qsnet prepare` first)")
    out = []
    for p in storage.list_stores(root):
        try:
            attrs = storage.read_json(storage.join(p, "zarr.json"))["attributes"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{p}: not a readable prepared store ({exc})") from None
        if splits is not None and attrs.get("split") not in splits:
            continue
        if sites is not None and attrs.get("site") not in sites:
            continue
        out.append(p)
    return out


class Augment:
    """Rotation + elastic deformation (one transform for all keys), then noise on the input."""

    def __init__(self, size: int, rotate_deg: float = 15.0, elastic_px: float = 2.0,
                 noise: float = 0.01, control_spacing: int | None = None):
        from monai.transforms import Rand2DElasticd

        # MONAI offsets its control points by N(0, magnitude) pixels and interpolates them to a
        # dense field; with control points every size/8 pixels the dense field's standard
        # deviation is about the magnitude (2.02 px measured at 256 x 256 for magnitude 2).
        spacing = control_spacing or max(4, size // 8)
        # no rotation and no deformation is no resampling: MONAI's field through its control
        # grid is not the identity (sub-pixel ripple, zeroed border pixels)
        self.geometric = None if rotate_deg == 0 and elastic_px == 0 else Rand2DElasticd(
            keys=["input", "target", "brain"], spacing=(spacing, spacing),
            magnitude_range=(elastic_px, elastic_px), rotate_range=(math.radians(rotate_deg),),
            prob=1.0, mode=["bilinear", "bilinear", "nearest"], padding_mode="zeros")
        self.noise = float(noise)

    def __call__(self, item: dict, seed: int) -> dict:
        out = {k: item[k] for k in ("input", "target", "brain")}
        if self.geometric is not None:
            self.geometric.set_random_state(seed=seed % (2 ** 32))
            out = self.geometric(out)
        x = _plain(out["input"]).float()
        if self.noise > 0:
            g = torch.Generator().manual_seed(seed % (2 ** 63))
            rng = (x.amax(dim=(-2, -1), keepdim=True) - x.amin(dim=(-2, -1), keepdim=True))
            # noise std is 1 % of each channel's range (paper 2.3), not of a fixed range
            x = x + torch.randn(x.shape, generator=g) * (self.noise * rng)
        return {**item, "input": x, "target": _plain(out["target"]).float(),
                "brain": (_plain(out["brain"]) > 0.5).float()}


def _plain(t) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor carries its metadata (and its slower operators) into
    every batch and the model, and torch.as_tensor keeps the subclass."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def exam_input(store, inputs: str = "mrf") -> np.ndarray:
    """The model input of a whole exam, ``(Z, 2, H, W)`` float32, as the slices of :class:`SliceDataset`."""
    if inputs not in INPUT_KINDS:
        raise ValueError(f"inputs must be one of {sorted(INPUT_KINDS)}, got {inputs!r}")
    if inputs == "mrf":
        x = np.asarray(store.read("input"))
    else:
        missing = [r for r in INPUT_KINDS[inputs] if r not in store]
        if missing:
            raise ValueError(f"{getattr(store, 'path', store)}: prepared store lacks {', '.join(missing)} "
                             f"(the {inputs} input)")
        x = np.stack([np.asarray(store.read(r)) for r in INPUT_KINDS[inputs]])
    return np.ascontiguousarray(np.moveaxis(x, 0, 1), dtype=np.float32)


class SliceDataset(Dataset):
    """Items: ``input`` (C, H, W), ``target`` (K, H, W), ``brain`` (1, H, W) float32 tensors,
    plus ``subject``, ``site`` and ``slice`` (index in the store)."""

    def __init__(self, stores, contrasts=("t1w",), inputs: str = "mrf", brain_only: bool = True,
                 min_brain_fraction: float = 0.02, augment: Augment | dict | bool | None = None, seed: int = 0,
                 min_covered: float = 0.95):
        from ingest.prepare.service import scored_mask
        from ingest.storage import location, name_parts
        from ingest.store import open_store

        if inputs not in INPUT_KINDS:
            raise ValueError(f"inputs must be one of {sorted(INPUT_KINDS)}, got {inputs!r}")
        self.paths = [location(p) for p in stores]
        self.contrasts = tuple(contrasts)
        self.inputs = inputs
        self.seed = int(seed)
        self.epoch = 0
        self.index: list[tuple[int, int]] = []
        self.subjects: list[str] = []
        self.sites: list[str] = []
        size = None
        for si, p in enumerate(self.paths):
            st = open_store(p)
            need = (["input"] if inputs == "mrf" else list(INPUT_KINDS[inputs])) + list(self.contrasts) + ["brain"]
            missing = [r for r in need if r not in st]
            if missing:
                raise ValueError(f"{p}: prepared store lacks {', '.join(missing)}")
            brain = st.read("brain")
            size = brain.shape[-1]
            frac = brain.reshape(brain.shape[0], -1).mean(1)
            zs = [z for z in range(brain.shape[0]) if not brain_only or frac[z] >= min_brain_fraction]
            # A slice whose target (or mri input) series misses part of the brain would teach a
            # black brain there: only slices the series cover (nearly) whole are learnt from.
            per_slice = np.maximum(brain.reshape(brain.shape[0], -1).sum(1), 1)
            for role in list(self.contrasts) + ([] if inputs == "mrf" else list(INPUT_KINDS[inputs])):
                covered = scored_mask(st, role, brain).reshape(brain.shape[0], -1).sum(1) / per_slice
                zs = [z for z in zs if covered[z] >= min_covered or not brain[z].any()]
            self.index.extend((si, z) for z in zs)
            site, subject = name_parts(p)
            self.subjects.append(str(st.attrs.get("subject", subject)))
            self.sites.append(str(st.attrs.get("site", site)))
        if self.paths and not self.index:
            # every slice left out (no brain, or a series that never covers 95 % of a slice's
            # brain): training on nothing would save random weights as the best model
            raise ValueError(f"{self.paths[0]}{f' and {len(self.paths) - 1} other store(s)' if len(self.paths) > 1 else ''}: "
                             f"no slice to learn {', '.join(self.contrasts)} from ({inputs} inputs): every slice has "
                             f"under {min_brain_fraction:.0%} brain or a series covering under {min_covered:.0%} of its "
                             "brain (prepare's report lists each series' coverage)")
        if augment is True or isinstance(augment, dict):
            augment = Augment(size or 64, **(augment if isinstance(augment, dict) else {}))
        self.augment = augment or None
        self._open: dict = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """New random augmentations each epoch (call it as with a DistributedSampler)."""
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int) -> "SliceDataset":
        """This worker's share (every world_size-th slice), for loops without a DistributedSampler."""
        import copy

        part = copy.copy(self)
        part.index = self.index[rank::world_size]
        part._open = {}
        return part

    def _store(self, si: int):
        from ingest.store import open_store

        if self._pid != os.getpid():  # opened files are per process (DataLoader workers fork)
            self._open, self._pid = {}, os.getpid()
        st = self._open.get(si)
        if st is None:
            st = self._open[si] = open_store(self.paths[si])
        return st

    def item_seed(self, i: int) -> int:
        h = hashlib.blake2b(f"{self.seed}:{self.epoch}:{i}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little")

    def __getitem__(self, i: int) -> dict:
        si, z = self.index[i]
        st = self._store(si)
        if self.inputs == "mrf":
            x = np.stack([st.slice("input", z, t) for t in range(2)])
        else:
            x = np.stack([st.slice(r, z) for r in INPUT_KINDS[self.inputs]])
        y = np.stack([st.slice(c, z) for c in self.contrasts])
        b = st.slice("brain", z)[None].astype(np.float32)
        item = {"input": torch.from_numpy(x.astype(np.float32)), "target": torch.from_numpy(y.astype(np.float32)),
                "brain": torch.from_numpy(b), "subject": self.subjects[si], "site": self.sites[si], "slice": z}
        if self.augment is not None:
            item = self.augment(item, self.item_seed(i))
        return item

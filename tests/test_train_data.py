"""The slice loader over prepared stores: lazy, sharded, seeded, augmentation aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ingest.store import write_exam_store
from train.data import Augment, SliceDataset, find_stores


def fake_prepared(root, n=2, z=6, size=32, split="train", prefix="sub"):
    """Prepared-like stores where every target equals input channel 0 (so alignment is checkable)."""
    rng = np.random.default_rng(0)
    paths = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        brain = np.zeros((z, size, size), np.uint8)
        brain[1:-1, 4:-4, 6:-6] = 1                       # first and last slice: no brain
        t1 = (np.sin(xx / 3.0 + i) * np.cos(yy / 5.0) * 0.5 + 0.5)[None].repeat(z, 0).astype(np.float32)
        t1 = t1 * (1 + 0.1 * rng.random((z, 1, 1)).astype(np.float32))
        inp = np.stack([t1, 1 - t1]) * brain
        aff = {"affine_lps": np.eye(4).tolist()}
        arrays = {"input": (inp, aff), "brain": (brain, aff)}
        for c in ("t1w", "t2w"):
            arrays[c] = (inp[0].copy(), aff)
        p = root / "site-A" / f"{prefix}-{i}.zarr"
        write_exam_store(p, arrays, {"site": "site-A", "subject": f"{prefix}-{i}", "split": split})
        paths.append(p)
    return paths


@pytest.fixture
def stores(tmp_path):
    fake_prepared(tmp_path, split="train")
    fake_prepared(tmp_path, n=1, split="val", prefix="val")
    return tmp_path


def test_slices_a_target_series_does_not_cover_are_not_learnt(tmp_path):
    """Slice 1's T2w series reaches half of its brain, slice 2's all but one voxel: slice 1 is
    left out of a T2w dataset (its target would teach a black brain), slice 2 kept, and a T1w
    dataset keeps both."""
    from ingest.store import open_store

    (p,) = fake_prepared(tmp_path, n=1)
    st = open_store(p)
    arrays = {r: (st.read(r), {"affine_lps": np.eye(4).tolist()}) for r in st.roles}
    valid = arrays["brain"][0].copy()
    valid[1, :, :16] = 0
    valid[2, 5, 10] = 0
    arrays["valid_t2w"] = (valid, {"affine_lps": np.eye(4).tolist()})
    write_exam_store(tmp_path / "cut.zarr", arrays, dict(st.attrs))
    slices = [z for _, z in SliceDataset([tmp_path / "cut.zarr"], contrasts=["t2w"]).index]
    assert slices == [2, 3, 4]
    assert [z for _, z in SliceDataset([tmp_path / "cut.zarr"], contrasts=["t1w"]).index] == [1, 2, 3, 4]
    # a series clipping 10 % of every slice passes prepare's brain-wide gate and leaves nothing
    # to learn: a clear error, not a run that saves its random weights as the best model
    valid = arrays["brain"][0].copy()
    valid[:, :, :12] = 0
    arrays["valid_t2w"] = (valid, {"affine_lps": np.eye(4).tolist()})
    write_exam_store(tmp_path / "clipped.zarr", arrays, dict(st.attrs))
    with pytest.raises(ValueError, match=r"clipped.zarr: no slice to learn t2w from \(mrf inputs\)"):
        SliceDataset([tmp_path / "clipped.zarr"], contrasts=["t2w"])


def test_zero_strength_augmentation_is_the_identity_and_items_are_plain_tensors(stores):
    paths = find_stores(stores, splits=["train"])
    plain = SliceDataset(paths, contrasts=["t1w"])
    still = SliceDataset(paths, contrasts=["t1w"], augment=Augment(32, rotate_deg=0, elastic_px=0, noise=0.0))
    assert torch.equal(plain[2]["target"], still[2]["target"]) and torch.equal(plain[2]["input"], still[2]["input"])
    moved = SliceDataset(paths, contrasts=["t1w"], augment=Augment(32), seed=1)[2]
    # MONAI's MetaTensor would carry its metadata and slower operators into every batch
    assert all(type(moved[k]) is torch.Tensor for k in ("input", "target", "brain"))


def test_find_and_index_brain_slices(stores):
    paths = find_stores(stores, splits=["train"])
    assert len(paths) == 2
    ds = SliceDataset(paths, contrasts=["t1w", "t2w"])
    assert len(ds) == 2 * 4                                # slices 0 and 5 hold no brain
    it = ds[0]
    assert it["input"].shape == (2, 32, 32) and it["target"].shape == (2, 32, 32) and it["brain"].shape == (1, 32, 32)
    assert it["input"].dtype == torch.float32 and it["slice"] == 1 and it["subject"] == "sub-0"
    assert len(SliceDataset(paths, brain_only=False)) == 12
    with pytest.raises(ValueError, match="lacks t1flair"):
        SliceDataset(paths, contrasts=["t1flair"])
    with pytest.raises(FileNotFoundError, match="qsnet prepare"):
        find_stores(stores / "nothing")


def test_augmentation_moves_input_and_target_together(stores):
    paths = find_stores(stores, splits=["train"])
    plain = SliceDataset(paths, contrasts=["t1w"])
    aug = SliceDataset(paths, contrasts=["t1w"], augment=Augment(32, noise=0.0), seed=3)
    moved = 0
    for i in range(len(aug)):
        a, p = aug[i], plain[i]
        # target == input channel 0 before augmentation: one transform keeps them equal
        assert torch.allclose(a["input"][0], a["target"][0], atol=1e-6)
        moved += not torch.allclose(a["input"], p["input"], atol=1e-3)
        assert set(torch.unique(a["brain"]).tolist()) <= {0.0, 1.0}
    assert moved == len(aug)                               # and it really transforms


def test_noise_is_on_the_input_only_and_one_percent_of_range(stores):
    paths = find_stores(stores, splits=["train"])
    geo = SliceDataset(paths, augment=Augment(32, noise=0.0), seed=5)
    noisy = SliceDataset(paths, augment=Augment(32, noise=0.01), seed=5)
    a, b = geo[2], noisy[2]
    assert torch.equal(a["target"], b["target"])
    d = (b["input"] - a["input"])[0]
    rng = float(a["input"][0].max() - a["input"][0].min())
    assert 0.7 * 0.01 * rng < float(d.std()) < 1.3 * 0.01 * rng


def test_seeded_per_item_and_epoch_and_same_in_workers(stores):
    paths = find_stores(stores, splits=["train"])
    ds = SliceDataset(paths, augment=True, seed=7)
    x0 = ds[3]["input"]
    assert torch.equal(SliceDataset(paths, augment=True, seed=7)[3]["input"], x0)
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["input"], x0)
    ds.set_epoch(0)
    one = torch.cat([b["input"] for b in torch.utils.data.DataLoader(ds, batch_size=3)])
    two = torch.cat([b["input"] for b in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)])
    assert torch.equal(one, two)


def test_shards_partition_the_slices(stores):
    from torch.utils.data.distributed import DistributedSampler

    ds = SliceDataset(find_stores(stores, splits=["train"]))
    parts = [ds.shard(r, 2) for r in range(2)]
    keys = [(it["subject"], it["slice"]) for p in parts for it in (p[i] for i in range(len(p)))]
    assert len(keys) == len(set(keys)) == len(ds)
    # the sampler Ray Train's prepare_data_loader installs: disjoint per rank as well
    idx = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert not set(idx[0]) & set(idx[1])


def test_mri_inputs_for_the_generalisation_study(stores):
    ds = SliceDataset(find_stores(stores, splits=["val"]), contrasts=["t1w"], inputs="mri")
    it = ds[0]
    assert it["input"].shape[0] == 2 and torch.equal(it["input"][0], it["target"][0])
    with pytest.raises(ValueError, match="inputs must be"):
        SliceDataset([], inputs="ct")


def test_elastic_field_is_about_two_pixels(tmp_path):
    """The dense displacement of the elastic part has a standard deviation of about 2 px."""
    size = 128
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    aug = Augment(size, rotate_deg=0.0, noise=0.0)
    stds = []
    for s in range(8):
        grid = torch.from_numpy(np.stack([yy, xx]))
        out = aug({"input": grid, "target": grid, "brain": torch.ones(1, size, size)}, seed=s)["input"].numpy()
        stds.append(float((out - grid.numpy())[:, 16:-16, 16:-16].std()))
    assert 1.4 < np.mean(stds) < 2.6, stds

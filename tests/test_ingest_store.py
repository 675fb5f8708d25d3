"""The storage layer: exam stores (Zarr v3), the manifest, de-identification helpers."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import zarr
from pydicom.dataset import Dataset

from ingest import deid, manifest, store
from ingest.manifest import FIELDS, Row, check_coverage, file_sha256, read_manifest, write_manifest
from ingest.store import SCHEMA_VERSION, NotAStoreError, open_store, voxel_sha256, write_exam_store

RNG = np.random.default_rng(1234)


def smooth(shape, dtype, rng=RNG):
    """Compressible test data of a given dtype."""
    z = np.cumsum(rng.normal(size=shape), axis=-1)
    if np.dtype(dtype).kind == "b":
        return z > 0
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(z * 3), max(info.min, -1000), min(info.max, 1000)).astype(dtype)
    return z.astype(dtype)


def exam(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "mrf_t1": (smooth((6, 24, 20), np.float32, rng), {"units": "ms", "spacing": [1.0, 1.2, 1.2], "affine_lps": np.eye(4)}),
        "input": (smooth((2, 6, 24, 20), np.int16, rng), {"units": "a.u."}),
        "labels": (smooth((6, 24, 20), np.uint8, rng), {"tissues": {"wm": 2, "gm": 1}}),
    }


GROUP = {"site": "site-A", "subject": "sub-0123456789ab", "cohort": "healthy", "split": "train", "ingest_version": "0.1.0"}


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize(
    "shape,dtype",
    [((5, 16, 12), np.float32), ((3, 5, 16, 12), np.float32), ((5, 16, 12), np.int16), ((2, 4, 8, 8), np.int16),
     ((5, 16, 12), np.uint8), ((4, 8, 8), np.bool_), ((1, 1, 1), np.float64), ((4, 8, 8), ">f4")],
)
def test_round_trip(tmp_path, shape, dtype):
    data = smooth(shape, dtype)
    h = write_exam_store(tmp_path / "s.zarr", {"x": (data, {"units": "ms"})}, {"subject": "sub-x"})
    s = open_store(tmp_path / "s.zarr")
    assert s.roles == ["x"] and "x" in s
    got = s.read("x")
    assert got.shape == data.shape and got.dtype == data.dtype.newbyteorder("=") and np.array_equal(got, data)
    assert np.array_equal(s.array("x")[...], data)
    assert s.attrs_of("x")["sha256"] == voxel_sha256(data)
    assert s.content_hash() == h
    s.verify()


def test_layout_one_shard_file_per_array_and_zstd(tmp_path):
    arrays = exam()
    write_exam_store(tmp_path / "s.zarr", arrays, GROUP)
    files = sorted(p.relative_to(tmp_path / "s.zarr").as_posix() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    assert files == ["input/c.0.0.0.0", "input/zarr.json", "labels/c.0.0.0", "labels/zarr.json",
                     "mrf_t1/c.0.0.0", "mrf_t1/zarr.json", "zarr.json"]
    for role, (data, _) in arrays.items():
        meta = json.loads((tmp_path / "s.zarr" / role / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["shape"] == list(data.shape)
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == list(data.shape)  # one shard
        (codec,) = meta["codecs"]
        assert codec["name"] == "sharding_indexed"
        cfg = codec["configuration"]
        assert cfg["chunk_shape"] == [1] * (data.ndim - 2) + list(data.shape[-2:])  # one slice per chunk
        assert [c["name"] for c in cfg["codecs"]] == ["bytes", "zstd"]
        assert [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
        arr = open_store(tmp_path / "s.zarr").array(role)
        assert arr.shards == data.shape and arr.chunks == tuple(cfg["chunk_shape"])
    shard = tmp_path / "s.zarr" / "mrf_t1" / "c.0.0.0"
    assert shard.stat().st_size < arrays["mrf_t1"][0].nbytes  # compressed


def test_attrs_sha256_and_schema_version(tmp_path):
    arrays = exam()
    h = write_exam_store(tmp_path / "s.zarr", arrays, GROUP)
    s = open_store(tmp_path / "s.zarr")
    assert s.attrs == {**GROUP, "schema_version": SCHEMA_VERSION}
    for role, (data, attrs) in arrays.items():
        got = s.attrs_of(role)
        assert got["sha256"] == hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
        assert {k: v for k, v in got.items() if k != "sha256"} == json.loads(json.dumps(attrs, default=lambda o: o.tolist()))
    assert s.attrs_of("mrf_t1")["affine_lps"] == np.eye(4).tolist()
    # keys sorted at every depth in zarr.json
    meta = json.loads((tmp_path / "s.zarr" / "labels" / "zarr.json").read_text())
    assert list(meta["attributes"]) == sorted(meta["attributes"]) and list(meta["attributes"]["tissues"]) == ["gm", "wm"]
    assert s.content_hash() == h
    # the content hash follows content: attrs and voxels
    h2 = write_exam_store(tmp_path / "t.zarr", arrays, {**GROUP, "split": "test"})
    arrays3 = exam()
    arrays3["labels"][0][0, 0, 0] += 1
    h3 = write_exam_store(tmp_path / "u.zarr", arrays3, GROUP)
    assert len({h, h2, h3}) == 3


def test_writing_the_same_store_again_keeps_its_files(tmp_path):
    """Made again with the same content, the store keeps its files (times and inodes): a DVC
    output stays what it was. Different content replaces it."""
    arrays = exam()
    write_exam_store(tmp_path / "s.zarr", arrays, GROUP)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    write_exam_store(tmp_path / "s.zarr", exam(), GROUP)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == files
    assert not [p for p in tmp_path.iterdir() if p.name != "s.zarr"]   # no temporary left
    write_exam_store(tmp_path / "s.zarr", arrays, {**GROUP, "split": "test"})
    assert open_store(tmp_path / "s.zarr").attrs["split"] == "test"


def test_bad_inputs(tmp_path):
    data = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="end in .zarr"):
        write_exam_store(tmp_path / "s", {"x": (data, {})}, {})
    with pytest.raises(ValueError, match="shape"):
        write_exam_store(tmp_path / "s.zarr", {"x": (np.zeros((4, 4)), {})}, {})
    with pytest.raises(ValueError, match="role"):
        write_exam_store(tmp_path / "s.zarr", {"../x": (data, {})}, {})
    with pytest.raises(ValueError, match="dtype"):
        write_exam_store(tmp_path / "s.zarr", {"x": (data.astype(complex), {})}, {})
    with pytest.raises(ValueError, match="finite"):
        write_exam_store(tmp_path / "s.zarr", {"x": (data, {"te": float("nan")})}, {})
    with pytest.raises(ValueError, match="sha256"):
        write_exam_store(tmp_path / "s.zarr", {"x": (data, {"sha256": "0" * 64})}, {})
    with pytest.raises(ValueError, match="schema_version"):
        write_exam_store(tmp_path / "s.zarr", {"x": (data, {})}, {"schema_version": 99})
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "other.zarr" / "keep.txt").write_text("not a store")
    with pytest.raises(ValueError, match="refusing to replace"):
        write_exam_store(tmp_path / "other.zarr", {"x": (data, {})}, {})
    assert (tmp_path / "other.zarr" / "keep.txt").exists()
    assert not (tmp_path / "s.zarr").exists()
    assert siblings(tmp_path / "other.zarr") == []


def test_deterministic_bytes(tmp_path):
    a = exam(seed=7)
    reordered = {k: (v[0], dict(reversed(list(v[1].items())))) for k, v in reversed(list(a.items()))}
    write_exam_store(tmp_path / "one" / "s.zarr", a, GROUP)
    write_exam_store(tmp_path / "two" / "s.zarr", reordered, dict(reversed(list(GROUP.items()))))
    one, two = files_of(tmp_path / "one" / "s.zarr"), files_of(tmp_path / "two" / "s.zarr")
    assert one.keys() == two.keys() and one == two
    # rewriting in place gives the same bytes too
    write_exam_store(tmp_path / "one" / "s.zarr", a, GROUP)
    assert files_of(tmp_path / "one" / "s.zarr") == one
    assert b"date" not in b"".join(v for k, v in one.items() if k.endswith("zarr.json")).lower()


class Crash(Exception):
    pass


def crash_after_first_array(monkeypatch):
    real = store._write_array
    calls = []

    def flaky(*args, **kw):
        if calls:
            raise Crash("simulated crash mid-write")
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(store, "_write_array", flaky)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_atomic_write_crash(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    target = tmp_path / "site-A" / "s.zarr"
    v1, v2 = exam(seed=1), exam(seed=2)

    # crash on a first write: nothing at the path, no debris
    with monkeypatch.context() as m:
        crash_after_first_array(m)
        with pytest.raises(Crash):
            write_exam_store(target, v1, GROUP)
    assert not target.exists() and siblings(target) == []

    write_exam_store(target, v1, GROUP)
    before = files_of(target)
    # crash while replacing: the previous complete store stays
    with monkeypatch.context() as m:
        crash_after_first_array(m)
        with pytest.raises(Crash):
            write_exam_store(target, v2, GROUP)
    assert files_of(target) == before and siblings(target) == []
    s = open_store(target)
    assert np.array_equal(s.read("mrf_t1"), v1["mrf_t1"][0])

    # a later write succeeds and replaces it
    write_exam_store(target, v2, GROUP)
    assert np.array_equal(open_store(target).read("mrf_t1"), v2["mrf_t1"][0])
    assert siblings(target) == []


def test_stale_temp_dirs_cleaned(tmp_path, monkeypatch):
    """A hard crash (kill -9) leaves a temp dir; the next write removes it if its writer is gone."""
    target = tmp_path / "s.zarr"
    host, me = store._host_tag(), os.getpid()
    dead_pid = 2**31 - 2  # above any pid_max: no such process
    dead = tmp_path / f".s.zarr.tmp-{dead_pid}-{host}-0123abcd"
    reused = tmp_path / f".s.zarr.tmp-{me}-{host}-89abcdef"  # our pid, but made before we started
    live = tmp_path / f".s.zarr.tmp-{me}-{host}-deadbeef"  # a concurrent writer in this process
    old = tmp_path / f".s.zarr.old-{dead_pid}-{host}-00000000"
    foreign = tmp_path / f".s.zarr.tmp-{dead_pid}-zzzzzzzz-11111111"  # other host, recent: kept
    foreign_old = tmp_path / f".s.zarr.tmp-{dead_pid}-0000000a-11111111"  # other host, untouched for days
    other = tmp_path / f".t.zarr.tmp-{dead_pid}-{host}-11111111"  # another store's: not ours to touch
    for d in (dead, reused, live, old, foreign, foreign_old, other):
        (d / "mrf_t1").mkdir(parents=True)
        (d / "zarr.json").write_text("{}")
    for d in (reused, foreign_old):
        os.utime(d, (1_000_000_000, 1_000_000_000))
    write_exam_store(target, exam(), GROUP)
    left = siblings(target)
    assert dead.name not in left and old.name not in left and foreign_old.name not in left
    if store._process_start_time(me) is not None:  # Linux
        assert reused.name not in left
    assert live.name in left and foreign.name in left and other.name in left
    assert store._temp_name(target, "tmp").name.startswith(f".s.zarr.tmp-{me}-{host}-")


def test_open_store_errors(tmp_path):
    def expect(path, why):
        with pytest.raises(ValueError, match=rf"^{path}: not a qsnet store \(.*{why}"):
            open_store(path)

    expect(tmp_path / "missing.zarr", "does not exist")
    (tmp_path / "file.zarr").write_text("x")
    expect(tmp_path / "file.zarr", "not a directory")
    (tmp_path / "empty.zarr").mkdir()
    expect(tmp_path / "empty.zarr", "no zarr.json")
    zarr.create_group(str(tmp_path / "plain.zarr"), attributes={"a": 1})
    expect(tmp_path / "plain.zarr", "no schema_version")
    zarr.create_group(str(tmp_path / "future.zarr"), attributes={"schema_version": SCHEMA_VERSION + 1})
    expect(tmp_path / "future.zarr", f"schema_version {SCHEMA_VERSION + 1}")
    zarr.create_array(str(tmp_path / "arr.zarr"), shape=(2,), dtype="f4")
    expect(tmp_path / "arr.zarr", "not a Zarr v3 group")
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2, attributes={"schema_version": 1})
    expect(tmp_path / "v2.zarr", "no zarr.json")
    assert issubclass(NotAStoreError, ValueError)
    write_exam_store(tmp_path / "ok.zarr", exam(), GROUP)
    s = open_store(tmp_path / "ok.zarr")
    with pytest.raises(KeyError, match="no array 't2w'"):
        s.array("t2w")


def test_slice_matches_zarr(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {
        "f32": (smooth((9, 32, 24), np.float32, rng), {}),
        "i16": (smooth((9, 32, 24), np.int16, rng), {}),
        "u8": (smooth((9, 32, 24), np.uint8, rng), {}),
        "f64": (smooth((9, 32, 24), np.float64, rng), {}),
        "b": (smooth((9, 32, 24), np.bool_, rng), {}),
        "in4": (smooth((3, 9, 32, 24), np.float32, rng), {}),
        "i4": (smooth((2, 9, 32, 24), np.int16, rng), {}),
    }
    arrays["f32"][0][3] = 0  # an all-zero slice is still a chunk of its own
    write_exam_store(tmp_path / "s.zarr", arrays, GROUP)
    s = open_store(tmp_path / "s.zarr")
    for role, (data, _) in arrays.items():
        arr = s.array(role)
        assert s._reader(role) is not None, role  # the fast path applies to what we write
        for z in list(rng.integers(0, 9, 12)) + [0, 8, -1]:
            z = int(z)
            if data.ndim == 3:
                ref = arr[z]
                got = s.slice(role, z)
            else:
                ref = arr[:, z]
                got = s.slice(role, z)
                t = int(rng.integers(0, data.shape[0]))
                assert np.array_equal(s.slice(role, z, t=t), arr[t, z])
            assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), (role, z)
            assert np.array_equal(got, data[z] if data.ndim == 3 else data[:, z])
        assert np.array_equal(s.read(role), arr[...])
    x = s.slice("f32", 2)
    x += 1  # a fresh writable array
    assert np.array_equal(s.slice("f32", 2), arrays["f32"][0][2])
    with pytest.raises(IndexError):
        s.slice("f32", 9)
    with pytest.raises(IndexError):
        s.slice("in4", 0, t=3)
    with pytest.raises(TypeError):
        s.slice("f32", 0, t=0)
    with pytest.raises(TypeError):
        s.slice("f32", 1.0)


def test_slice_falls_back_to_zarr_for_other_layouts(tmp_path):
    path = tmp_path / "s.zarr"
    g = zarr.create_group(str(path), attributes={"schema_version": SCHEMA_VERSION})
    data = smooth((5, 16, 12), np.float32)
    # unsharded, default codecs
    a = g.create_array("plain", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 12))
    a[...] = data
    # sharded + zstd, but with a shuffle filter in the chain
    b = g.create_array("shuffled", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 12), shards=data.shape,
                       serializer=zarr.codecs.BytesCodec(), compressors=[zarr.codecs.BloscCodec(cname="zstd")])
    b[...] = data
    # our layout, but zarr's default of not writing empty chunks: missing index entries / no file
    sparse = data.copy()
    sparse[1] = 0
    c = g.create_array("sparse", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 12), shards=data.shape,
                       compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0)
    c[...] = sparse
    g.create_array("nofile", shape=data.shape, dtype=data.dtype, chunks=(1, 16, 12), shards=data.shape,
                   compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0)
    s = open_store(path)
    assert s._reader("plain") is None and s._reader("shuffled") is None
    assert s._reader("sparse") is not None and s._reader("nofile") is not None
    for z in range(5):
        assert np.array_equal(s.slice("plain", z), data[z])
        assert np.array_equal(s.slice("shuffled", z), data[z])
        assert np.array_equal(s.slice("sparse", z), sparse[z])
        assert np.array_equal(s.slice("nofile", z), np.zeros((16, 12), np.float32))
    assert np.array_equal(s.read("sparse"), sparse) and np.array_equal(s.read("shuffled"), data)


def test_slice_after_store_replaced_and_corruption(tmp_path):
    path = tmp_path / "s.zarr"
    v1, v2 = exam(seed=1), exam(seed=2)
    write_exam_store(path, v1, GROUP)
    s = open_store(path)
    assert np.array_equal(s.slice("mrf_t1", 2), v1["mrf_t1"][0][2])
    write_exam_store(path, v2, GROUP)  # same shapes, new file: the cached index must not be reused
    assert np.array_equal(s.slice("mrf_t1", 2), v2["mrf_t1"][0][2])
    # corrupt the shard index (at the end of the file): checksum error, not garbage
    shard = path / "mrf_t1" / "c.0.0.0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    s2 = open_store(path)
    with pytest.raises(ValueError, match="checksum"):
        s2.slice("mrf_t1", 0)


def test_verify_detects_changed_voxels(tmp_path):
    path = tmp_path / "s.zarr"
    write_exam_store(path, exam(), GROUP)
    a = zarr.open_array(str(path / "labels"), mode="r+")
    a[0, 0, 0] = a[0, 0, 0] + 1
    with pytest.raises(ValueError, match="labels"):
        open_store(path).verify()


def test_pickles_as_its_path(tmp_path):
    write_exam_store(tmp_path / "s.zarr", exam(), GROUP)
    s = open_store(tmp_path / "s.zarr")
    s.slice("mrf_t1", 0)
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.roles == s.roles and np.array_equal(s2.slice("input", 3), s.slice("input", 3))


# --------------------------------------------------------------------------- manifest


def rows_fixture():
    sha = "ab" * 32
    return [
        Row("site-B/sub1/s2/0002.dcm", 1000, sha, "ingested", "", "site-B", "sub-aaaaaaaaaaaa", "ser-bbbbbbbbbbbb", "t1w"),
        Row("site-A/sub1/s1/0001.dcm", 2000, sha, "quarantined", "missing PixelData, re-export the series", "site-A"),
        Row("site-A/README.txt", 12, sha, "ignored", "not DICOM"),
        Row("site-A/sub1/s1/odd, name.dcm", 5, sha, "quarantined", 'bad "quote",\nand a second line', "site-A"),
    ]


def test_manifest_round_trip_and_determinism(tmp_path):
    rows = rows_fixture()
    write_manifest(tmp_path / "manifest.csv", rows)
    got = read_manifest(tmp_path / "manifest.csv")
    assert [r.path for r in got] == sorted(r.path for r in rows)
    assert sorted(got, key=lambda r: r.path) == sorted(rows, key=lambda r: r.path)
    assert got[-2].reason == 'bad "quote", and a second line'  # one line per reason
    first = (tmp_path / "manifest.csv").read_bytes()
    assert first.startswith((",".join(FIELDS) + "\n").encode()) and b"\r" not in first
    write_manifest(tmp_path / "manifest.csv", list(reversed(rows)))
    assert (tmp_path / "manifest.csv").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]  # no temp files left
    check_coverage(got, [r.path for r in rows])
    with pytest.raises(ValueError, match="without a row"):
        check_coverage(got, [r.path for r in rows] + ["site-A/new.dcm"])
    with pytest.raises(ValueError, match="for no input file"):
        check_coverage(got, [r.path for r in rows][1:])


def test_manifest_validation(tmp_path):
    sha = "cd" * 32
    with pytest.raises(ValueError, match="status"):
        Row("a.dcm", 1, sha, "done", "x")
    with pytest.raises(ValueError, match="needs a reason"):
        Row("a.dcm", 1, sha, "quarantined")
    with pytest.raises(ValueError, match="needs subject"):
        Row("a.dcm", 1, sha, "ingested", site="site-A", series="s", role="t1w")
    with pytest.raises(ValueError, match="needs sha256"):
        Row("a.dcm", 1, "", "ingested", site="site-A", subject="sub-x")
    Row("truth/truth.json", 1, sha, "ingested", site="site-A", subject="sub-x", role="truth")  # no series: fine
    with pytest.raises(ValueError, match="relative"):
        Row("/abs/a.dcm", 1, sha, "ignored", "x")
    with pytest.raises(ValueError, match="relative"):
        Row("../a.dcm", 1, sha, "ignored", "x")
    with pytest.raises(ValueError, match="sha256"):
        Row("a.dcm", 1, "XYZ", "ignored", "x")
    with pytest.raises(ValueError, match="size"):
        Row("a.dcm", -1, sha, "ignored", "x")
    with pytest.raises(ValueError, match="duplicate"):
        write_manifest(tmp_path / "m.csv", [Row("a.dcm", 1, sha, "ignored", "x")] * 2)
    (tmp_path / "bad.csv").write_text("path,size\n")
    with pytest.raises(ValueError, match="header"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text(",".join(FIELDS) + "\na.dcm,1," + sha + ",weird,,,,,\n")
    with pytest.raises(ValueError, match=r"bad2.csv:2: .*status"):
        read_manifest(tmp_path / "bad2.csv")


def test_manifest_row_for_file(tmp_path):
    (tmp_path / "site-A").mkdir()
    f = tmp_path / "site-A" / "x.dcm"
    f.write_bytes(b"DICM" * 10)
    r = Row.for_file(tmp_path, f, "ignored", "test")
    assert r.path == "site-A/x.dcm" and r.size == 40 and r.sha256 == hashlib.sha256(b"DICM" * 10).hexdigest()
    assert file_sha256(f) == r.sha256
    gone = Row.for_file(tmp_path, "site-A/gone.dcm", "quarantined")
    assert gone.sha256 == "" and gone.reason.startswith("unreadable")
    assert manifest.STATUSES == ("ingested", "quarantined", "ignored")


# --------------------------------------------------------------------------- de-identification


def test_pseudonym_stable_and_keyed():
    k1, k2 = b"k" * 32, b"j" * 32
    p = deid.pseudonym(k1, "site-A", "PAT-0042")
    assert p == deid.pseudonym(k1, "site-A", "PAT-0042")
    assert p.startswith("sub-") and len(p) == 16 and int(p[4:], 16) >= 0
    assert p != deid.pseudonym(k2, "site-A", "PAT-0042")
    assert p != deid.pseudonym(k1, "site-B", "PAT-0042")
    assert deid.pseudonym(k1, "ab", "c") != deid.pseudonym(k1, "a", "bc")
    assert deid.pseudonym(k1, "1.2.3", prefix="ser-").startswith("ser-")
    assert "PAT-0042" not in p and "0042" not in p


def test_load_key(tmp_path, monkeypatch):
    monkeypatch.delenv(deid.KEY_ENV, raising=False)
    key, source = deid.load_key()
    assert source == deid.DEVELOPMENT_KEY_SOURCE and key
    f = tmp_path / "key"
    f.write_bytes(b"0123456789abcdef0123\n")
    assert deid.load_key(str(f)) == (b"0123456789abcdef0123", f"file:{f}")
    monkeypatch.setenv(deid.KEY_ENV, "from-the-environment-0123456789")
    assert deid.load_key(str(f)) == (b"from-the-environment-0123456789", f"env:{deid.KEY_ENV}")
    monkeypatch.setenv(deid.KEY_ENV, "short")
    with pytest.raises(ValueError, match="at least 16"):
        deid.load_key()
    monkeypatch.delenv(deid.KEY_ENV)
    with pytest.raises(ValueError, match="cannot read"):
        deid.load_key(str(tmp_path / "missing"))


def test_phi_keywords():
    from pydicom.datadict import tag_for_keyword

    assert all(tag_for_keyword(k) is not None for k in deid.PHI_KEYWORDS)  # no typos
    must = {"PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs", "InstitutionName",
            "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber",
            "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "StudyInstanceUID",
            "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "DeviceSerialNumber", "StationName",
            "ImageComments", "PatientComments", "StudyDescription"}
    assert must <= deid.PHI_KEYWORDS
    assert set(deid.SAFE_FIELDS) & deid.PHI_KEYWORDS == deid.CLEANED_DESCRIPTORS


def identified_dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = "PAT-0042-XYZ"
    ds.PatientBirthDate = "19700131"
    ds.InstitutionName = "St Example Hospital"
    ds.StudyDate = "20230512"
    ds.OperatorsName = "Smith^Ann"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Prisma"
    ds.SeriesDescription = "t1_mprage_sag Doe^Jane 20230512"
    ds.ProtocolName = "MRF_FISP 12.05.2023"
    ds.SequenceName = "*tfl3d1_16ns"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.98"
    ds.InversionTime = "900"
    ds.FlipAngle = "9"
    ds.MagneticFieldStrength = "3"
    ds.PixelSpacing = ["1.0", "1.25"]
    ds.SliceThickness = "1.0"
    ds.Rows = 256
    return ds


def test_safe_header_fields_drop_phi(tmp_path):
    ds = identified_dataset()
    safe = deid.safe_header_fields(ds)
    assert safe["vendor"] == "SIEMENS" and safe["model"] == "Prisma" and safe["sequence_name"] == "*tfl3d1_16ns"
    assert safe["tr"] == 2300.0 and safe["te"] == 2.98 and safe["ti"] == 900.0 and safe["flip_angle"] == 9.0
    assert safe["field_strength"] == 3.0 and safe["pixel_spacing"] == [1.0, 1.25] and safe["rows"] == 256
    assert safe["image_type"] == ["ORIGINAL", "PRIMARY", "M", "ND"]
    assert safe["series_description"] == "t1_mprage_sag" and safe["protocol_name"] == "MRF_FISP"
    identities = [str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.InstitutionName, ds.StudyDate,
                  str(ds.OperatorsName), ds.StudyInstanceUID]
    text = json.dumps(safe)
    assert deid.scan_for_phi(text, identities) == []
    # and a whole store written with them carries none of it either
    write_exam_store(tmp_path / "s.zarr", {"t1w": (np.zeros((2, 4, 4), np.int16), safe)}, GROUP)
    blob = "".join(v.decode() for k, v in files_of(tmp_path / "s.zarr").items() if k.endswith("zarr.json"))
    assert deid.scan_for_phi(blob, identities) == []
    # the helper does find them when present
    assert deid.scan_for_phi("Report for Jane Doe, born 1970-01-31", identities) == [str(ds.PatientName), ds.PatientBirthDate]
    assert deid.scan_for_phi("seen at st example hospital", identities) == [ds.InstitutionName]


def test_scrub_text():
    assert deid.scrub_text("t2_tse_tra 2023-05-12") == "t2_tse_tra"
    assert deid.scrub_text("Doe^John FLAIR") == "FLAIR"
    assert deid.scrub_text("ep2d_diff v1.5.30 12/05/2023") == "ep2d_diff v1.5.30"
    assert deid.scrub_text("DT 20230512101500.000000") == "DT"
    assert deid.scrub_text("SWI 12 Mar 2023") == "SWI"
    assert deid.scrub_text("MRF_FISP_1000") == "MRF_FISP_1000"


@pytest.mark.parametrize("name, typed", [
    ("佐藤^一郎", "t2_tse_tra 佐藤一郎"),                    # ideographic names carry no space
    ("佐藤^一郎", "t2_tse_tra 佐藤"),                       # a two-character family name is a name
    ("YAMADA^TAROU=山田^太郎=やまだ^たろう", "t2_tse_tra 山田太郎"),  # each = group of a PN value
    ("YAMADA^TAROU=山田^太郎", "t2_tse_tra Tarou Yamada"),
    ("MÜLLER^JÖRG", unicodedata.normalize("NFD", "t2_tse_tra Jörg Müller")),  # decomposed accents
    ("DOE^JANE", "t2_tse_tra JaneDoe"),
])
def test_names_are_scrubbed_in_every_way_they_are_written(name, typed):
    assert deid.scrub_text(typed, [name]) == "t2_tse_tra"
    assert deid.scan_for_phi(typed, [name]) == [name]


P, N = deid.PlaceName, deid.PersonName


@pytest.mark.parametrize("identity, typed, left", [
    (P("Northgate University Hospital"), "t1_mprage Northgate", "t1_mprage"),
    (P("14 Harbour Road, Eastport"), "Eastport_t2_tse", "_t2_tse"),
    (P("St. Aldric Cancer Centre"), "BRAIN ROUTINE Aldric", "BRAIN ROUTINE"),
    (N("JANE DOE"), "swi doe", "swi"),                     # a PatientName typed without ^
    (N("JOHN PARK"), "swi park", "swi"),                   # a surname is a name, whatever else it means
    # the generic words of a place name identify no one and stay
    (P("Brain Research Institute of Eastport"), "BRAIN ROUTINE research", "BRAIN ROUTINE research"),
    (P("Royal Hospital"), "t2 new royal", "t2 new royal"),
    (P("14 Mill Lane 02115"), "ep2d 14 b1000 02115", "ep2d 14 b1000"),   # a 5-digit postcode goes, a house number stays
    (P("Northgate_University_Hospital"), "ax northgate", "ax"),          # any separator makes words
    ("Garcia Lopez^Maria", "t2 lopez", "t2"),                            # a multi-word name component
    (P("Northgate University Hospital"), "NorthgateT1", "NorthgateT1"),  # a word is a whole token only
    ("HAN^KAREN", "Ax T1 enhanced han", "Ax T1 enhanced"),               # a PN component too
    (N("山田 太郎"), "t2 山田様", "t2 様"),                               # no token boundary in that script
    ("MRN-4471", "MRN scan", "MRN scan"),                               # an ID's parts are no one's words
])
def test_a_distinctive_word_of_a_place_or_name_is_scrubbed(identity, typed, left):
    assert deid.scrub_text(typed, [identity]) == left
    assert deid.scan_for_phi(typed, [identity]) == ([str(identity)] if typed != left else [])


PLACES = ["Eastport Med. Ctr., 120 Ocean Ave, Ste 200", "Buena Vista Medical Center", "Royal Free Hospital",
          "Dixon Regional Medical Center", "Centre for Medical Image Computing", "PET MR Unit, Mile End Hospital",
          "Klinikum rechts der Isar der TUM", "14 Harbour Road, Eastport", "100 Boston Post Road, Wayland",
          "Sag Harbor Hospital", "23 London Road, Reading RG1 5AN"]
NAMES = ["Karen Han", "Ali Khan", "Jan van der Berg", "HAN^KAREN", "KHAN^ALI"]
DESCRIPTIONS = ["t1_mprage_sag_p2_iso", "t2_medic_tra", "Ax T1 BRAVO Stealth", "t1_mprage_sag_p3_iso_Wave",
                "3D_FLAIR_VISTA", "t1_vibe_dixon_W", "SWI_Images", "MRAC_PET_AC_Images", "T1_tumor_post",
                "t2_haste_free_breathing", "Ax T1 enhanced", "localizer", "ep2d_diff_mddw_20_p2",
                "Ax T2 FLAIR", "Sag CUBE T2 FLAIR", "ep2d_advanced_diff water tensor", "AX T1 POST",
                # phrases of manifest reasons, which the same scrub cleans
                "the file ends 10 bytes into its Pixel Data element", "median step 2.5 mm; steps range 2.4-2.6",
                "inconsistent Rows x Columns: the other positions have 3", "unexpected end of the series",
                "reading it runs past the end"]


@pytest.mark.parametrize("identity", [P(p) for p in PLACES] + [N(n) for n in NAMES])
def test_the_word_scrub_leaves_sequence_names_and_reasons_whole(identity):
    """A site's institution and address are the same on every exam: a word of theirs that cut
    into a description would mangle one kind of series site-wide, and reasons with it."""
    for text in DESCRIPTIONS:
        assert deid.scrub_text(text, [identity]) == text, (identity, text)


def test_short_ascii_identities_do_not_mangle_descriptions():
    assert deid.scrub_text("t1_mprage_sag 2", ["2", "Li^Wu"]) == "t1_mprage_sag 2"


def _zarr_reference_store(root, data, attrs, gattrs, level=store.ZSTD_LEVEL):
    """The same store written through zarr's own API (as the store module did before it wrote
    the files itself): the reference the direct writer must match."""
    import zarr
    from zarr.codecs import BytesCodec, ZstdCodec

    g = zarr.create_group(zarr.storage.LocalStore(root), zarr_format=3, attributes=gattrs)
    arr = g.create_array(
        name="a", shape=data.shape, dtype=data.dtype, chunks=(1,) * (data.ndim - 2) + data.shape[-2:],
        shards=data.shape, filters=None,
        serializer=BytesCodec(endian="little") if data.dtype.itemsize > 1 else BytesCodec(endian=None),
        compressors=ZstdCodec(level=level, checksum=False),
        fill_value=False if data.dtype.kind == "b" else 0, attributes=attrs,
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True})
    arr[...] = data


@pytest.mark.parametrize("dtype,shape", [("float32", (5, 7, 9)), (">i2", (4, 6, 6)), ("bool", (3, 4, 4)),
                                         ("uint8", (2, 3, 4, 5)), ("float32", (2, 3, 8, 8)),
                                         ("float64", (2, 5, 5)), ("int32", (3, 4, 4))])
def test_direct_writer_matches_zarr(tmp_path, dtype, shape):
    """The store writes its files itself (zarr's per-chunk and per-array overhead is larger
    than compressing): every file must be what zarr writes, byte for byte for volumes (zarr
    orders the chunks of a 4-D array along a Morton curve, we in C order: the index says
    where each is), and zarr must read the store back."""
    import zarr

    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 1000).astype(dtype) if dtype != "bool" else rng.random(shape) > 0.5
    data[0] = 0  # an all-zero chunk is written too
    ours = tmp_path / "ours.zarr"
    write_exam_store(ours, {"a": (data, {"units": "ms", "te": 2.5})}, GROUP)
    attrs = json.loads((ours / "a" / "zarr.json").read_text())["attributes"]
    gattrs = json.loads((ours / "zarr.json").read_text())["attributes"]
    ref = tmp_path / "ref.zarr"
    _zarr_reference_store(ref, data, attrs, gattrs)
    a, b = files_of(ours), files_of(ref)
    assert a.keys() == b.keys()
    for name in a:
        if len(shape) == 3 or name.endswith("zarr.json"):
            assert a[name] == b[name], name
        else:
            assert len(a[name]) == len(b[name]), name
    back = zarr.open_group(ours, mode="r")["a"]
    assert back.dtype == data.dtype.newbyteorder("=") and np.array_equal(back[...], data)
    assert np.array_equal(open_store(ours).read("a"), data)


def test_view_of_a_store_into_a_folder_and_a_missing_shard_named(tmp_path):
    from ingest.view import ViewError, _store_series, render

    rng = np.random.default_rng(0)
    arrays = {"t1w": (rng.random((5, 32, 32)).astype(np.float32), {"affine_lps": np.eye(4).tolist()}),
              "t2w": (rng.random((5, 32, 32)).astype(np.float32), {"affine_lps": np.eye(4).tolist()})}
    path = tmp_path / "sub-x.zarr"
    write_exam_store(path, arrays, GROUP)
    folder = tmp_path / "views"
    folder.mkdir()
    assert render(path, folder) == folder / "sub-x.png" and (folder / "sub-x.png").stat().st_size > 1000
    with pytest.raises(ViewError, match=r"views2: the view is a PNG"):
        render(path, tmp_path / "views2")
    assert not (tmp_path / "views2.png").exists()
    shard = [f for f in (path / "t2w").iterdir() if f.name.startswith("c")][0]
    shard.unlink()
    titles = [s[0] for s in _store_series(path)]
    assert titles == ["t1w", "t2w (NO DATA: shard missing)"]
    assert open_store(path).has_data("t1w") and not open_store(path).has_data("t2w")
    # its reads say so: zarr's fill value would be a blank that training takes for an image
    from ingest.store import MissingDataError

    for read in (lambda st: st.read("t2w"), lambda st: st.slice("t2w", 2)):
        with pytest.raises(MissingDataError, match=f"{shard}: the data file of 't2w' is missing"):
            read(open_store(path))


def test_view_windows_a_map_with_a_nan_from_its_finite_voxels(tmp_path, monkeypatch):
    import matplotlib.axes

    from ingest.view import render

    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32) * 1000
    vol[1, 0, 0] = np.nan   # one bad voxel of a float MRF map, in the slice the view shows
    path = tmp_path / "sub-x.zarr"
    write_exam_store(path, {"mrf_t1": (vol, {"affine_lps": np.eye(4).tolist()})}, GROUP)
    windows = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, img, **kw: windows.append((kw.get("vmin"), kw.get("vmax"))) or real(self, img, **kw))
    render(path, tmp_path / "v.png")
    (lo, hi), = windows
    assert np.isfinite(lo) and np.isfinite(hi) and hi - lo > 500


def test_view_of_a_prepared_store_names_its_panels(tmp_path):
    """A prepared store's `brain` is the computed mask, not the phantom's truth, and its input
    shows both MRF channels."""
    from ingest.view import _store_series, render

    rng = np.random.default_rng(0)
    eye = {"affine_lps": np.eye(4).tolist()}
    arrays = {"input": (rng.random((2, 4, 16, 16)).astype(np.float32), {**eye, "channels": ["mrf_t1", "mrf_t2"]}),
              "brain": (np.ones((4, 16, 16), np.uint8), eye), "truth_brain": (np.ones((4, 16, 16), np.uint8), eye),
              "t1w": (rng.random((4, 16, 16)).astype(np.float32), eye)}
    path = tmp_path / "sub-x.zarr"
    write_exam_store(path, arrays, GROUP)
    assert [s[0] for s in _store_series(path)] == ["brain", "input: mrf_t1", "input: mrf_t2", "t1w", "truth brain"]
    assert render(path, tmp_path / "v.png").stat().st_size > 1000

"""Ingest wall time against dcm2niix and against a bare pydicom read + decode of the same files.

    python benchmarks/bench_ingest.py [--data data] [--testdata ../shared/testdata/dicom] [--repeat 3]

Two inputs, in one script, each timed as the best of --repeat runs in this machine's state:

- demo phantom (`data/`, 14 exams, 98 series): `qsnet ingest` as a user runs it (whole process:
  scan, group, role recognition, read, de-identify, Zarr stores, manifest), with --jobs 1 and with
  one job per core; `dcm2niix -z n` converting the same tree to uncompressed NIfTI (one process,
  recursive; it is single-threaded); and a bare `pydicom.dcmread(...).pixel_array` of every file.
- vendor test series (`../shared/testdata/dicom`, 15 series: mosaics, enhanced, compressed):
  the ingest read + store path per series (`read_series` + `write_exam_store`) against dcm2niix
  per series folder and pydicom read + decode of the same files. These series carry no site
  roles, so the CLI would only list them as ignored; this times the work ingest does on them.

Ratios are to dcm2niix in the same run. Target: ingest within 1.5x of dcm2niix. The demo's
jobs-1 run is also split by phase, in process (`demo_phases_jobs1`), to show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(cmd) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}")


def dicom_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and "truth" not in p.parts and p.suffix not in (".json", ".txt", ".gz", ".nii", ".md", ".tsv"):
            out.append(p)
    return out


def pydicom_decode(files) -> None:
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018 - decoding is the point


def bench_demo(data: Path, repeat: int, tmp: Path) -> dict:
    qsnet = [sys.executable, "-m", "ingest", "ingest"]
    files = dicom_files(data)
    cores = os.cpu_count() or 1

    def ingest(jobs):
        def go():
            out = tmp / f"raw{jobs}"
            shutil.rmtree(out, ignore_errors=True)
            run(qsnet + [str(data), str(out), "--manifest", str(tmp / f"m{jobs}.csv"), "--jobs", str(jobs)])
        return go

    def d2n():
        out = tmp / "nii"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        run(["dcm2niix", "-z", "n", "-b", "n", "-r", "n", "-o", str(out), str(data)])

    row = {"files": len(files)}
    row["dcm2niix_s"] = best(d2n, repeat)
    row["pydicom_decode_s"] = best(lambda: pydicom_decode(files), repeat)
    row["ingest_jobs1_s"] = best(ingest(1), repeat)
    row[f"ingest_jobs{cores}_s"] = best(ingest(cores), repeat)
    row["ratio_ingest_jobs1_to_dcm2niix"] = row["ingest_jobs1_s"] / row["dcm2niix_s"]
    row[f"ratio_ingest_jobs{cores}_to_dcm2niix"] = row[f"ingest_jobs{cores}_s"] / row["dcm2niix_s"]
    return row


def phases(data: Path, tmp: Path) -> dict:
    """Where an in-process `ingest --jobs 1` of the demo tree spends its time (seconds, one
    warm run): the stage's functions are wrapped with a clock for the run."""
    import ingest.manifest
    import ingest.reader
    import ingest.service
    import ingest.store

    acc: dict[str, float] = {}
    wrapped = [(ingest.service, "plan_exams", "scan: walk and parse every header"),
               (ingest.reader, "read_series", "read series (pixels, geometry)"),
               (ingest.store, "write_exam_store", "write stores"),
               (ingest.store, "_write_shard", "  of which zstd + shard files"),
               (ingest.store, "_fsync_tree", "  of which fsync"),
               (ingest.manifest, "file_sha256", "sha256 of every input file")]
    originals = []
    for mod, name, label in wrapped:
        fn = getattr(mod, name)
        originals.append((mod, name, fn))

        def timed(*a, _fn=fn, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.perf_counter() - t0
        setattr(mod, name, timed)
    try:
        out = tmp / "phases"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        ingest.service.ingest(data, out / "raw", manifest=out / "m.csv", jobs=1)
        total = time.perf_counter() - t0
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    top = sum(v for k, v in acc.items() if not k.startswith(" "))
    return {"total_s": round(total, 3), **{k: round(v, 3) for k, v in acc.items()},
            "rest (grouping, truth maps, manifest)": round(total - top, 3)}


def bench_testdata(testdata: Path, repeat: int, tmp: Path) -> dict:
    from ingest.reader import read_series
    from ingest.store import write_exam_store

    folders = sorted(p for p in testdata.glob("*/*/In") if p.is_dir())
    all_files = [f for d in folders for f in sorted(d.iterdir()) if f.is_file()]

    def ingest_path():
        for i, d in enumerate(folders):
            vol, aff, meta = read_series(sorted(d.iterdir()))
            write_exam_store(tmp / "td" / f"s{i}.zarr", {"volume": (vol, {"affine_lps": aff.tolist()})},
                             {"site": "bench", "subject": f"s{i}"})

    def d2n():
        for i, d in enumerate(folders):
            out = tmp / "tdnii" / str(i)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), str(d)])

    row = {"series": len(folders), "files": len(all_files)}
    row["dcm2niix_s"] = best(d2n, repeat)
    row["pydicom_decode_s"] = best(lambda: pydicom_decode(all_files), repeat)
    row["ingest_read_store_s"] = best(ingest_path, repeat)
    row["ratio_ingest_to_dcm2niix"] = row["ingest_read_store_s"] / row["dcm2niix_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--testdata", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dicom")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
               "demo": bench_demo(args.data, args.repeat, Path(tmp)),
               "demo_phases_jobs1": phases(args.data, Path(tmp)),
               "testdata": bench_testdata(args.testdata, args.repeat, Path(tmp))}
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

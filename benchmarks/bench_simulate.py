"""Simulation time per exam, demo and paper size, and which part dominates.

    python benchmarks/bench_simulate.py [--sizes demo paper] [--out benchmarks/results/simulate.json]

One exam per site and size, in this process, after a warm-up exam of the same site and size so
one-off costs (template load, head build, MRF dictionary and EPG lookup tables: cached per
process) are reported apart from the per-exam cost a pool worker pays for every further exam.
Parts: anatomy (subject warp, veins, lesions, tissue maps, transmit field), one entry per
sequence kind (signal model, sampling with partial volume, k-space, noise, scaling), MRF
(fingerprint lookup, sampling, noise, dictionary matching) and DICOM writing.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from ingest.phantom.simulate import simulate_exam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["demo", "paper"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/simulate.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for site in ("site-A", "site-B"):
                t0 = time.perf_counter()
                simulate_exam(Path(tmp) / f"{size}-{site}-warm", site, 0, 0, size, None)
                first = time.perf_counter() - t0
                res = simulate_exam(Path(tmp) / f"{size}-{site}", site, 1, 0, size, None)
                t = res["timings"]
                parts = {k: round(v, 2) for k, v in sorted(t.items(), key=lambda kv: -kv[1]) if k != "total"}
                dominant = next(iter(parts))
                size_mb = sum(p.stat().st_size for p in (Path(tmp) / f"{size}-{site}").rglob("*") if p.is_file()) / 1e6
                row = {"size": size, "site": site, "first_exam_s": round(first, 2), "exam_s": round(t["total"], 2),
                       "dominant": dominant, "dominant_share": round(t[dominant] / t["total"], 3),
                       "parts_s": parts, "exam_mb": round(size_mb, 1)}
                rows.append(row)
                print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{platform.node()} {platform.processor()} "
                                    f"{__import__('os').cpu_count()} cores",
                                    "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

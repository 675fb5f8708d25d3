"""CPU torch work from one thread against the same work after a second thread has run torch too.

    python benchmarks/bench_torch_threads.py [--rounds 4] [--threads 2] [--width 8]

Why it exists: the PyTorch CPU wheel runs its parallel regions on GNU OpenMP, which keeps one
team of worker threads per calling thread. Once a second thread of a process has run parallel
torch work, there are more OpenMP threads than cores on a small machine, and every forward in
the process, on either thread, gets slower. The Synthesizer replica therefore runs every torch
call on one thread of its own (serve/app.py), and a training worker runs its loop on one thread.

Each case runs in a fresh process (a team, once made, stays for the process's life), cases
interleaved round by round so the VM's drift hits all of them alike:

- ``main``: forwards on the main thread only.
- ``worker``: forwards on one other thread only (how the Synthesizer runs them).
- ``two``: forwards on one thread, after a second thread has run a few forwards too (what a
  shared thread pool, or loads on the event loop's thread, lead to).

Model: QS-Net at --width, 13 slices of 64 x 64 per forward (the demo's input, about the batch
the Synthesizer forms), ``torch.inference_mode``, --threads torch threads; also one training
step of batch 4. Median of --reps after a warm-up. Writes benchmarks/results/torch_threads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(case: str, threads: int, width: int, reps: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    sys.path.insert(0, str(ROOT))
    from train.loop import Trainer
    from train.models import build

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build("qsnet", width=width)
    g = model.generator.eval()
    x = torch.randn(13, 2, 64, 64)
    tr = Trainer(build("qsnet", width=width))
    batch = {"input": torch.randn(4, 2, 64, 64), "target": torch.randn(4, 1, 64, 64)}

    def forwards(n: int) -> float:
        with torch.inference_mode():
            g(x)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                g(x)
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    def steps(n: int) -> float:
        tr.train_step(batch)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            tr.train_step(batch)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    one, other = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    if case == "main":
        return {"forward_ms": forwards(reps), "step_ms": steps(reps // 4)}
    if case == "two":
        other.submit(forwards, 3).result()
        other.submit(steps, 1).result()
    return {"forward_ms": one.submit(forwards, reps).result(), "step_ms": one.submit(steps, reps // 4).result()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "torch_threads.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.width, args.reps)))
        return
    cases = ("main", "worker", "two")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for r in range(args.rounds):
        for c in cases:
            out = subprocess.run([sys.executable, __file__, "--child", c, "--threads", str(args.threads),
                                  "--width", str(args.width), "--reps", str(args.reps)],
                                 capture_output=True, text=True, check=True, env=env)
            runs[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(r, {c: {k: round(v, 1) for k, v in runs[c][-1].items()} for c in cases}, flush=True)
    summary = {c: {k: round(statistics.median(run[k] for run in runs[c]), 2) for k in ("forward_ms", "step_ms")}
               for c in cases}
    # per round, so the VM's drift between rounds cancels
    ratio = lambda a, b, k: statistics.median(x[k] / y[k] for x, y in zip(runs[a], runs[b]))  # noqa: E731
    res = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "torch_threads": args.threads,
           "width": args.width, "rounds": args.rounds, "median": summary,
           "two_over_worker": {k: round(ratio("two", "worker", k), 3) for k in ("forward_ms", "step_ms")},
           "worker_over_main": {k: round(ratio("worker", "main", k), 3) for k in ("forward_ms", "step_ms")},
           "runs": runs}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Job submission overhead: a demo pretrain under `ray job submit` against the same command run directly.

    python benchmarks/bench_submit.py [--repeats 2] [--epochs 12]

In one script, on this machine, the same stage command, `qsnet pretrain` of one demo-sized
QS-Net model (the demo profile's train section: width 8, batch 8, lr 1e-2, `--epochs` epochs,
one Ray Train worker) on synthetic prepared stores (64 x 64; site A 4 training and 1
validation exam of 16 slices), is run two ways, alternately, each time with a fresh run storage
(nothing resumed):

- direct: `qsnet pretrain ...` as a subprocess; it starts its own private local Ray;
- submitted: `ray job submit --working-dir . --runtime-env platform/runtime_env.yaml -- qsnet
  pretrain ...` to a local head started once (`ray start --head`, loopback, 2 CPUs), timed
  from the submit command's start to its exit (it follows the job to the end), which includes
  packaging and uploading the working directory, the job supervisor, and the driver joining
  the cluster.

Overhead = submitted / direct, per pair, median over the pairs. The head's start-up (once per
cluster) is timed apart. Writes benchmarks/results/submit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tune import stores  # noqa: E402 - the same synthetic site-A stores as the search benchmark
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return dt, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    import yaml

    demo = yaml.safe_load((ROOT / "params.yaml").read_text())["demo"]["train"]
    train = {k: demo[k] for k in ("width", "batch_size", "lr", "betas", "plateau_factor", "plateau_after_epoch",
                                  "ds_weights", "adv_weight", "checkpoint_every", "augment")}
    train.update(archs=["qsnet"], contrasts=["t1w"], epochs=args.epochs, num_workers=1, parallel_runs=1,
                 use_gpu=False, max_failures=1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    port = None
    ray_tmp = Path(tempfile.gettempdir()) / f"qsnet-ray-bench-{os.getpid()}"  # short: Ray's socket paths
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray = str(BIN / "ray")
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                 "epochs": args.epochs, "pairs": []}
    try:
        prepared = stores(tmp)
        work = tmp / "work"
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump({"profile": "b", "seed": 0, "b": {"train": train}}))
        port, dash = free_port(), free_port()
        t0 = time.perf_counter()
        timed([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
               f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={ray_tmp}",
               "--disable-usage-stats"], env, work)
        address = f"http://127.0.0.1:{dash}"
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        while True:  # the head answers before its job agent is up: wait for an accepted no-op job
            try:
                job = client.submit_job(entrypoint="true")
                break
            except RuntimeError:
                time.sleep(1)
        while client.get_job_status(job).value not in ("SUCCEEDED", "FAILED"):
            time.sleep(0.5)
        out["head_start_s"] = round(time.perf_counter() - t0, 1)
        for i in range(args.repeats):
            pair = {}
            for how in ("direct", "submitted"):
                stage = ["pretrain", "--stores", str(prepared), "--models", str(tmp / f"m-{how}-{i}"),
                         "--reports", str(tmp / f"r-{how}-{i}"), "--storage", str(tmp / f"runs-{how}-{i}")]
                if how == "direct":
                    dt, _ = timed([str(BIN / "qsnet"), *stage], env, work)
                else:
                    dt, res = timed([ray, "job", "submit", f"--address={address}", "--working-dir=.",
                                     f"--runtime-env={ROOT / 'platform' / 'runtime_env.yaml'}", "--", "qsnet", *stage],
                                    env, work)
                    assert "succeeded" in res.stdout.lower(), res.stdout[-2000:]
                card = json.loads((tmp / f"m-{how}-{i}" / "pretrain" / "qsnet" / "t1w" / "card.json").read_text())
                pair[how] = {"wall_s": round(dt, 1), "val_l1": card["validation"]["val_l1"]}
                print(f"{how:>9} #{i + 1}: {dt:6.1f} s  (val L1 {card['validation']['val_l1']:.4f})", flush=True)
            pair["ratio"] = round(pair["submitted"]["wall_s"] / pair["direct"]["wall_s"], 2)
            out["pairs"].append(pair)
        out["ratio_median"] = round(statistics.median(p["ratio"] for p in out["pairs"]), 2)
        out["overhead_s_median"] = round(statistics.median(p["submitted"]["wall_s"] - p["direct"]["wall_s"]
                                                           for p in out["pairs"]), 1)
    finally:
        from test_platform_cluster import stop_nodes  # this cluster only, not every Ray on the machine

        stop_nodes([ray_tmp], gcs_port=port)
        shutil.rmtree(tmp, ignore_errors=True)
    res_file = ROOT / "benchmarks" / "results" / "submit.json"
    res_file.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Where the CPU goes during a 1-worker Ray Train run on this machine: the training worker
against Ray's own processes (raylet, GCS, the run's controller and Train V2's helper actors).

    python benchmarks/bench_ray_cpu.py [--epochs 10]

The run is `bench_train.py`'s Ray case: QS-Net width 8, 4 synthetic stores at 64 x 64, batch 4,
augmented, 2 threads. psutil samples every process's CPU time once a second. The window runs
from the start of epoch 2 to the start of the last epoch, and each process's CPU-seconds in it
are reported as a share of the machine's cores. Writes benchmarks/results/ray_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KINDS = ("RayTrainWorker", "TrainController", "raylet", "gcs_server", "log_monitor", "DashboardAgent", "dashboard",
         "PlacementGroupCleaner", "PreemptionWatcher", "SynchronizationActor", "DatasetManager",
         "AutoscalingCoordinator", "RuntimeEnvAgent")


def kind(p) -> str | None:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - the process ended between listing and reading
        return None
    if p.pid == os.getpid():
        return "driver (this script)"
    return next((k for k in KINDS if k in cmd), "other Ray process" if "ray" in cmd else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_cpu.json")
    args = ap.parse_args()

    import psutil
    import ray

    from test_train_data import fake_prepared
    from train.distributed import run_training

    tmp = Path(tempfile.mkdtemp())
    stores = [str(p) for p in fake_prepared(tmp / "s", n=4, z=16, size=64, split="train")]
    val = [str(p) for p in fake_prepared(tmp / "v", n=1, z=16, size=64, split="val", prefix="v")]
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = {"width": 8, "epochs": args.epochs, "batch_size": 4, "lr": 2e-4, "betas": [0.5, 0.999],
              "plateau_factor": 0.9, "plateau_after_epoch": 1, "ds_weights": [0.5, 0.25, 0.125, 0.0625],
              "adv_weight": 0.01, "augment": True, "checkpoint_every": 5, "loader_workers": 0, "amp": False,
              "seed": 0, "name": f"cpu-{time.time_ns()}", "storage": str(tmp / "runs"), "torch_threads": cores,
              "runs": [{"name": "m", "arch": "qsnet", "contrast": "t1w", "inputs": "mrf", "train_stores": stores,
                        "val_stores": val}]}
    res: dict = {}
    t = threading.Thread(target=lambda: res.update(done=run_training(config, 1, False, 0)))
    t.start()
    samples = []
    while t.is_alive():
        snap = {}
        for p in psutil.process_iter():
            k = kind(p)
            if k is None:
                continue
            try:
                ct = p.cpu_times()
                snap[p.pid] = (k, ct.user + ct.system)
            except psutil.Error:
                pass
        samples.append((time.time(), snap))
        time.sleep(1.0)
    ray.shutdown()
    hist = res["done"]["m"]["history"]
    start, end = hist[1]["wall_start"], hist[-1]["wall_start"]
    a = min(samples, key=lambda s: abs(s[0] - start))
    b = min(samples, key=lambda s: abs(s[0] - end))
    wall = b[0] - a[0]
    use: dict[str, float] = {}
    for pid, (k, c) in b[1].items():
        use[k] = use.get(k, 0.0) + c - (a[1][pid][1] if pid in a[1] else 0.0)
    share = {k: round(v / (cores * wall), 4) for k, v in sorted(use.items(), key=lambda kv: -kv[1])}
    out = {"date": time.strftime("%Y-%m-%d"), "cores": cores, "window_s": round(wall, 1),
           "cpu_share_of_machine": share,
           "ray_processes_share": round(sum(v for k, v in share.items() if k not in ("RayTrainWorker",)), 4),
           "epoch_start_to_start_s": [round(y["wall_start"] - x["wall_start"], 2) for x, y in zip(hist, hist[1:])],
           "loop_epoch_s": [h["epoch_s"] for h in hist]}
    print(json.dumps(out, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

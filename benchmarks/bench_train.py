"""Ray Train's overhead against a plain PyTorch loop, and QS-Net training throughput on a GPU.

    python benchmarks/bench_train.py                 # CPU: plain loop vs Ray Train, 1 and 2 workers
    python benchmarks/bench_train.py --gpu           # GPU: the core step alone, 256 x 256, bf16

CPU part, in one script, over the same prepared-like data (synthetic stores, 64 x 64) and the
same model (QS-Net, width --width):

- plain: `train.loop.Trainer` over a DataLoader, --epochs epochs, timed per epoch, before and
  after the Ray runs (the reference is the mean of the two medians);
- Ray: `train.distributed.run_training` with 1 worker (the stage's own code path). Start-up
  (`ray.init` and the run until its first epoch) is reported separately.
- Ray, 2 workers on the 2 cores: the same, DDP; scaling = epoch time(1) / epoch time(2).
- Ray, 1 worker, a checkpoint every epoch: what each ``ray.train.report`` with a checkpoint costs.

Ray's epoch times are wall times between the starts of consecutive epochs (validation,
checkpoint and report included).

Target: Ray's per-epoch overhead at most 10 %.

GPU part: the step of `train.loop.Trainer` (generator + discriminator, deep supervision,
bf16 autocast, channels_last) at 256 x 256 for several batch sizes, eager and with
torch.compile. Model FLOPs are counted with torch's FlopCounterMode; the fraction is of
--peak-tflops (790: the bf16 matrix rate measured on the H200 here). Target: 35 % or more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def cpu_part(args) -> dict:
    import ray

    from test_train_data import fake_prepared
    from train.data import SliceDataset
    from train.distributed import run_training
    from train.loop import Trainer
    from train.models import build

    tmp = Path(tempfile.mkdtemp())
    stores = [str(p) for p in fake_prepared(tmp / "s", n=4, z=16, size=64, split="train")]
    val = [str(p) for p in fake_prepared(tmp / "v", n=1, z=16, size=64, split="val", prefix="v")]
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

    def plain_loop() -> list[float]:
        """plain PyTorch: the same Trainer, data and batch size as the Ray loop"""
        torch.manual_seed(0)
        tr = Trainer(build("qsnet", width=args.width))
        ds = SliceDataset(stores, augment=True, seed=0)
        dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
        vdl = torch.utils.data.DataLoader(SliceDataset(val), batch_size=4)
        times = []
        for e in range(args.epochs):
            ds.set_epoch(e)
            t0 = time.perf_counter()
            for b in dl:
                tr.train_step(b)
            tr.val_sums(vdl)
            times.append(time.perf_counter() - t0)
        return times

    # The plain loop runs before and after the Ray runs: a VM's speed drifts by 20-30 % between
    # minutes here, and the reference is the mean of both. A short Ray run first (not timed)
    # lets Ray's own processes finish starting, which otherwise slows the first timed run.
    out = {"torch_threads": threads, "plain_epoch_s": plain_loop()}
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    out["ray_init_s"] = round(time.perf_counter() - t0, 2)
    for workers, every in ((1, 0), (1, args.checkpoint_every), (2, args.checkpoint_every), (1, 1)):
        key = f"ray{workers}" if every == args.checkpoint_every else f"ray{workers}_ckpt_every_epoch"
        config = {"width": args.width, "epochs": args.epochs if every else 2, "batch_size": 4, "lr": 2e-4,
                  "betas": [0.5, 0.999],
                  "plateau_factor": 0.9, "plateau_after_epoch": 1, "ds_weights": [0.5, 0.25, 0.125, 0.0625],
                  "adv_weight": 0.01, "augment": True, "checkpoint_every": every or 1, "loader_workers": 0,
                  "amp": False,
                  "seed": 0, "name": f"bench-{workers}-{time.time_ns()}", "storage": str(tmp / "runs"),
                  "torch_threads": max(1, threads // workers),
                  "runs": [{"name": "m", "arch": "qsnet", "contrast": "t1w", "inputs": "mrf",
                            "train_stores": stores, "val_stores": val}]}
        t0 = time.perf_counter()
        done = run_training(config, workers, False, 0)
        wall = time.perf_counter() - t0
        if not every:
            out["ray_warmup_run_s"] = round(wall, 2)
            continue
        hist = done["m"]["history"]
        # an epoch's wall time on Ray runs from its start to the next epoch's start, so it holds
        # the validation, the checkpoint and the wait in ray.train.report (the loop's own
        # epoch_s clock does not: a first version of this benchmark used it and missed ~1 s
        # per epoch of report wait)
        starts = [h["wall_start"] for h in hist]
        epochs = [b - a for a, b in zip(starts, starts[1:])]
        out[f"{key}_epoch_s"] = [round(e, 3) for e in epochs]
        out[f"{key}_run_wall_s"] = round(wall, 2)
        out[f"{key}_startup_and_teardown_s"] = round(wall - (starts[-1] - starts[0]) - hist[-1]["epoch_s"], 2)
    ray.shutdown()
    out["plain_after_epoch_s"] = plain_loop()
    # the first epoch includes one-time costs (allocator warm-up, first store opens): compare the rest
    med = lambda v: sorted(v[1:])[len(v[1:]) // 2]  # noqa: E731
    plain = (med(out["plain_epoch_s"]) + med(out["plain_after_epoch_s"])) / 2
    out["plain_reference_epoch_s"] = round(plain, 3)
    out["ray1_overhead_per_epoch"] = round(med(out["ray1_epoch_s"]) / plain - 1, 3)
    out["ray1_ckpt_every_epoch_overhead_per_epoch"] = round(med(out["ray1_ckpt_every_epoch_epoch_s"]) / plain - 1, 3)
    out["scaling_1_to_2_workers"] = round(med(out["ray1_epoch_s"]) / med(out["ray2_epoch_s"]), 3)
    out["target_met"] = out["ray1_overhead_per_epoch"] <= 0.10
    return out


def gpu_part(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from train.loop import Trainer
    from train.models import build

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    for compile_ in (False, True):
        for bs in args.batches:
            torch.manual_seed(0)
            tr = Trainer(build("qsnet", width=32), device=dev, amp=True)
            if compile_:
                tr.g = torch.compile(tr.g)
                tr.d = torch.compile(tr.d)
            x = torch.rand(bs, 2, 256, 256, device=dev)
            b = {"input": x, "target": x[:, :1].clone()}
            for _ in range(3):
                tr.train_step(b)
            with FlopCounterMode(display=False) as fc:
                tr.train_step(b)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step(b)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.steps
            tf = fc.get_total_flops() / dt / 1e12
            rows.append({"compile": compile_, "batch": bs, "step_ms": round(dt * 1e3, 2),
                         "slices_per_s": round(bs / dt, 1), "achieved_tflops": round(tf, 1),
                         "fraction_of_peak": round(tf / args.peak_tflops, 3)})
            print(rows[-1], flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
            "best_fraction": max(r["fraction_of_peak"] for r in rows),
            "target_met": max(r["fraction_of_peak"] for r in rows) >= 0.35}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=5, help="as the demo profile")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the plain loop and of a lone Ray worker (default: every core); "
                         "with 1, Ray's own processes have a core to themselves")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    res.update(gpu_part(args) if args.gpu else cpu_part(args))
    print(json.dumps(res, indent=1))
    out = args.out or Path(f"benchmarks/results/train_{'gpu' if args.gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

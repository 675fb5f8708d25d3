"""Loader throughput against what a QS-Net-sized training step consumes, and prepare time per exam.

    python benchmarks/bench_loader.py [--raw stores/raw] [--exams 2] [--steps 6]
    python benchmarks/bench_loader.py --step-only --device cuda   # the training step alone, on a GPU

In one script, on this machine:

1. prepare: `ingest.prepare.prepare` on --exams raw stores at 256 x 256 (the paper size), one
   job, with the share of the time spent in elastix (from the stage's own report);
2. loader: `train.data.SliceDataset` over those prepared stores, augmented (rotation + elastic
   + noise), 2-channel MRF input + 1 target, in a `torch.utils.data.DataLoader` with 2 worker
   processes, batch 1: slices per second after the first batch;
3. training step: one QS-Net-sized step at 256 x 256, batch 1 (paper): MONAI DynUNet (6 levels,
   residual blocks, instance norm, leaky ReLU, deep supervision) as the generator, MONAI
   PatchDiscriminator, L1 + deep-supervision L1 + least-squares adversarial loss, Adam on
   both; steps per second after two warm-up steps. On CUDA: bf16 autocast, channels_last, and
   batch sizes 1 and 16.

Target: loader >= 2x the slices per second the training step consumes on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def qsnet_sized(device):
    """The paper-sized QS-Net: its DynUNet itself (heads stacked on dim 1) and its discriminator."""
    from train.models import build

    m = build("qsnet", width=32)
    return m.generator.net.to(device), m.discriminator.to(device)


def train_step_rate(device: str, batch: int, steps: int, size: int = 256) -> dict:
    dev = torch.device(device)
    g, d = qsnet_sized(dev)
    cuda = dev.type == "cuda"
    if cuda:
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    og = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    x = torch.rand(batch, 2, size, size, device=dev)
    y = torch.rand(batch, 1, size, size, device=dev)
    if cuda:
        x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    l1 = torch.nn.L1Loss()
    mse = torch.nn.MSELoss()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            outs = g(x)                                     # (B, 1 + 4 heads, 1, H, W) in training mode
            fake = outs[:, 0]
            loss_g = l1(fake, y) + sum(0.5 ** k * l1(outs[:, k], y) for k in range(1, outs.shape[1]))
            pred_fake = d(torch.cat([x, fake], 1))[-1]
            loss_g = loss_g + 0.01 * mse(pred_fake, torch.ones_like(pred_fake))
        og.zero_grad(set_to_none=True)
        loss_g.backward()
        og.step()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            pr = d(torch.cat([x, y], 1))[-1]
            pf = d(torch.cat([x, fake.detach()], 1))[-1]
            loss_d = 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
        od.zero_grad(set_to_none=True)
        loss_d.backward()
        od.step()

    for _ in range(2):
        step()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "batch": batch, "step_s": round(dt, 4), "slices_per_s": round(batch / dt, 2),
            "model_tflop_per_step": round(flops / 1e12, 4), "achieved_tflops": round(flops / dt / 1e12, 2),
            "generator_params_M": round(sum(p.numel() for p in g.parameters()) / 1e6, 2)}


def loader_rate(stores: list[Path], seconds: float, workers: int = 2) -> dict:
    from train.data import SliceDataset

    ds = SliceDataset(stores, contrasts=["t1w"], augment=True, seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=True, num_workers=workers,
                                     persistent_workers=True, generator=torch.Generator().manual_seed(0))
    n, t0, first = 0, None, None
    while True:
        for b in dl:
            if t0 is None:
                t0, first = time.perf_counter(), b["input"].shape
                continue
            n += b["input"].shape[0]
            if time.perf_counter() - t0 > seconds:
                dt = time.perf_counter() - t0
                return {"workers": workers, "slices": n, "seconds": round(dt, 2),
                        "slices_per_s": round(n / dt, 2), "shape": list(first)}


def prepare_256(raw: Path, exams: int, tmp: Path) -> tuple[list[Path], dict]:
    import shutil

    from ingest.prepare import prepare

    src = tmp / "raw"
    picked = sorted(raw.glob("site-A/*.zarr"))[: (exams + 1) // 2] + sorted(raw.glob("site-B/*.zarr"))[: exams // 2]
    for p in picked:
        shutil.copytree(p, src / p.parent.name / p.name)
    t0 = time.perf_counter()
    rep = prepare(src, tmp / "prepared", tmp / "prepare.json", {"prepare": {"image_size": 256}, "seed": 0,
                                                               "profile": "bench"}, jobs=1)
    wall = time.perf_counter() - t0
    s = rep["summary"]
    per = [e for e in rep["exams"].values() if e.get("status") == "prepared"]
    return sorted((tmp / "prepared").glob("*/*.zarr")), {
        "exams": len(per), "wall_s": round(wall, 2), "seconds_per_exam": s["seconds_per_exam"],
        "elastix_share": s["elastix_share"],
        "note": "the first exam of a process also pays ITK's one-time module load inside elastix"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=Path("stores/raw"))
    ap.add_argument("--exams", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--loader-seconds", type=float, default=20.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step-only", action="store_true", help="Only the training step (e.g. on a GPU machine).")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/loader.json"))
    args = ap.parse_args()
    res = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "torch": torch.__version__}
    if args.step_only:
        res["train_step"] = [train_step_rate(args.device, b, args.steps) for b in ((1, 16) if args.device == "cuda" else (1,))]
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as tmp:
            stores, res["prepare_256"] = prepare_256(args.raw, args.exams, Path(tmp))
            res["loader"] = loader_rate(stores, args.loader_seconds)
        res["train_step"] = [train_step_rate(args.device, 1, args.steps)]
        need = res["train_step"][0]["slices_per_s"]
        res["loader_over_training"] = round(res["loader"]["slices_per_s"] / need, 2)
        res["target_met"] = res["loader_over_training"] >= 2.0
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What each training lever buys QS-Net's site-B SSIM on the demo phantom (a study, not a timing).

    python benchmarks/demo_levers.py                                   # the demo recipe, 3 seeds
    python benchmarks/demo_levers.py --width 16                        # one lever at a time
    python benchmarks/demo_levers.py --depth 4 --contrasts swi --seeds 0
    python benchmarks/demo_levers.py --epochs 18
    python benchmarks/demo_levers.py --no-norm-affine                  # the norms before 2026-12-05
    python benchmarks/demo_levers.py --more-site-b 14                  # 14 site-B exams, not 6

The evaluation's SSIM bar (0.85 for every contrast) is missed on the demo for T2w, T2-FLAIR and
SWI. This script says how far the cheap levers move those numbers, without Ray and without
`dvc repro`: for each contrast and seed it pretrains QS-Net on site A's training split and
finetunes it (encoder frozen) on site B's finetune split, exactly as the stages' `Trainer` does
(same losses, optimiser, EMA and best-by-validation weights), then scores the best weights on
site B's test exams with the evaluation's own metric (`train.evaluate.service`).

`--more-site-b N` simulates N site-B exams (the demo phantom has 6; the first 6 of N are those
same exams), ingests and prepares them into a temporary folder, and finetunes on every one of
them that is not a test or validation exam of `--stores`; the test exams stay the same.

Needs the demo's prepared stores (`dvc repro prepare`). Writes benchmarks/results/demo_levers.json
(one entry per invocation, appended).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def more_site_b(n: int, work: Path) -> Path:
    """Prepared stores of ``n`` site-B demo exams, simulated, ingested and prepared under ``work``."""
    from ingest.phantom import geometry, simulate

    # a study-only override: the demo size's site-B cohort, for this process
    geometry.SIZES["demo"]["subjects"]["site-B"] = n
    simulate.simulate(work / "data", size="demo", sites=["site-B"])
    qsnet = [sys.executable, "-m", "ingest"]
    subprocess.run(qsnet + ["ingest", str(work / "data"), str(work / "raw")], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(qsnet + ["prepare", str(work / "raw"), str(work / "prepared"), "--report",
                            str(work / "prepare.json"), "--figures", str(work / "figures"),
                            "--params", str(ROOT / "params.yaml")], check=True, stdout=subprocess.DEVNULL)
    return work / "prepared"


def fit(arch: str, contrast: str, seed: int, train, val, args, init=None, epochs: int = 1):
    """Best-by-validation generator weights of one run (the stages' loop, without Ray)."""
    from train.data import SliceDataset
    from train.loop import Losses, Trainer
    from train.models import build

    torch.manual_seed(seed)
    model = build(arch, in_channels=2, out_channels=1, width=args.width, depth=args.depth, norm_affine=args.norm_affine)
    tr = Trainer(model, lr=args.lr, betas=(0.5, 0.999), losses=Losses(tuple(args.ds_weights), args.adv_weight,
                                                                         args.ssim_weight),
                 plateau_factor=0.9, plateau_after_epoch=10, ema_decay=args.ema_decay,
                 freeze_encoder=init is not None and arch in ("qsnet", "resunet"))
    if init is not None:
        tr.g.load_state_dict(init)
    ds = SliceDataset(train, contrasts=[contrast], inputs="mrf", seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    vloader = torch.utils.data.DataLoader(SliceDataset(val, contrasts=[contrast], inputs="mrf"),
                                          batch_size=args.batch_size)
    best = (math.inf, None, 0)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            tr.train_step(batch)
        s, n = tr.val_sums(vloader)
        tr.end_epoch(s / n)
        if s / n < best[0]:
            best = (s / n, copy.deepcopy(tr.eval_generator().state_dict()), epoch + 1)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default=str(ROOT / "stores" / "prepared"))
    ap.add_argument("--contrasts", default="t2w,t2flair,swi")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arch", default="qsnet")
    ap.add_argument("--width", type=int, default=12, help="demo: 12 (8 before 2026-12-05)")
    ap.add_argument("--depth", type=int, default=6, help="U-Net levels (paper: 6; at 64 x 64 the bottleneck is 2 x 2)")
    ap.add_argument("--epochs", type=int, default=9, help="pretrain epochs (demo: 9)")
    ap.add_argument("--finetune-epochs", type=int, default=30, help="demo: 30")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-norm-affine", dest="norm_affine", action="store_false",
                    help="QS-Net's instance norms without a learnt scale and shift (before 2026-12-05)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--adv-weight", type=float, default=0.01)
    ap.add_argument("--ssim-weight", type=float, default=0.0, help="(1 - SSIM) in the generator loss (paper: 0)")
    ap.add_argument("--ds-weights", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.0625])
    ap.add_argument("--ema-decay", type=float, default=0.9)
    ap.add_argument("--more-site-b", type=int, default=0, help="simulate this many site-B exams (demo: 6)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_levers.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from train.data import find_stores
    from train.evaluate.service import _Exam, _score, predict
    from train.models import build

    stores = Path(args.stores)
    a_train, a_val = find_stores(stores, ["train"], ["site-A"]), find_stores(stores, ["val"], ["site-A"])
    b_train, b_val = find_stores(stores, ["finetune"], ["site-B"]), find_stores(stores, ["val"], ["site-B"])
    b_test = find_stores(stores, ["test"], ["site-B"])
    tmp = None
    if args.more_site_b:
        tmp = tempfile.TemporaryDirectory(prefix="qsnet-levers-")
        more = more_site_b(args.more_site_b, Path(tmp.name))
        held = {Path(p).name for p in b_test + b_val}
        b_train = sorted(str(p) for p in (more / "site-B").glob("*.zarr") if p.name not in held)
    exams = [_Exam(Path(p)) for p in b_test]
    cfg = {"data_range": 4095.0, "k1": 0.01, "k2": 0.03}
    t0 = time.perf_counter()
    ssim: dict[str, list[float]] = {}
    others: dict[str, dict[str, list[float]]] = {}   # MAE and PSNR: an SSIM lever may cost them
    for contrast in args.contrasts.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            _, pre, _ = fit(args.arch, contrast, seed, a_train, a_val, args, epochs=args.epochs)
            _, state, _ = fit(args.arch, contrast, seed, b_train, b_val, args, init=pre, epochs=args.finetune_epochs)
            g = build(args.arch, in_channels=2, out_channels=1, width=args.width, depth=args.depth,
                      norm_affine=args.norm_affine).generator
            g.load_state_dict(state)
            g.eval()
            scores = [_score(predict(g, ex.input("mrf")), ex, contrast, cfg)[0] for ex in exams]
            s = float(np.mean([m["ssim"] for m in scores]))
            ssim.setdefault(contrast, []).append(round(s, 4))
            for k in ("mae", "psnr"):
                others.setdefault(contrast, {}).setdefault(k, []).append(round(float(np.mean([m[k] for m in scores])), 2))
            print(f"{contrast} seed {seed}: site-B test SSIM {s:.4f}, MAE {others[contrast]['mae'][-1]:.1f}, "
                  f"PSNR {others[contrast]['psnr'][-1]:.2f}", flush=True)
    entry = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
             "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "stores", "threads")},
             "site_b_exams": {"finetune": len(b_train), "val": len(b_val), "test": len(b_test)},
             "ssim": {c: {"mean": round(float(np.mean(v)), 4), "seeds": v} for c, v in ssim.items()},
             **{k: {c: {"mean": round(float(np.mean(o[k])), 2), "seeds": o[k]} for c, o in others.items()}
                for k in ("mae", "psnr")},
             "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(entry["ssim"]))
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(doc + [entry], indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Evaluation time per subject and contrast, and the paper profile's full evaluation estimated from it.

    python benchmarks/bench_evaluate.py                       # the demo registry and stores, if built
    python benchmarks/bench_evaluate.py --models models --stores stores/prepared

Two parts, one script:

1. The real thing: `train.evaluate.service.evaluate` over the registry and prepared stores
   (`dvc repro finetune` builds them), timed whole and split into model inference and metrics;
   per (model, subject, contrast) evaluation.
2. Paper size: one (model, subject, contrast) evaluation at 256 x 256 with a paper-width QS-Net
   (width 32) and each baseline, on a synthetic exam of --slices slices (inference of every
   slice, then MAE / PSNR / SSIM in the brain and the lesion regions), against the same at the
   demo's 64 x 64: the ratio scales part 1 to the paper's study (12 site-A and 9 site-B test
   subjects; 4 architectures x 5 contrasts pretrained and finetuned, 4 x 5 with mri inputs,
   5 from scratch, 5 physics contrasts per subject).

Writes benchmarks/results/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_pair(arch: str, size: int, width: int, slices: int, repeats: int = 3) -> float:
    """Seconds for one model on one subject and contrast: inference of every slice + the metrics."""
    from train.evaluate.metrics import masked_metrics, region_metrics, to_12bit
    from train.evaluate.service import predict
    from train.models import build

    torch.manual_seed(0)
    model = build(arch, width=width).generator.eval()
    rng = np.random.default_rng(0)
    x = rng.random((slices, 2, size, size), dtype=np.float32)
    truth = to_12bit(rng.random((slices, size, size)))
    yy, xx = np.mgrid[:size, :size] - size / 2
    brain = np.broadcast_to(np.hypot(yy, xx) < 0.4 * size, truth.shape).copy()
    regions = {"tumour": brain & (np.hypot(yy - size / 8, xx) < size / 16)}
    predict(model, x[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = to_12bit(predict(model, x) * brain)
        masked_metrics(p, truth, brain)
        region_metrics(p, truth, brain, regions)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--stores", type=Path, default=ROOT / "stores" / "prepared")
    ap.add_argument("--slices", type=int, default=30, help="slices per exam at paper size (MRF, 5 mm)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluate.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "torch": torch.__version__}

    if any(args.models.glob("*/*/*/card.json")) and args.stores.is_dir():
        from train.evaluate.service import evaluate

        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            r = evaluate(args.models, args.stores, Path(out), {})
            wall = time.perf_counter() - t0
        t = r["timing"]
        res["demo"] = {"wall_s": round(wall, 2), "evaluations": t["pairs"], "predict_s": round(t["predict_s"], 2),
                       "metrics_s": round(t["metrics_s"], 2),
                       "per_evaluation_ms": round(1000 * t["per_model_subject_contrast_s"], 1),
                       "subject_contrasts": t["subject_contrasts"],
                       "per_subject_contrast_s": round(wall / max(1, t["subject_contrasts"]), 3)}
        print(f"demo: {t['pairs']} evaluations (model x subject x contrast) in {wall:.1f} s wall, "
              f"{res['demo']['per_evaluation_ms']} ms each (inference {t['predict_s']:.1f} s, "
              f"metrics {t['metrics_s']:.1f} s), {res['demo']['per_subject_contrast_s']} s per subject and contrast")
    else:
        print(f"no registry under {args.models} or no stores under {args.stores}: part 1 skipped "
              "(run `dvc repro finetune` first)")

    pairs = {}
    for arch in ("qsnet", "resunet", "cgan", "swin"):
        demo = one_pair(arch, 64, 8, 18)
        paper = one_pair(arch, 256, 32, args.slices, repeats=1)
        pairs[arch] = {"demo_64_s": round(demo, 4), "paper_256_s": round(paper, 3), "ratio": round(paper / demo, 1)}
        print(f"{arch}: one evaluation {demo * 1000:.0f} ms at 64 x 64 (width 8, 18 slices), "
              f"{paper:.2f} s at 256 x 256 (width 32, {args.slices} slices): x{paper / demo:.0f}")
    res["per_evaluation"] = pairs
    # the paper's study: per test subject, the models that score it (see the service's routing)
    site_a, site_b = 12, 9
    per_a = 4 * 5  # pretrained mrf models
    per_b = 4 * 5 + 5 + 4 * 5 + 4 * 5  # finetuned, scratch, generalisation mrf and mri
    arch_mean = float(np.mean([p["paper_256_s"] for p in pairs.values()]))
    est = (site_a * per_a + site_b * per_b) * arch_mean
    res["paper_estimate"] = {"evaluations": site_a * per_a + site_b * per_b, "mean_evaluation_s": round(arch_mean, 3),
                             "total_min": round(est / 60, 1), "physics_not_counted": True}
    print(f"paper profile: {site_a * per_a + site_b * per_b} evaluations x {arch_mean:.2f} s = {est / 60:.1f} min "
          "on this machine (physics baseline and figures not counted)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

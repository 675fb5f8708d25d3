"""Search overhead: N trials under Ray Tune against N plain training runs of the same configurations.

    python benchmarks/bench_tune.py [--trials 4] [--epochs 4]

In one script, over the same synthetic prepared stores (64 x 64, site A: 4 training and 1
validation exam of 16 slices) and the same N configurations (the first N suggestions of the
seeded TPE searcher over the demo profile's search space):

- plain: each configuration trained one after the other in this process by `train.loop.Trainer`
  (the core of every trial), one thread each (a trial's resources), validation every epoch;
- Tune, 1 at a time: `tune.search`'s own trainable (a TorchTrainer per trial) under Ray Tune
  with the seeded OptunaSearch and no early stopping (FIFO), so it does the same work;
- Tune, 2 at a time: the same with two concurrent trials on the 2 cores.

Overhead = Tune (1 at a time) / plain; speed-up = Tune (1 at a time) / Tune (2 at a time).
`ray.init` is timed apart. Writes benchmarks/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def stores(root: Path) -> Path:
    from test_train_data import fake_prepared

    for split, n in (("train", 4), ("val", 1)):
        for p in fake_prepared(root / "tmp" / split, n=n, z=16, size=64, split=split, prefix=f"a{split}"):
            dst = root / "prepared" / "site-A" / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            p.rename(dst)
            meta = json.loads((dst / "zarr.json").read_text())
            meta["attributes"]["site"] = "site-A"
            (dst / "zarr.json").write_text(json.dumps(meta))
    return root / "prepared"


def plain_run(cfg: dict, run: dict, hp: dict) -> tuple[float, float]:
    """One configuration trained as a trial trains it, without Ray; (seconds, final val L1)."""
    from train.distributed import _loaders
    from train.loop import Losses, Trainer
    from train.models import build

    t0 = time.perf_counter()
    c = {**cfg, **hp}
    torch.manual_seed(c["seed"])
    tr = Trainer(build(run["arch"], width=c["width"], depth=c["depth"]), lr=c["lr"], lr_d=c.get("lr_d"),
                 betas=c["betas"], losses=Losses(tuple(c["ds_weights"]), c["adv_weight"]),
                 plateau_factor=c["plateau_factor"], plateau_after_epoch=c["plateau_after_epoch"],
                 ema_decay=c.get("ema_decay", 0.0))
    train_ds, train, val = _loaders(run, c)
    val_loss = float("nan")
    for epoch in range(c["epochs"]):
        train_ds.set_epoch(epoch)
        for batch in train:
            tr.train_step(batch)
        vs, vn = tr.val_sums(val)
        val_loss = vs / vn
        tr.end_epoch(val_loss)
    return time.perf_counter() - t0, val_loss


def tune_runs(cfg: dict, search: dict, n: int, concurrent: int, storage: Path) -> tuple[float, list]:
    from ray import tune

    from tune.search import make_searcher, trainable_for

    search = {**search, "dir": storage / f"c{concurrent}"}
    tuner = tune.Tuner(
        trainable_for(cfg, search),
        tune_config=tune.TuneConfig(search_alg=make_searcher(cfg), metric="score", mode="min", num_samples=n,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"c{concurrent}", storage_path=str(storage), verbose=0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trials = sorted(((r.config, r.metrics.get("val_l1"), r.metrics.get("time_total_s")) for r in grid),
                    key=lambda t: json.dumps(t[0], sort_keys=True))
    return wall, trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune.json")
    args = ap.parse_args()

    from ingest.params import load_params
    from train.stages import HP_KEYS
    from tune.search import make_searcher, plan
    from tune.space import to_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    params = load_params(ROOT / "params.yaml", "demo")
    params["tune"].update(enabled=True, contrasts=["t1flair"], num_samples=args.trials, epochs=args.epochs,
                          resources={"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False})
    params["train"]["use_gpu"] = False
    prepared = stores(tmp)
    # fake stores carry one target, named t1w
    params["tune"]["contrasts"] = ["t1w"]
    cfg, searches = plan(params, prepared, tmp / "runs")
    search = searches[0]
    run = search["runs"][0]

    searcher = make_searcher(cfg)
    configs = []
    for i in range(args.trials):
        configs.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"score": 1.0})
    base = {**{k: cfg["train"][k] for k in HP_KEYS}, "epochs": args.epochs}

    torch.set_num_threads(1)   # a trial's resources: one CPU
    plain = []
    for c in configs:
        plain.append(plain_run(base, run, to_train(c, cfg["train"])))
    plain_wall = sum(s for s, _ in plain)
    print(f"plain: {args.trials} runs in {plain_wall:.1f} s ({', '.join(f'{s:.1f}' for s, _ in plain)})")

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    seq_wall, seq = tune_runs(cfg, search, args.trials, 1, tmp / "tune")
    print(f"tune, 1 at a time: {seq_wall:.1f} s")
    par_wall, _ = tune_runs(cfg, search, args.trials, 2, tmp / "tune")
    print(f"tune, 2 at a time: {par_wall:.1f} s")
    ray.shutdown()

    same = sorted(json.dumps(c, sort_keys=True) for c in configs) == sorted(json.dumps(c, sort_keys=True)
                                                                            for c, _, _ in seq)
    res = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s) "
        f"per run, {__import__('os').cpu_count()} CPUs", "trials": args.trials, "epochs": args.epochs,
        "same_configurations": same,
        "plain_s": round(plain_wall, 1), "plain_per_run_s": [round(s, 1) for s, _ in plain],
        "ray_init_s": round(init_s, 1),
        "tune_sequential_s": round(seq_wall, 1), "tune_concurrent2_s": round(par_wall, 1),
        "tune_trial_s_sequential": [round(t or 0, 1) for _, _, t in seq],
        "overhead_ratio": round(seq_wall / plain_wall, 2),
        "per_trial_overhead_s": round((seq_wall - plain_wall) / args.trials, 1),
        "concurrency_speedup": round(seq_wall / par_wall, 2),
        "concurrent_vs_plain": round(par_wall / plain_wall, 2),
        # the same configuration's final validation L1, plain and under Tune (they should agree closely)
        "val_l1": [{"lr": round(c["lr"], 5), "plain": round(v, 4),
                    "tune": next(round(tv or 0, 4) for tc, tv, _ in seq if tc == c)} for c, (_, v) in zip(configs, plain)],
    }
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""A stage's training on Ray Train: one ``ray.train.torch.TorchTrainer`` run trains every model
of the stage (each architecture x contrast its own model, one after the other).

One run per stage, not one per model: starting a Ray Train run costs about 25 s on a 2-core
machine, more than a demo model takes to train. Each worker builds the same model, wraps it
in DDP (``prepare_model``), reads its own shard of slices (a DistributedSampler seeded from
params and reshuffled per epoch, so a resumed run sees the same order) and reports metrics every epoch (``ray.train.report``). Rank 0 reports a
checkpoint every ``checkpoint_every`` epochs and after each model: where the finished models'
best weights are (written once each, under the run's storage folder, ``best/``), and the
current model's trainer state (weights, both optimisers, the plateau
schedule, the epoch). ``FailureConfig(max_failures)`` restarts failed workers, and the loop
resumes from the latest checkpoint (``ray.train.get_checkpoint``), never from epoch 0; the
same happens when a stopped run is started again with the same storage path and name.

Fault injection for tests: ``QSNET_FAIL_AT_EPOCH=k`` makes rank 0 raise once at the start of
epoch k of the first model still to train (a marker file in the run's storage remembers).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

__all__ = ["run_training", "run_parallel", "split_runs", "train_loop_per_worker", "CKPT"]

CKPT = "stage.pt"
REPORT_EVERY_S = 10.0


def _loaders(run: dict, config: dict, rank: int = 0, world: int = 1):
    import torch
    from torch.utils.data.distributed import DistributedSampler

    from train.data import SliceDataset

    common = dict(contrasts=[run["contrast"]], inputs=run["inputs"])
    aug = config.get("augment")   # a mapping (a tuned one, even empty: the default strengths) or a bool
    train_ds = SliceDataset(run["train_stores"], augment=aug if isinstance(aug, dict) else (aug or None),
                            seed=config["seed"], **common)
    val_ds = SliceDataset(run["val_stores"], **common) if run["val_stores"] else None
    # The shuffle is a function of (seed, epoch) through set_epoch, so a run resumed at epoch k
    # sees epoch k's order, as the uninterrupted run did (a generator seeded once per process
    # replayed epoch 0's). Given explicitly, Ray's prepare_data_loader would put in its own
    # sampler with seed 0 and ignore the params' seed.
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=int(config["seed"]))
    train = torch.utils.data.DataLoader(train_ds, batch_size=config["batch_size"], sampler=sampler,
                                        num_workers=config.get("loader_workers", 0))
    # each worker validates every world-th slice, none twice: a DistributedSampler pads the
    # shards with repeats, and the summed validation loss would count those
    val = (torch.utils.data.DataLoader(val_ds.shard(rank, world), batch_size=config["batch_size"])
           if val_ds is not None else None)
    return train_ds, train, val


def _state_cpu(module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from ingest import storage
    from train.loop import Losses, Trainer
    from train.models import build

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    device = ray.train.torch.get_device()
    saved: dict = {"done": {}, "current": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / CKPT, map_location="cpu", weights_only=False)
    done: dict = saved["done"]
    last_report = time.monotonic()
    fail_at = os.environ.get("QSNET_FAIL_AT_EPOCH")
    marker = storage.join(config["storage"], config["name"], ".failed-once")
    every_s = float(config.get("report_every_s", REPORT_EVERY_S))
    for run in config["runs"]:
        if run["name"] in done:
            continue
        # a run's own hyperparameters (a tuned configuration) over the stage's
        c = {**config, **(run.get("hp") or {})}
        torch.manual_seed(c["seed"])
        model = build(run["arch"], in_channels=2, out_channels=1, width=c["width"], depth=c.get("depth", 6))
        tr = Trainer(model, lr=c["lr"], lr_d=c.get("lr_d"), betas=c["betas"],
                     losses=Losses(tuple(c["ds_weights"]), c["adv_weight"], c.get("ssim_weight", 0.0)),
                     plateau_factor=c["plateau_factor"], plateau_after_epoch=c["plateau_after_epoch"],
                     device=device, freeze_encoder=run.get("freeze_encoder", False), amp=c.get("amp", True),
                     ema_decay=c.get("ema_decay", 0.0), compile=c.get("compile", False))
        best = {"val": math.inf, "epoch": 0, "state": None}
        history: list[dict] = []
        resumed = None
        if saved.get("current") == run["name"]:
            tr.load_state_dict(saved["trainer"], source=f"checkpoint of {config['name']}")
            best, history, resumed = saved["best"], saved["history"], tr.epoch
        elif run.get("init_weights"):
            tr.g.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(run["init_weights"])),
                                            map_location=device, weights_only=True))
        if world > 1:
            tr.wrap(lambda m: ray.train.torch.prepare_model(m))
        train_ds, train, val = _loaders(run, c, rank, world)
        for epoch in range(tr.epoch, c["epochs"]):
            if fail_at is not None and epoch == int(fail_at) and rank == 0 and not storage.exists(marker):
                storage.write_bytes(marker, f"{run['name']} {epoch}".encode())
                raise RuntimeError(f"injected failure at epoch {epoch} of {run['name']} (QSNET_FAIL_AT_EPOCH)")
            train_ds.set_epoch(epoch)
            train.sampler.set_epoch(epoch)
            wall_start = time.time()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            steps = 0
            for batch in train:
                for k, v in tr.train_step(batch).items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
            seconds = time.perf_counter() - t0
            vs, vn = tr.val_sums(val) if val is not None else (0.0, 0)
            last = epoch + 1 == c["epochs"]
            ckpt_now = last or (epoch + 1) % c["checkpoint_every"] == 0
            # Ray Train's controller collects one report per worker every 2 s (its health-check
            # interval) and a worker's next report waits for that: short epochs (the demo's take
            # about 1 s) would each be stretched to 2 s. So a report goes out with each
            # checkpoint and otherwise at most every REPORT_EVERY_S; every epoch's metrics are
            # in the history all the same. All ranks must report together: rank 0 decides.
            want = float(ckpt_now or time.monotonic() - last_report >= every_s)
            if world > 1:
                t = torch.tensor([vs, vn, want if rank == 0 else 0.0], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                vs, vn, want = float(t[0]), int(t[1]), float(t[2])
            val_loss = vs / vn if vn else float("nan")
            tr.end_epoch(val_loss)
            # no validation data: the last epoch counts as the best
            if (vn and val_loss < best["val"]) or (not vn and last):
                best = {"val": val_loss if vn else math.inf, "epoch": epoch + 1,
                        "state": _state_cpu(tr.eval_generator())}
            metrics = {"model": run["name"], "epoch": epoch + 1, "val_l1": val_loss if vn else None,
                       "lr": tr.opt_g.param_groups[0]["lr"], "epoch_s": round(seconds, 3), "steps": steps,
                       "wall_start": wall_start,
                       "resumed_from_epoch": resumed,
                       # epochs this run of runs has trained, its finished models included: a search
                       # resumed from the Train checkpoint skips those, and Tune's own count of
                       # results (training_iteration) restarts with each session
                       "trial_epoch": sum(len(v["history"]) for v in done.values()) + epoch + 1,
                       # what a search ranks a run by: the mean best validation L1 of its models so far
                       "score": _score(done, best),
                       **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()}}
            history.append(metrics)
            if not want:  # never the last epoch: that one checkpoints
                continue
            last_report = time.monotonic()
            if rank == 0 and ckpt_now:
                if last:
                    done[run["name"]] = {"best": _keep_best(config, run["name"], best), "history": history}
                    state = {"done": done, "current": None}
                else:
                    state = {"done": done, "current": run["name"], "trainer": tr.state_dict(),
                             "best": best, "history": history}
                with tempfile.TemporaryDirectory() as d:
                    torch.save(state, Path(d) / CKPT)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                if last:
                    done[run["name"]] = {"best": {**best, "state": None}, "history": history}
                ray.train.report(metrics)


def _score(done: dict, best: dict) -> float | None:
    vals = [v["best"]["val"] for v in done.values()] + [best["val"]]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _keep_best(config: dict, name: str, best: dict) -> dict:
    """Write a finished model's best weights once, beside the run, and keep only their path.

    The stage checkpoint then stays the size of one model: holding every finished model's
    weights made each checkpoint larger than the last (a demo stage of 40 models wrote GBs).
    """
    import torch

    from ingest import storage

    path = storage.join(config["storage"], config["name"], "best", name.replace("/", "__") + ".pt")
    buf = io.BytesIO()
    torch.save(best["state"], buf)
    storage.write_bytes(path, buf.getvalue())
    return {**best, "state": None, "file": str(path)}


def _cpus_per_worker(num_workers: int) -> int:
    """An equal share of the cluster's free CPUs, no more than the largest node has."""
    import ray

    _init()
    free = int(ray.available_resources().get("CPU", 1))
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, min(free // max(1, num_workers), largest))


def run_training(config: dict, num_workers: int, use_gpu: bool, max_failures: int = 1,
                 callbacks: list | None = None) -> dict:
    """Fit every model of ``config["runs"]``; returns ``{run name: {"best", "history"}}``.
    ``callbacks``: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` inside a trial."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ingest import storage

    _init()
    cpus = config.get("cpus_per_worker") or _cpus_per_worker(num_workers)
    if storage.is_url(config["storage"]):
        fs, storage_path = storage.pyarrow_filesystem(config["storage"])
    else:
        fs, storage_path = None, config["storage"]
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        # on CPU each worker gets its share of the cores: Ray sets OMP_NUM_THREADS from it,
        # and with the default of 1 CPU a lone worker runs its convolutions on one thread
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus}),
        run_config=RunConfig(name=config["name"], storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks or None,
                             failure_config=FailureConfig(max_failures=max_failures)))
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # noqa: BLE001 - Ray raises the workers' errors as one wrapped error
        error = exc
    if error is not None:
        # the useful line is the workers' own exception, at the end of Ray's report
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if ":" in ln and not ln.startswith("File ")),
                     lines[0] if lines else "")
        raise RuntimeError(f"training run {config['name']} failed: {cause}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CKPT, map_location="cpu", weights_only=False)
    storage.write_bytes(storage.join(config["storage"], config["name"], "history.json"),
                        json.dumps({k: v["history"] for k, v in state["done"].items()}, indent=1).encode())
    done = copy.deepcopy(state["done"])
    for v in done.values():
        v["best"]["state"] = torch.load(io.BytesIO(storage.read_bytes(v["best"]["file"])), map_location="cpu",
                                        weights_only=True)
    return done


def _init(dashboard: bool = False) -> None:
    """``dashboard``: also start Ray's dashboard, whose state API Ray Train needs to free a run's
    worker placement group when the run's controller is killed (as Tune kills stopped trials)."""
    import ray

    if not ray.is_initialized():
        # embedded by default, a private cluster; under `ray job submit` (RAY_ADDRESS set) this
        # joins that cluster. Never ray.init() alone: it joins any `ray start` cluster that
        # happens to run on the machine (RAY_ADDRESS=auto asks for that explicitly).
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=dashboard,
                 log_to_driver=False, configure_logging=False)


def check_cluster(num_workers: int, use_gpu: bool | str) -> bool:
    """Join (or start) the cluster and check it can run one run of ``num_workers`` workers
    (parallel runs beyond what fits wait for resources); returns whether they use GPUs
    (``"auto"``: when the cluster has one per worker). Counts the resources the cluster has now:
    an autoscaling cluster must have started its GPU nodes (min_workers >= 1) before a GPU job
    is submitted."""
    import ray

    from ingest.params import ParamsError

    _init()
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if use_gpu == "auto":
        use_gpu = gpus >= num_workers
    if use_gpu and gpus < num_workers:
        raise ParamsError(f"params: train.use_gpu asks for {num_workers} GPU worker(s) per run, the Ray cluster "
                          f"has {gpus} GPU(s) (set train.use_gpu: false, or add GPU nodes)")
    if not use_gpu and cpus < num_workers:
        raise ParamsError(f"params: train.num_workers {num_workers} > the Ray cluster's {cpus} CPUs and no GPU")
    return bool(use_gpu)


# relative cost of one model (demo, 2-core CPU: seconds per model for 12 epochs)
COST = {"qsnet": 21.0, "resunet": 15.0, "cgan": 11.0, "swin": 45.0}


def split_runs(runs: list[dict], groups: int) -> list[list[dict]]:
    """``runs`` in ``groups`` lists of about equal cost (longest first onto the least loaded),
    each keeping the original order, so a finetune run still follows nothing it needs."""
    groups = max(1, min(groups, len(runs)))
    load = [0.0] * groups
    owner = {}
    for i in sorted(range(len(runs)), key=lambda i: -COST.get(runs[i]["arch"], 20.0)):
        g = load.index(min(load))
        owner[i] = g
        load[g] += COST.get(runs[i]["arch"], 20.0)
    return [[r for i, r in enumerate(runs) if owner[i] == g] for g in range(groups)]


def run_parallel(config: dict, num_workers: int, use_gpu: bool, max_failures: int = 1, parallel: int = 1) -> dict:
    """The stage's models as ``parallel`` Ray Train runs side by side (each ``num_workers``
    workers, DDP within a run), like concurrent trials: on a small CPU two one-thread runs
    train more models per minute than one two-thread run, and on a cluster each run takes its
    own GPUs. Each run has its own name and checkpoints, so an interrupted stage resumes every
    one of them."""
    import threading

    groups = split_runs(config["runs"], parallel)
    if len(groups) == 1:
        return run_training(config, num_workers, use_gpu, max_failures)
    _init()
    cpus = None
    if not use_gpu:
        cpus = max(1, _cpus_per_worker(num_workers * len(groups)))
    results: dict[int, dict] = {}
    errors: dict[int, BaseException] = {}

    def one(i: int, runs: list[dict]) -> None:
        sub = {**config, "runs": runs, "name": f"{config['name']}-{i + 1}of{len(groups)}",
               "cpus_per_worker": cpus,
               "torch_threads": cpus or config.get("torch_threads")}
        try:
            results[i] = run_training(sub, num_workers, use_gpu, max_failures)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[i] = exc

    # Daemon threads, and Ray shut down on Ctrl-C: the runs' own threads would otherwise keep
    # the process alive, training, until every run ended. Their checkpoints stay for a rerun.
    threads = [threading.Thread(target=one, args=(i, g), name=f"train-{i}", daemon=True)
               for i, g in enumerate(groups)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        import ray

        ray.shutdown()
        raise
    if errors:
        raise errors[min(errors)]
    done: dict = {}
    for i in sorted(results):
        done.update(results[i])
    return done

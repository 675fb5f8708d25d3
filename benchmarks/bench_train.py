"""Ray Train's overhead against a plain PyTorch loop, and QS-Net training throughput on a GPU.

    python benchmarks/bench_train.py                 # CPU: plain loop vs Ray Train, 1 and 2 workers
    python benchmarks/bench_train.py --gpu --profile # GPU: the core step alone, 256 x 256, bf16

CPU part, in one script, over the same prepared-like data (synthetic stores, 64 x 64) and the
same model (QS-Net, width --width):

- plain: `train.loop.Trainer` over a DataLoader, --epochs epochs, timed per epoch;
- Ray: `train.distributed.run_training` with 1 worker (the stage's own code path), in --rounds
  rounds, each between two plain runs; a round's overhead is against the mean of those two, and
  the figure is the median over rounds. Start-up (`ray.init` and the run until its first epoch)
  is reported separately.
- Ray, 2 workers on the 2 cores: the same, DDP; scaling = epoch time(1) / epoch time(2).
- Ray, 1 worker, a checkpoint every epoch: what each ``ray.train.report`` with a checkpoint costs.

Ray's epoch times are wall times between the starts of consecutive epochs (validation,
checkpoint and report included).

Target: Ray's per-epoch overhead at most 10 %.

GPU part: the step of `train.loop.Trainer` (generator + discriminator, deep supervision,
bf16 autocast) at 256 x 256, width 32, per variant: eager or `Trainer(compile=True)`, NCHW or
NHWC. Model FLOPs are counted with torch's FlopCounterMode on the eager step; the fraction is of
the bf16 matrix rate measured at the start of the run (or --peak-tflops). Target: 35 % or more.
It also prints the floor (`conv_floor`): the fewest bytes the step's convolutions must move,
and so the highest fraction any implementation of this network could reach. --profile adds
the step's top kernels; --trace a Chrome trace to open in Perfetto.

    python benchmarks/bench_train.py --gpu --device cpu --size 64 --batches 2 --steps 1
        # a dry run of the GPU part on the CPU, before spending GPU time on it
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

    train_clock: list[float] = []  # each plain epoch's training steps alone, as the Ray loop's own clock

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
            t1 = time.perf_counter()
            tr.val_sums(vdl)
            times.append(time.perf_counter() - t0)
            train_clock.append(t1 - t0)
        return times

    def ray_run(workers: int, every: int, epochs: int) -> tuple[list[dict], float]:
        config = {"width": args.width, "epochs": epochs, "batch_size": 4, "lr": 2e-4,
                  "betas": [0.5, 0.999],
                  "plateau_factor": 0.9, "plateau_after_epoch": 1, "ds_weights": [0.5, 0.25, 0.125, 0.0625],
                  "adv_weight": 0.01, "augment": True, "checkpoint_every": every, "loader_workers": 0,
                  "amp": False,
                  "seed": 0, "name": f"bench-{workers}-{time.time_ns()}", "storage": str(tmp / "runs"),
                  "torch_threads": max(1, threads // workers),
                  "runs": [{"name": "m", "arch": "qsnet", "contrast": "t1w", "inputs": "mrf",
                            "train_stores": stores, "val_stores": val}]}
        t0 = time.perf_counter()
        done = run_training(config, workers, False, 0)
        return done["m"]["history"], time.perf_counter() - t0

    def record(key: str, hist: list[dict], wall: float) -> None:
        # an epoch's wall time on Ray runs from its start to the next epoch's start, so it holds
        # the validation, the checkpoint and the wait in ray.train.report (the loop's own
        # epoch_s clock does not: a first version of this benchmark used it and missed ~1 s
        # per epoch of report wait)
        starts = [h["wall_start"] for h in hist]
        out[f"{key}_epoch_s"] = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
        out[f"{key}_loop_clock_epoch_s"] = [round(h["epoch_s"], 3) for h in hist]
        out[f"{key}_run_wall_s"] = round(wall, 2)
        out[f"{key}_startup_and_teardown_s"] = round(wall - (starts[-1] - starts[0]) - hist[-1]["epoch_s"], 2)

    # the first epoch includes one-time costs (allocator warm-up, first store opens): compare the rest
    med = lambda v: sorted(v[1:])[len(v[1:]) // 2]  # noqa: E731
    # Rounds of plain, Ray, plain, Ray, ..., plain: this VM's speed drifts by 20-30 % between
    # minutes, so one Ray run against one plain run cannot settle a 10 % target. Each round's
    # overhead is against the mean of the plain runs either side of it, and the figure is the
    # median over rounds. Ray is started afresh each round so the plain loop never shares the
    # cores with Ray's idle processes (they are part of Ray's overhead, not of the reference).
    # A short Ray run first (not timed) lets Ray's own processes finish starting, which
    # otherwise slows the timed run.
    out = {"torch_threads": threads, "rounds": args.rounds, "plain_epoch_s": [plain_loop()],
           "plain_train_clock_epoch_s": [train_clock[:]]}
    out["ray1_epoch_s_rounds"], out["ray1_loop_clock_epoch_s_rounds"], overheads = [], [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        out.setdefault("ray_init_s", round(time.perf_counter() - t0, 2))
        warm = ray_run(1, 1, 2)[1]
        out.setdefault("ray_warmup_run_s", round(warm, 2))
        hist, wall = ray_run(1, args.checkpoint_every, args.epochs)
        record("ray1", hist, wall)
        out["ray1_epoch_s_rounds"].append(out["ray1_epoch_s"])
        out["ray1_loop_clock_epoch_s_rounds"].append(out["ray1_loop_clock_epoch_s"])
        if r == 0:
            record("ray2", *ray_run(2, args.checkpoint_every, args.epochs))
            record("ray1_ckpt_every_epoch", *ray_run(1, 1, args.epochs))
        ray.shutdown()
        train_clock.clear()
        out["plain_epoch_s"].append(plain_loop())
        out["plain_train_clock_epoch_s"].append(train_clock[:])
        ref = (med(out["plain_epoch_s"][-2]) + med(out["plain_epoch_s"][-1])) / 2
        overheads.append(round(med(out["ray1_epoch_s"]) / ref - 1, 3))
        print(f"round {r + 1}/{args.rounds}: Ray 1 worker {med(out['ray1_epoch_s']):.3f} s an epoch against "
              f"plain {ref:.3f} s: {overheads[-1]:+.1%}", flush=True)
    plain = [med(v) for v in out["plain_epoch_s"]]
    out["plain_reference_epoch_s"] = round(sorted(plain)[len(plain) // 2], 3)
    out["ray1_overhead_rounds"] = overheads
    out["ray1_overhead_per_epoch"] = sorted(overheads)[len(overheads) // 2]
    # the loop's own clock in the worker (its training steps only) against the same clock in the
    # plain loop: is the work itself slower under Ray, or is the gap the validation, the
    # checkpoint, the report and the wait between epochs?
    steps = [med(v) for v in out["plain_train_clock_epoch_s"]]
    out["ray1_loop_clock_overhead_rounds"] = [
        round(med(c) / ((steps[i] + steps[i + 1]) / 2) - 1, 3)
        for i, c in enumerate(out["ray1_loop_clock_epoch_s_rounds"])]
    out["ray1_ckpt_every_epoch_overhead_per_epoch"] = round(
        med(out["ray1_ckpt_every_epoch_epoch_s"]) / ((plain[0] + plain[1]) / 2) - 1, 3)
    out["scaling_1_to_2_workers"] = round(med(out["ray1_epoch_s_rounds"][0]) / med(out["ray2_epoch_s"]), 3)
    out["target_met"] = out["ray1_overhead_per_epoch"] <= 0.10
    return out


def conv_floor(width: int, batch: int, size: int, peak_tflops: float, bw_tbs: float) -> dict:
    """The two numbers of the training step before any timing: model FLOPs, and the fewest
    bytes any implementation must move, from each convolution's input and output.

    Bytes: per convolution, forward reads its input and writes its output once; backward reads
    the output gradient twice (input gradient, weight gradient), the input once and writes the
    input gradient once, so 3 x (input + output) in bf16. Norms, activations and residual adds
    are counted as free (fused into those passes), so this floor is generous: a real step
    moves more. Per layer the larger of FLOPs / peak and bytes / bandwidth is its floor time;
    FLOPs / peak over the sum of the floors is the highest fraction of peak the step could reach.
    """
    from torch import nn

    from train.models import build

    m = build("qsnet", width=width)
    layers: list[tuple[float, float]] = []

    def hook(mod, inp, out):
        x = inp[0]
        k = mod.kernel_size[0] * mod.kernel_size[1]
        if isinstance(mod, nn.ConvTranspose2d):
            flops = 2 * x.numel() * mod.out_channels * k / mod.groups
        else:
            flops = 2 * out.numel() * mod.in_channels * k / mod.groups
        layers.append((3 * flops * batch, 3 * (x.numel() + out.numel()) * 2 * batch))

    hooks = [mod.register_forward_hook(hook) for mod in [*m.generator.modules(), *m.discriminator.modules()]
             if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]
    x = torch.zeros(1, 2, size, size)
    with torch.no_grad():
        out = m.generator(x)
        # the discriminator sees (input, output) three times a step: for the generator's
        # adversarial term, then real and fake for its own loss
        for _ in range(3):
            m.discriminator(torch.cat([x, out], 1))
    for h in hooks:
        h.remove()
    flops = sum(f for f, _ in layers)
    nbytes = sum(b for _, b in layers)
    floor_s = sum(max(f / (peak_tflops * 1e12), b / (bw_tbs * 1e12)) for f, b in layers)
    return {"conv_layers": len(layers), "step_gflop": round(flops / 1e9, 1), "floor_gbytes": round(nbytes / 1e9, 2),
            "floor_step_ms": round(floor_s * 1e3, 2),
            "best_possible_fraction": round(flops / (peak_tflops * 1e12) / floor_s, 3)}


def ceilings(dev) -> dict:
    """This GPU's bf16 matrix rate and copy bandwidth, measured now (the fraction's denominator)."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    src = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    out = {}
    for name, fn, work in (("bf16_matmul_tflops", lambda: a @ b, 2 * 8192 ** 3 / 1e12),
                           ("copy_tb_per_s", lambda: dst.copy_(src), 2 * src.numel() / 1e12)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        out[name] = round(work * 10 / (time.perf_counter() - t0), 1 if "tflops" in name else 2)
    return out


def gpu_part(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from train.loop import Trainer
    from train.models import build

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.compile_mode:
        import functools

        # the Trainer calls torch.compile without a mode: the benchmark tries others this way
        torch.compile = functools.partial(torch.compile, mode=args.compile_mode)
    torch.backends.cudnn.benchmark = True
    # --device cpu only checks that the script runs, before spending GPU time on it
    res = ({"device": torch.cuda.get_device_name(), **ceilings(dev)} if cuda
           else {"device": "cpu (dry run)", "bf16_matmul_tflops": 1.0, "copy_tb_per_s": 1.0})
    res["torch"] = torch.__version__
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = args.size
    peak = args.peak_tflops or res["bf16_matmul_tflops"]
    res["peak_tflops_used"] = peak
    res["compile_mode"] = args.compile_mode or "default"
    print(res, flush=True)
    rows = []
    flops = {}
    for variant in args.variants:
        compile_, layout = variant.split("-")
        for bs in args.batches:
            torch.manual_seed(0)
            tr = Trainer(build("qsnet", width=32), device=dev, amp=True, compile=compile_ == "compile",
                         channels_last=layout == "nhwc")
            x = torch.rand(bs, 2, size, size, device=dev)
            b = {"input": x, "target": x[:, :1].clone()}
            t0 = time.perf_counter()
            first = tr.train_step(b)
            warm_s = time.perf_counter() - t0
            for _ in range(2):
                tr.train_step(b)
            if bs not in flops:
                # counted once per batch size, on the eager step: every variant does the same math
                ref = Trainer(build("qsnet", width=32), device=dev, amp=True)
                with FlopCounterMode(display=False) as fc:
                    ref.train_step(b)
                flops[bs] = fc.get_total_flops()
                del ref
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step(b)
            sync()
            dt = (time.perf_counter() - t0) / args.steps
            tf = flops[bs] / dt / 1e12
            rows.append({"variant": variant, "batch": bs, "first_step_s": round(warm_s, 1),
                         "first_step_l1": round(first["l1"], 5), "step_ms": round(dt * 1e3, 2),
                         "slices_per_s": round(bs / dt, 1), "model_tflop_per_step": round(flops[bs] / 1e12, 3),
                         "achieved_tflops": round(tf, 1), "fraction_of_peak": round(tf / peak, 3)})
            print(rows[-1], flush=True)
            if args.profile and cuda and variant == args.variants[-1] and bs == args.batches[-1]:
                try:
                    res["profile_top_kernels"] = profile_step(tr, b, steps=1 if args.trace else 3,
                                                              trace=args.trace)
                except Exception as e:  # the timings above stand without it
                    res["profile_error"] = f"{type(e).__name__}: {e}"
            del tr
            if cuda:
                torch.cuda.empty_cache()
            _write(args.out, {**args.base, **res, "rows": rows})   # a run cut short still leaves its rows
    best = max(r["fraction_of_peak"] for r in rows)
    res.update({"rows": rows, "best_fraction": best, "target_met": best >= 0.35,
                "floor": conv_floor(32, max(args.batches), size, peak, res["copy_tb_per_s"])})
    return res


def profile_step(tr, b, steps: int = 3, trace: Path | None = None) -> list[dict]:
    """The kernels that take the step's GPU time, largest first (share of the total); with
    ``trace``, also a gzipped Chrome trace (CPU ops and kernels) of the steps."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=acts, record_shapes=bool(trace)) as prof:
        for _ in range(steps):
            tr.train_step(b)
        torch.cuda.synchronize()
    if trace:
        raw = trace.with_name(trace.name + ".tmp")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in ev) or 1
    ev.sort(key=lambda e: -e.self_device_time_total)
    return [{"kernel": e.key[:90], "share": round(e.self_device_time_total / total, 3), "calls": e.count // steps}
            for e in ev[:20]]


def _write(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=5, help="as the demo profile")
    ap.add_argument("--rounds", type=int, default=5,
                    help="CPU: Ray runs, each between two plain runs; the overhead is the median over rounds")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the plain loop and of a lone Ray worker (default: every core); "
                         "with 1, Ray's own processes have a core to themselves")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--variants", nargs="+", default=["eager-nchw", "compile-nchw", "compile-nhwc"],
                    choices=["eager-nchw", "eager-nhwc", "compile-nchw", "compile-nhwc"],
                    help="GPU: compile = Trainer(compile=True); nhwc = channels_last")
    ap.add_argument("--device", default="cuda", help="GPU part on this device (cpu: a dry run of the script)")
    ap.add_argument("--size", type=int, default=256, help="GPU part: slice size")
    ap.add_argument("--compile-mode", default=None,
                    help="GPU: torch.compile mode for the compiled variants (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--profile", action="store_true", help="GPU: the kernels of the last variant's step")
    ap.add_argument("--trace", type=Path, default=None, help="GPU, with --profile: a Chrome trace (.json.gz) too")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="GPU: the fraction's denominator (default: the bf16 matrix rate measured at start)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or Path(f"benchmarks/results/train_{'gpu' if args.gpu else 'cpu'}.json")
    args.base = res = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    res = {**res, **(gpu_part(args) if args.gpu else cpu_part(args))}
    print(json.dumps(res, indent=1))
    _write(args.out, res)


if __name__ == "__main__":
    main()

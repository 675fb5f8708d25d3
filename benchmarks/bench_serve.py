"""Serving: one exam through the local Ray Serve app against the bare model forward, throughput
with concurrent clients with batching on and off, and a bounded load run.

    python benchmarks/bench_serve.py [--quick] [--width 8] [--load-seconds 180] [--port 8765]

In one script, on this machine:

- Models: a registry of random-weight QS-Net models, 5 contrasts x (pretrain on site A,
  finetune on site B), at the demo profile's width (`params.yaml` demo.train.width, 12 since 2026-12-05) and its
  input contract (64 x 64). The weights do not change the cost of a forward.
- Exam: the MRF T1 and T2 map series (S700, S701) of the demo phantom's first site-B exam
  (`data/site-B/sub-B01`), zipped in memory. Without `data/`, one site-B exam is simulated.
- Bare forward: the same model input the service computes (`serve.exam.read_exam` and
  `model_input`), and the cards the service picks for the exam (finetune on site B). One
  forward per contrast over all the exam's slices, `torch.inference_mode`, 1 torch thread (what
  the Synthesizer replica gets: Ray sets its OMP threads to its `num_cpus`, 1; checked with a
  1-CPU task). Median of --bare-runs after a warm-up. Also timed, interleaved with it: half
  the exam per call (about the batches the service forms) and one slice per call (what
  batching off does). It runs before Ray starts, so nothing competes with it.
- The app: `serve.app.build_app`, run in this process's Ray (`ray.init` without the dashboard,
  `serve.start` on 127.0.0.1:--port). Both settings use 1 Synthesizer replica (num_cpus 1) and
  1 Ingress replica (num_cpus 1; --ingress-replicas N gives N of 1/N CPU each), so only
  batching differs: on = max_batch_size --batch-size (default 32) with --batch-wait (5 ms),
  off = max_batch_size 1. The app is deleted and redeployed between them.
- Single request: all five contrasts, sequential, --requests timed requests after 3 warm-ups,
  in each setting (the target is read with batching on). Reports the client's wall time and the Server-Timing parts (decode = unzip +
  ingest, prepare, model, encode). Serving overhead = (total - decode - encode) / bare forward
  (target <= 1.30); decode and encode are reported as the fixed cost; the HTTP remainder is
  total - the sum of the parts.
- Throughput: 1, 4 and 16 closed-loop clients (threads, one httpx client each). The window
  opens when every client has had its first answer (the ramp is left out) and lasts --seconds;
  requests/s = answers inside the window / --seconds; p50/p99 of the client latencies of the
  requests sent inside it (the requests in flight at its end are waited for); failures over all
  requests. CPU seconds per Ray process (psutil) and model forwards (the Synthesizer's own
  counter) over each point.
- Load: --load-clients (4) clients for a --load-seconds (180) window, batching on, the same
  way; failed = non-200 or an exception, over every request. Replica memory (RSS) before and
  after, and the p50 of the first and last tenth of the requests.

Writes benchmarks/results/serve.json (or --out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTRASTS = ("t1w", "t2w", "t1flair", "t2flair", "swi")
MRF_SERIES = ("S700_MRF-FISP_T1_Map", "S701_MRF-FISP_T2_Map")
PARTS = ("decode", "prepare", "model", "encode")


# ----------------------------------------------------------------------------- inputs

def code_version() -> dict:
    """The commit measured, and whether the service's code differs from it (it is being worked on)."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--", "serve", "ingest", "train")
    return {"git_commit": git("rev-parse", "--short", "HEAD"), "serve_ingest_train_modified": bool(status)}


def demo_width() -> int:
    import yaml

    return int(yaml.safe_load((ROOT / "params.yaml").read_text())["demo"]["train"]["width"])


def exam_zip(tmp: Path) -> tuple[bytes, str]:
    """The zip of one site-B exam's two MRF map series, and where the exam came from."""
    exams = sorted((ROOT / "data" / "site-B").glob("sub-B0*"))
    exams = [e for e in exams if all((e / s).is_dir() for s in MRF_SERIES)]
    if exams:
        exam = exams[0]
        source = str(exam.relative_to(ROOT))
    else:
        from ingest.phantom.simulate import simulate

        simulate(tmp / "phantom", size="demo", seed=0, sites=("site-B",), subjects=1, jobs=2)
        exam = next((tmp / "phantom" / "site-B").glob("sub-B0*"))
        source = "simulated (demo size, seed 0, site-B, 1 subject)"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for s in MRF_SERIES:
            for f in sorted((exam / s).iterdir()):
                if f.is_file():
                    zf.write(f, f"{s}/{f.name}")
    return buf.getvalue(), source


def make_registry(root: Path, width: int) -> dict:
    import torch

    from ingest.prepare.service import config, input_contract
    from train import registry
    from train.models import build

    contract = input_contract(config({}))
    torch.manual_seed(0)
    for stage, site in (("pretrain", "site-A"), ("finetune", "site-B")):
        for c in CONTRASTS:
            m = build("qsnet", in_channels=2, out_channels=1, width=width, depth=6)
            registry.save(root / stage / "qsnet" / c, m.generator, {
                "architecture": "qsnet", "build": m.config, "contrast": c, "inputs": "mrf", "stage": stage,
                "trained_on": {"site": site}, "params_hash": "bench", "input": contract})
    return contract


# ----------------------------------------------------------------------------- bare forward

def bare_forward(body: bytes, models: Path, tmp: Path, runs: int) -> dict:
    """The exam's model input as the service computes it, and the five forwards without Serve."""
    import torch

    from ingest.service import load_sites
    from serve.catalog import load_catalog, select
    from serve.exam import model_input, read_exam, unpack
    from train import registry

    torch.set_num_threads(1)
    t = time.perf_counter()
    exam = read_exam(unpack(body, tmp / "u"), load_sites(None), work=tmp / "s")
    decode_s = time.perf_counter() - t
    catalog, _ = load_catalog(models)
    cards = {c: select(catalog, c, exam.site, None) for c in CONTRASTS}
    contract = cards["t1w"]["input"]
    t = time.perf_counter()
    p = model_input(exam, contract)
    prepare_s = time.perf_counter() - t
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(p["input"], 0, 1), np.float32))
    nets = {c: registry.load(card["_path"]) for c, card in cards.items()}

    def five(per_call: int) -> None:  # the five contrasts, ``per_call`` slices per forward
        with torch.inference_mode():
            for net in nets.values():
                for k in range(0, len(x), per_call):
                    net(x[k:k + per_call])

    # the bare forward: the whole exam per call; half the exam per call (about the batches the
    # service forms); one slice per call (what batching off does). Interleaved, so that the
    # machine's drift hits all three alike.
    sizes = {"whole": len(x), "half": (len(x) + 1) // 2, "one": 1}
    for n in sizes.values():
        five(n)
    got: dict[str, list[float]] = {k: [] for k in sizes}
    for i in range(runs):
        for k, n in sizes.items():
            if k == "one" and i % 3:
                continue
            t = time.perf_counter()
            five(n)
            got[k].append(time.perf_counter() - t)
    times, half, times1 = got["whole"], got["half"], got["one"]
    shutil.rmtree(tmp / "u", ignore_errors=True)
    shutil.rmtree(tmp / "s", ignore_errors=True)
    return {"slices": int(x.shape[0]), "input_shape": list(x.shape), "site": exam.site,
            "cards": {c: card["id"] for c, card in cards.items()}, "torch_threads": torch.get_num_threads(),
            "forward_5_contrasts_ms": round(1000 * statistics.median(times), 2),
            "forward_5_contrasts_ms_min_max": [round(1000 * min(times), 2), round(1000 * max(times), 2)],
            "forward_5_contrasts_half_exam_per_call_ms": round(1000 * statistics.median(half), 2),
            "forward_5_contrasts_one_slice_per_call_ms": round(1000 * statistics.median(times1), 2),
            "in_process_decode_ms": round(1000 * decode_s, 1), "in_process_prepare_ms": round(1000 * prepare_s, 1)}


# ----------------------------------------------------------------------------- client

def server_timing(header: str) -> dict:
    out = {}
    for item in header.split(","):
        name, _, rest = item.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


class Client:
    def __init__(self, base: str, body: bytes):
        import httpx

        self.http = httpx.Client(base_url=base, timeout=300.0)
        self.body = body

    def synthesize(self) -> tuple[bool, float, dict, bytes | None]:
        t = time.perf_counter()
        try:
            r = self.http.post("/v1/synthesize", content=self.body, headers={"Content-Type": "application/zip"})
            dt = time.perf_counter() - t
            if r.status_code != 200:
                return False, dt, {"status": r.status_code, "body": r.text[:300]}, None
            return True, dt, server_timing(r.headers.get("server-timing", "")), r.content
        except Exception as exc:  # noqa: BLE001 - any failure counts as a failed request
            return False, time.perf_counter() - t, {"exception": f"{type(exc).__name__}: {exc}"[:300]}, None

    def close(self):
        self.http.close()


def check_answer(content: bytes, slices: int, expect_cards: dict) -> dict:
    """The answer is a zip with one DICOM series per contrast, from the cards the bare run used."""
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        names = zf.namelist()
        record = json.loads(zf.read("synthesis.json"))
    per = {c: sum(1 for n in names if n.startswith(f"{c}/")) for c in CONTRASTS}
    models = {c: v["model"] for c, v in record["contrasts"].items()}
    ok = all(per[c] == slices for c in CONTRASTS) and models == expect_cards
    if not ok:
        raise SystemExit(f"unexpected answer: files per contrast {per}, models {models} (expected {expect_cards})")
    return {"files_per_contrast": per, "answer_bytes": len(content)}


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_clients(base: str, body: bytes, clients: int, seconds: float) -> dict:
    """Closed loop: each client sends its next request when its answer is in. The window opens when
    every client has had its first answer (the start-up ramp is left out) and lasts ``seconds``;
    then the clients stop sending and the requests in flight finish. Requests/s = answers that
    arrived inside the window / ``seconds``; p50/p99 over the requests sent inside it (all of
    them, however long they took); failures over every request."""
    recs = []  # (sent, done, ok, latency, info)
    lock = threading.Lock()
    go = threading.Event()
    win = {"firsts": 0, "start": None, "end": None}

    def worker():
        cl = Client(base, body)
        go.wait()
        first = True
        while True:
            with lock:
                if win["end"] is not None and time.perf_counter() >= win["end"]:
                    break
            sent = time.perf_counter()
            ok, dt, info, _ = cl.synthesize()
            done = time.perf_counter()
            with lock:
                recs.append((sent, done, ok, dt, info))
                if first:
                    win["firsts"] += 1
                    if win["firsts"] == clients:
                        win["start"], win["end"] = done, done + seconds
            first = False
        cl.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    go.set()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    a, b = win["start"], win["end"]
    fails = [r[4] for r in recs if not r[2]]
    answered = sum(1 for r in recs if r[2] and a <= r[1] <= b)
    inside = sorted((r for r in recs if r[2] and r[0] >= a), key=lambda r: r[0])
    lat = [r[3] for r in inside]
    parts = [r[4] for r in inside]
    res = {"clients": clients, "window_s": seconds, "answered_in_window": answered, "latency_samples": len(lat),
           "requests": len(recs), "failed": len(fails), "wall_s": round(wall, 1),
           "requests_per_s": round(answered / seconds, 3),
           "p50_ms": round(1000 * pct(lat, 50), 1), "p99_ms": round(1000 * pct(lat, 99), 1),
           "max_ms": round(1000 * max(lat), 1) if lat else None,
           "server_timing_median_ms": {k: round(statistics.median(p.get(k, 0.0) for p in parts), 1)
                                       for k in PARTS} if parts else {}}
    if fails:
        res["failures_first"] = fails[:5]
    res["_latencies"] = lat
    return res


# ----------------------------------------------------------------------------- Ray processes

def ray_kind(p) -> str | None:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - the process ended between listing and reading
        return None
    if p.pid == os.getpid():
        return "client + driver (this process)"
    for k, name in (("Synthesizer", "Synthesizer replica"), ("Ingress", "Ingress replica"),
                    ("ProxyActor", "HTTP proxy"), ("ServeController", "Serve controller")):
        if k in cmd:
            return name
    return "other Ray processes"


def snapshot() -> dict:
    import psutil

    snap = {}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:  # this run's Ray only, not another one on the machine
        k = ray_kind(p)
        if k is None:
            continue
        try:
            ct = p.cpu_times()
            snap[p.pid] = (k, ct.user + ct.system, p.memory_info().rss)
        except psutil.Error:
            pass
    return snap


def cpu_between(a: dict, b: dict) -> dict:
    use: dict[str, float] = {}
    for pid, (k, c, _) in b.items():
        use[k] = use.get(k, 0.0) + c - (a[pid][1] if pid in a else 0.0)
    return {k: round(v, 1) for k, v in sorted(use.items(), key=lambda kv: -kv[1])}


def rss_mb(snap: dict) -> dict:
    out: dict[str, float] = {}
    for k, _, rss in snap.values():
        if "replica" in k or k == "HTTP proxy":
            out[k] = out.get(k, 0.0) + rss / 2**20
    return {k: round(v, 1) for k, v in sorted(out.items())}


# ----------------------------------------------------------------------------- the app

def deploy(models: Path, batch: int, wait_s: float, port: int, ingress: int = 1) -> None:
    import httpx
    from ray import serve

    from serve.app import build_app

    app = build_app({"models": str(models), "max_batch_size": batch, "batch_wait_timeout_s": wait_s,
                     "deployments": {"Synthesizer": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                                     "Ingress": {"num_replicas": ingress,
                                                 "ray_actor_options": {"num_cpus": 1 / ingress}}}})
    serve.run(app, name="qsnet", route_prefix="/")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=15).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the app did not become ready in 120 s")


def forwards() -> int:
    from ray import serve

    h = serve.get_deployment_handle("Synthesizer", app_name="qsnet")
    return int(h.stats.remote().result()["forwards"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="A quick check: fewer requests, 8 s per throughput "
                    "point, 20 s load run.")
    ap.add_argument("--width", type=int, default=None, help="QS-Net width (default: the demo profile's)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--requests", type=int, default=10, help="Timed sequential single requests.")
    ap.add_argument("--bare-runs", type=int, default=15)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=40.0, help="Per throughput point.")
    ap.add_argument("--batch-size", type=int, default=32, help="max_batch_size with batching on")
    ap.add_argument("--batch-wait", type=float, default=0.005, help="batch_wait_timeout_s")
    ap.add_argument("--load-seconds", type=float, default=180.0)
    ap.add_argument("--load-clients", type=int, default=4)
    ap.add_argument("--ingress-replicas", type=int, default=1, help="Ingress replicas (num_cpus 1/N each); a "
                    "diagnostic: is the one Ingress the bottleneck?")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.bare_runs, args.seconds = 5, 5, 8.0
        args.load_seconds = min(args.load_seconds, 20.0)
    width = args.width or demo_width()
    clients = [int(c) for c in args.clients.split(",") if c]
    base = f"http://127.0.0.1:{args.port}"
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    res: dict = {"date": time.strftime("%Y-%m-%d"),
                 "machine": f"{cpu_model}, {os.cpu_count()} CPUs, {platform.machine()}, no GPU used",
                 "python": platform.python_version(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
                 "quick": args.quick, "width": width, **code_version(),
                 "settings": {"batch_on": {"max_batch_size": args.batch_size, "batch_wait_timeout_s": args.batch_wait},
                              "batch_off": {"max_batch_size": 1},
                              "replicas": f"1 Synthesizer (num_cpus 1), {args.ingress_replicas} Ingress "
                                          f"(num_cpus {1 / args.ingress_replicas:g} each)"}}
    try:
        body, source = exam_zip(tmp)
        res["exam"] = {"source": source, "zip_bytes": len(body)}
        make_registry(tmp / "models", width)
        print(f"# exam {source}: {len(body)} bytes zipped; QS-Net width {width}")

        bare = bare_forward(body, tmp / "models", tmp, args.bare_runs)
        res["bare"] = bare
        print(f"bare forward, 5 contrasts x {bare['slices']} slices, 1 thread: {bare['forward_5_contrasts_ms']} ms "
              f"(half the exam per call: {bare['forward_5_contrasts_half_exam_per_call_ms']} ms, one slice per call: "
              f"{bare['forward_5_contrasts_one_slice_per_call_ms']} ms)")

        import ray
        from ray import serve

        t = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        import torch

        res["replica_torch_threads"] = ray.get(ray.remote(num_cpus=1)(lambda: torch.get_num_threads()).remote())
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        res["ray_start_s"] = round(time.perf_counter() - t, 1)
        res["throughput"] = {}
        for setting, batch in (("batch_on", args.batch_size), ("batch_off", 1)):
            t = time.perf_counter()
            deploy(tmp / "models", batch, args.batch_wait, args.port, args.ingress_replicas)
            deploy_s = time.perf_counter() - t
            cl = Client(base, body)
            for i in range(3):  # the first requests load the models (multiplexed, on first use)
                ok, dt, info, content = cl.synthesize()
                if not ok:
                    raise SystemExit(f"warm-up request failed: {info}")
                if i == 0:
                    res.setdefault("answer", check_answer(content, bare["slices"], bare["cards"]))
            lat, parts = [], []
            f0 = forwards()
            for _ in range(args.requests):
                ok, dt, info, _ = cl.synthesize()
                if not ok:
                    raise SystemExit(f"single request failed: {info}")
                lat.append(dt)
                parts.append(info)
            nf = forwards() - f0
            med = {k: statistics.median(p[k] for p in parts) for k in PARTS}
            total = 1000 * statistics.median(lat)
            single = {"requests": args.requests, "total_ms": round(total, 1),
                      "total_ms_min_max": [round(1000 * min(lat), 1), round(1000 * max(lat), 1)],
                      **{f"{k}_ms": round(v, 1) for k, v in med.items()},
                      "http_and_rest_ms": round(statistics.median(
                          1000 * t - sum(p[k] for k in PARTS) for t, p in zip(lat, parts)), 1),
                      "forwards_per_request": round(nf / args.requests, 2),
                      "overhead_ratio": round((total - med["decode"] - med["encode"])
                                              / bare["forward_5_contrasts_ms"], 2),
                      "overhead_ratio_without_prepare": round(
                          (total - med["decode"] - med["prepare"] - med["encode"]) / bare["forward_5_contrasts_ms"], 2),
                      "model_part_ratio": round(med["model"] / bare["forward_5_contrasts_ms"], 2),
                      "overhead_ratio_vs_half_exam_bare": round((total - med["decode"] - med["encode"])
                                                                / bare["forward_5_contrasts_half_exam_per_call_ms"], 2)}
            single["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            res.setdefault("single", {})[setting] = single
            print(f"[{setting}] deploy {deploy_s:.1f} s; single request: {json.dumps(single)}")
            cl.close()
            res["throughput"][setting] = []
            for n in clients:
                f0, s0 = forwards(), snapshot()
                r = run_clients(base, body, n, args.seconds)
                s1, nf = snapshot(), forwards() - f0
                r.pop("_latencies")
                r["forwards"] = nf
                r["slices_per_forward"] = round(r["requests"] * 5 * bare["slices"] / nf, 1) if nf else None
                r["cpu_s"] = cpu_between(s0, s1)
                r["cpu_s_per_request"] = {k: round(v / r["requests"], 2) for k, v in r["cpu_s"].items()}
                r["load_average_1min_after"] = round(os.getloadavg()[0], 2)
                res["throughput"][setting].append(r)
                print(f"[{setting}] {n:2d} clients: {r['requests_per_s']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, "
                      f"p99 {r['p99_ms']:.0f} ms, {r['requests']} requests, {r['failed']} failed, "
                      f"{r['slices_per_forward']} slices/forward, parts {r['server_timing_median_ms']}, "
                      f"cpu {r['cpu_s']}")
            if setting == "batch_on" and args.load_seconds > 0:
                s0 = snapshot()
                load = run_clients(base, body, args.load_clients, args.load_seconds)
                s1 = snapshot()
                lat = load.pop("_latencies")
                k = max(1, len(lat) // 10)
                load.update({"p50_first_tenth_ms": round(1000 * pct(lat[:k], 50), 1),
                             "p50_last_tenth_ms": round(1000 * pct(lat[-k:], 50), 1),
                             "rss_mb_before": rss_mb(s0), "rss_mb_after": rss_mb(s1), "cpu_s": cpu_between(s0, s1),
                             "load_average_1min_after": round(os.getloadavg()[0], 2)})
                res["load"] = load
                print(f"[load] {json.dumps(load)}")
            serve.delete("qsnet")
        on = {r["clients"]: r["requests_per_s"] for r in res["throughput"]["batch_on"]}
        off = {r["clients"]: r["requests_per_s"] for r in res["throughput"]["batch_off"]}
        res["batching_speedup"] = {str(n): round(on[n] / off[n], 2) for n in on if off.get(n)}
        res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        try:
            from ray import serve
            import ray

            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    s = res["single"]["batch_on"]
    print("\n| what | value |\n|---|---|")
    print(f"| bare forward, 5 contrasts x {bare['slices']} slices, 1 thread | {bare['forward_5_contrasts_ms']} ms |")
    print(f"| single request (batching on), total | {s['total_ms']} ms |")
    print(f"| decode / prepare / model / encode / HTTP + rest | {s['decode_ms']} / {s['prepare_ms']} / "
          f"{s['model_ms']} / {s['encode_ms']} / {s['http_and_rest_ms']} ms |")
    print(f"| overhead (total - decode - encode) / bare | {s['overhead_ratio']} (target <= 1.30) |")
    print(f"| same without prepare / model part alone / against half-exam bare forwards | "
          f"{s['overhead_ratio_without_prepare']} / {s['model_part_ratio']} / {s['overhead_ratio_vs_half_exam_bare']} |")
    print("\n| batching | clients | req/s | p50 ms | p99 ms | latency samples | requests | failed | slices/forward |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for setting, rows in res["throughput"].items():
        for r in rows:
            print(f"| {setting} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                  f"{r['latency_samples']} | {r['requests']} | {r['failed']} | {r['slices_per_forward']} |")
    ld = res.get("load") or {}
    if ld:
        print(f"\nload: {ld['clients']} clients x {ld['window_s']} s: {ld['requests']} requests, {ld['failed']} failed, "
              f"{ld['requests_per_s']} req/s, p50 {ld['p50_ms']} ms, p99 {ld['p99_ms']} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

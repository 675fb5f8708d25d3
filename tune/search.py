"""Ray Tune + Optuna over QS-Net training: one search per contrast (or one shared search).

Each trial is a function trainable that builds a ``TorchTrainer`` (``train.distributed``'s own
loop, so a trial trains exactly as the pretrain stage does) and forwards the workers' per-epoch
reports to Tune (``TuneReportCallback``). ``OptunaSearch`` (TPE, seeded) suggests the
configurations, ``ASHAScheduler`` stops weak trials at its rungs (``trial_epoch`` counts
epochs). The Optuna study lives in a journal file in the experiment folder and Tune keeps its
experiment folder, so a search continues where it stopped: finished trials are not run again,
trials that were running start over.

What a run does with the folder of each search is decided by its identity (``qsnet-search.json``,
everything that decides the trials' results): by default a finished search of the same identity
is reused (best.yaml and the reports written again from its recorded trials, nothing trained),
an unfinished one is resumed, and one of another identity is set aside and a new search starts.
``fresh=True`` always starts anew; ``resume=True`` only continues (anything else is an error).

Layout, per search (``<contrast>`` or ``shared``)::

    <storage>/<search>/            Ray Tune's experiment folder (trials, searcher state)
    <storage>/<search>/qsnet-search.json   what the search is (a resume must match it)
    <storage>/<search>/optuna.journal      the Optuna study
    <storage>/<search>/events.jsonl        trial starts and ends, per session
    <storage>/<search>/asha.pkl            ASHA's rungs (Tune does not restore a scheduler)
    <out>/best.yaml                the best configuration(s), as train params
    <reports>/trials.csv, summary.json, history-<search>.png, importance-<search>.png
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

from ingest import first_line
from tune.space import distributions, to_train, tune_config

__all__ = ["Interrupted", "SearchError", "make_searcher", "run_search"]

IDENTITY = "qsnet-search.json"
JOURNAL = "optuna.journal"
EVENTS = "events.jsonl"
# a trial's epochs over all its sessions (train.distributed reports it): ASHA's clock, and how a
# finished trial is told from one ASHA stopped after a --resume
EPOCHS = "trial_epoch"


class SearchError(RuntimeError):
    pass


class Interrupted(SearchError):
    """The search stopped before all its trials ended (Ctrl-C); ``--resume`` continues it."""


def make_searcher(cfg: dict, storage_file: Path | None = None, study_name: str = "qsnet"):
    """The seeded TPE searcher; with ``storage_file``, its study is journaled there."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(storage_file))) if storage_file else None
    sampler = optuna.samplers.TPESampler(seed=int(cfg["seed"]))
    return OptunaSearch(space=distributions(cfg["space"]), metric=cfg["metric"], mode=cfg["mode"],
                        sampler=sampler, storage=storage, study_name=study_name)


def _trial(config: dict, base: dict) -> None:
    """One trial: the suggested configuration as train params, trained by a TorchTrainer."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from train.distributed import run_training

    tid = ray.tune.get_context().get_trial_id()
    hp = to_train(config, base["train"])
    runs = [{**r, "hp": hp} for r in base["runs"]]
    # every epoch reported (ASHA decides at epoch rungs); one checkpoint per model, at its end
    cfg = {**base["config"], "runs": runs, "name": f"trial-{tid}", "report_every_s": 0.0,
           "checkpoint_every": base["config"]["epochs"]}
    res = base["resources"]
    run_training(cfg, res["num_workers"], res["use_gpu"], base["max_failures"], callbacks=[TuneReportCallback()])


def plan(params: dict, stores: Path, storage: Path) -> tuple[dict, list[dict]]:
    """The checked settings and one entry per search (name, runs, identity)."""
    from train.models import build_config
    from train.stages import HP_KEYS, params_hash, prepare_digest, site_run, train_config

    cfg = tune_config(params)
    tcfg = train_config(params)
    groups = [[c] for c in cfg["contrasts"]] if cfg["per_contrast"] else [list(cfg["contrasts"])]
    runs_of = {c: site_run({"arch": cfg["arch"], "contrast": c, "inputs": tcfg["inputs"], "stage": "pretrain"}, stores)
               for c in cfg["contrasts"]}
    first = runs_of[cfg["contrasts"][0]]
    if not first["val_stores"]:
        raise FileNotFoundError(f"{stores}: no prepared {first['site']} store in the validation split: a search "
                                "ranks trials by validation loss")
    data = [prepare_digest(p) for p in first["train_stores"] + first["val_stores"]]
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(
        list((Path(__file__).parent).glob("*.py")) + list((Path(__file__).parent.parent / "train").glob("*.py"))
    ))).hexdigest()[:16]
    # what the trials train with besides the suggestion: a resume with other train settings would
    # rank trials trained differently against each other (epochs and checkpoints are the search's)
    # compile changes how fast a trial trains, not what it learns
    train = {k: tcfg[k] for k in HP_KEYS if k not in ("epochs", "checkpoint_every", "compile")}
    if not train.get("ssim_weight"):
        # 0 trains as before the key existed: a search saved then still resumes
        train.pop("ssim_weight", None)
    train["inputs"] = tcfg["inputs"]
    train = json.loads(json.dumps(train, default=str))   # as read back from qsnet-search.json
    # the Ray Train workers of a trial: its DDP batch is batch_size x num_workers. Not its CPUs
    # per worker or max_concurrent: those change how fast the search runs, not what a trial learns
    workers = cfg["resources"]["num_workers"]
    searches = []
    for contrasts in groups:
        name = contrasts[0] if cfg["per_contrast"] else "shared"
        runs = [runs_of[c] for c in contrasts]
        identity = {"search": name, "arch": cfg["arch"], "contrasts": contrasts, "metric": cfg["metric"],
                    "mode": cfg["mode"], "epochs": cfg["epochs"], "seed": cfg["seed"],
                    # Tuner.restore keeps the first session's trial count and ASHA its rungs
                    "num_samples": cfg["num_samples"], "grace_period": cfg["grace_period"],
                    "reduction_factor": cfg["reduction_factor"],
                    "space": {k: list(v) for k, v in cfg["space"].items()}, "train": train,
                    "num_workers": workers,
                    # how a suggestion becomes train params (tune.space.to_train), versioned: a
                    # search before 2 trained a searched augmentation strength with the others on
                    "to_train": 2,
                    # what of the model is not searched (the norms' kind): other weights, other trials
                    "model": {k: v for k, v in build_config(cfg["arch"]).items()
                              if k not in ("width", "depth", "in_channels", "out_channels")},
                    "data": params_hash(data)}
        identity["digest"] = params_hash(identity)
        # recorded, not compared: a fix to the code does not make an interrupted search foreign
        identity["code"] = code
        searches.append({"name": name, "dir": Path(storage).resolve() / name, "runs": runs, "identity": identity})
    return {**cfg, "train": tcfg}, searches


def _state(search: dict) -> tuple[str, str]:
    """What the search's folder holds, and why: 'missing', 'other' (another search, or an
    unreadable identity), 'unstarted' (no Ray Tune state yet), 'resume' or 'done'."""
    from ray.tune import Tuner

    d = search["dir"]
    ident = d / IDENTITY
    if not ident.exists():
        return "missing", f"no {IDENTITY}"
    try:
        theirs = json.loads(ident.read_text())
    except ValueError as exc:
        return "other", f"{ident}: unreadable ({exc})"
    if not isinstance(theirs, dict) or theirs.get("digest") != search["identity"]["digest"]:
        diff = _differences(theirs if isinstance(theirs, dict) else {}, search["identity"])
        return "other", f"a different search (differs from params in: {', '.join(diff) or 'identity'})"
    if (d / "done.json").exists():
        return "done", "finished"
    if not Tuner.can_restore(str(d)):
        return "unstarted", "no Ray Tune experiment state to resume (was it started?)"
    return "resume", "unfinished"


def _check_resume(search: dict) -> str:
    """'missing', 'resume' or 'done' for ``resume=True``; a foreign experiment is an error."""
    state, why = _state(search)
    d = search["dir"]
    if state == "other":
        raise SearchError(f"{d}: {why}; will not resume it; run `qsnet tune` without --resume (it sets this "
                          "folder aside and starts afresh)")
    if state == "unstarted":
        raise SearchError(f"{d}: {why}")
    return state


def _default_mode(search: dict, progress=None) -> str:
    """'done', 'resume' or 'fresh': what a run without --resume or --fresh does with the folder."""
    state, why = _state(search)
    if state in ("done", "resume"):
        return state
    if state != "missing" and progress:
        progress(f"tune: search {search['name']}: {why}; set aside, a new search starts")
    return "fresh"


def _differences(theirs: dict, ours: dict) -> list[str]:
    """The identity's keys that differ, a dict's own keys named (``train.width``)."""
    diff = []
    for k in sorted(ours):
        if k in ("digest", "code") or theirs.get(k) == ours[k]:
            continue
        a, b = theirs.get(k), ours[k]
        if isinstance(a, dict) and isinstance(b, dict) and k != "space":
            diff += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        else:
            diff.append(k)
    return diff


def _fresh(search: dict) -> None:
    d = search["dir"]
    if d.exists():
        # an earlier search of this name is kept beside, never deleted (nor renamed onto an
        # earlier one set aside in the same second)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = d.with_name(f"{d.name}.previous-{stamp}")
        n = 1
        while aside.exists():
            aside = d.with_name(f"{d.name}.previous-{stamp}-{n}")
            n += 1
        d.rename(aside)
    d.mkdir(parents=True)
    _atomic(d / IDENTITY, json.dumps(search["identity"], indent=1, sort_keys=True) + "\n")


def trainable_for(cfg: dict, search: dict):
    """The search's function trainable, its fixed inputs bound and its resources set."""
    from ray import tune

    from train.stages import HP_KEYS

    res = dict(cfg["resources"])
    if res["use_gpu"] == "auto":
        from train.distributed import check_cluster

        # the cluster's GPUs, not this process's: under `qsnet submit` the driver runs on a
        # head node without any, and every trial would have trained on CPU
        res["use_gpu"] = check_cluster(int(res.get("num_workers", 1)), "auto")
    t = cfg["train"]
    base = {"train": t, "runs": search["runs"], "resources": res, "max_failures": t["max_failures"],
            "config": {**{k: t[k] for k in HP_KEYS}, "epochs": cfg["epochs"], "storage": str(search["dir"] / "train"),
                       "cpus_per_worker": None if res["use_gpu"] else res["cpus_per_worker"],
                       "torch_threads": res["cpus_per_worker"]}}
    trainable = tune.with_parameters(_trial, base=base)
    # the trial only waits on its TorchTrainer, whose workers hold the CPUs/GPUs: it reserves a
    # little memory and no CPU (Tune refuses an empty request), or two trials on two CPUs would
    # leave no CPU for their workers
    return tune.with_resources(trainable, {"CPU": 0, "memory": 256 * 2 ** 20})


def _one(cfg: dict, search: dict, mode: str, progress=None) -> dict:
    from ray import tune

    from train.distributed import _init
    from tune.resumable import ResumableASHA, TrialEvents

    # Tune kills a stopped trial's actor, and with it the trial's Ray Train controller: without
    # the dashboard's state API, Train never frees that run's CPUs and the next trials wait forever
    _init(dashboard=True)
    d = search["dir"]
    trainable = trainable_for(cfg, search)
    max_t = cfg["epochs"] * len(search["runs"])
    if mode == "resume":
        tuner = tune.Tuner.restore(str(d), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(cfg, d / JOURNAL, study_name=search["name"]),
                scheduler=ResumableASHA(str(d / "asha.pkl"), time_attr=EPOCHS, max_t=max_t,
                                        grace_period=min(cfg["grace_period"], max_t),
                                        reduction_factor=cfg["reduction_factor"]),
                metric=cfg["metric"], mode=cfg["mode"], num_samples=cfg["num_samples"],
                max_concurrent_trials=cfg["max_concurrent"]),
            run_config=tune.RunConfig(name=d.name, storage_path=str(d.parent), callbacks=[TrialEvents(d / EVENTS)],
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)))
    if progress:
        progress(f"tune: search {search['name']}: {'resuming' if mode == 'resume' else 'starting'} "
                 f"({cfg['num_samples']} trials, {cfg['max_concurrent']} at a time, up to {max_t} epochs each)")
    grid = tuner.fit()
    return _collect(cfg, search, grid, max_t)


def _ended(search: dict) -> dict[str, set]:
    """The trials by their latest event ("start", "complete", "error")."""
    latest: dict[str, str] = {}
    path = search["dir"] / EVENTS
    if path.exists():
        # a trial that errored and was re-run by --resume has an older "error" than its later
        # "complete": only its last event (the file is appended in order) says how it ended
        for line in path.read_text().splitlines():
            e = json.loads(line)
            latest[e["trial"]] = e["event"]
    ended: dict[str, set] = {}
    for trial, event in latest.items():
        ended.setdefault(event, set()).add(trial)
    return ended


def _collect(cfg: dict, search: dict, grid, max_t: int) -> dict:
    ended = _ended(search)
    rows = []
    for r in grid:
        m = r.metrics or {}
        folder = Path(r.path).name if r.path else ""
        tid = m.get("trial_id") or folder
        # Tune numbers a trial's folder in the order the searcher suggested it: _trial_<id>_<n>_...
        order = re.match(r"^_?\w*?_[0-9a-f]{5,}_(\d+)_", folder)
        it = int(m.get(EPOCHS) or m.get("training_iteration") or 0)
        if r.error or tid in ended.get("error", ()):
            status = "error"
        elif tid not in ended.get("complete", ()):
            status = "unfinished"   # running or pending when the search was interrupted
        else:
            status = "finished" if it >= max_t else "stopped_early"
        rows.append({"search": search["name"], "order": int(order.group(1)) if order else None,
                     "trial_id": tid, "status": status, "epochs": it,
                     cfg["metric"]: m.get(cfg["metric"]), "val_l1": m.get("val_l1"),
                     "seconds": round(float(m.get("time_total_s") or 0.0), 1),
                     "error": first_line(r.error)[:200] if r.error else "",
                     **{f"config/{k}": v for k, v in sorted((r.config or {}).items())}})
    rows.sort(key=lambda row: (row["order"] is None, row["order"] or 0, row["trial_id"]))
    return {"rows": rows, "complete": all(row["status"] != "unfinished" for row in rows)
            and len(rows) >= cfg["num_samples"]}


def _best(cfg: dict, rows: list[dict], max_t: int, n_models: int = 1) -> dict | None:
    scored = [r for r in rows if r[cfg["metric"]] is not None and math.isfinite(r[cfg["metric"]])
              and r["status"] != "error"]
    if n_models > 1:
        # a shared search's score is the mean over the models a trial has trained so far: a trial
        # ASHA stopped before its last model scored fewer (easier or harder) contrasts than a
        # finished one, so only trials that trained every contrast are compared
        scored = [r for r in scored if int(r["epochs"] or 0) >= max_t]
    if not scored:
        return None
    sign = 1 if cfg["mode"] == "min" else -1
    return min(scored, key=lambda r: sign * r[cfg["metric"]])


def _figures(search: dict, reports: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances, as images."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    notes = []
    study = optuna.load_study(study_name=search["name"],
                              storage=JournalStorage(JournalFileBackend(str(search["dir"] / JOURNAL))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for kind, fn in (("history", optuna.visualization.matplotlib.plot_optimization_history),
                         ("importance", optuna.visualization.matplotlib.plot_param_importances)):
            try:
                ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
                fig.set_size_inches(7, 4)
                fig.tight_layout()
                fig.savefig(reports / f"{kind}-{search['name']}.png", dpi=90)
                plt.close(fig)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need two finished trials
                notes.append(f"{kind}-{search['name']}: not drawn ({first_line(exc)})")
    return notes


def run_search(params: dict, stores: Path, out: Path, reports: Path, storage: Path, resume: bool = False,
               force: bool = False, progress=None, fresh: bool = False) -> dict:
    """Run the searches of params (reusing a finished one and resuming an unfinished one of the
    same identity; ``fresh``: always anew; ``resume``: only continue); write best.yaml and the report.

    With ``tune.enabled: false`` (and none of ``force``, ``resume``, ``fresh``) no search runs:
    best.yaml says so and the training stages use the profile's own params. Returns the summary."""
    out, reports = Path(out), Path(reports)
    if resume and fresh:
        raise SearchError("--resume and --fresh contradict each other: give one")
    raw = params.get("tune") if isinstance(params.get("tune"), dict) else {}
    if not (raw.get("enabled") or force or resume or fresh):
        _write_outputs(out, reports, {"searched": False, "profile": params.get("profile"),
                                      "note": "tune.enabled is false in params: the training stages use the "
                                              "profile's own train params"}, [], {"searched": False})
        return {"searched": False}
    cfg, searches = plan(params, stores, storage)
    if fresh:
        modes = {s["name"]: "fresh" for s in searches}
    elif resume:
        modes = {s["name"]: _check_resume(s) for s in searches}
    else:
        modes = {s["name"]: _default_mode(s, progress) for s in searches}
    if resume:
        if all(m == "missing" for m in modes.values()):
            raise SearchError(f"{Path(storage).resolve()}: no search to resume here (no {IDENTITY} of these params); "
                              "run `qsnet tune --enable` (without --resume) to start one")
        # the searches of a plan run one after another: one interrupted during an earlier search
        # has no folder yet for the later ones, which start now (the earlier ones' trials are kept)
        modes = {name: "fresh" if m == "missing" else m for name, m in modes.items()}
    all_rows, best_doc, notes = [], {}, []
    for s in searches:
        if modes[s["name"]] == "done":
            try:
                result = json.loads((s["dir"] / "done.json").read_text())
            except ValueError as exc:
                raise SearchError(f"{s['dir'] / 'done.json'}: unreadable ({exc}); delete it and run "
                                  "`qsnet tune` to collect the search again") from None
            if progress:
                progress(f"tune: search {s['name']}: finished earlier with these params; its "
                         f"{len(result['rows'])} trials reused, none run (`qsnet tune --fresh` searches again)")
        else:
            if modes[s["name"]] == "fresh":
                _fresh(s)
            result = _one(cfg, s, modes[s["name"]], progress)
            if not result["complete"]:
                n = sum(r["status"] != "unfinished" for r in result["rows"])
                raise Interrupted(f"search {s['name']} interrupted with {n} of {cfg['num_samples']} trials ended; "
                                  "continue it with `qsnet tune --resume` (or `qsnet tune`, `dvc repro`: a search "
                                  "of the same params resumes)")
            _atomic(s["dir"] / "done.json", json.dumps(result, indent=1, default=str) + "\n")
        all_rows.extend(result["rows"])
        best = _best(cfg, result["rows"], cfg["epochs"] * len(s["runs"]), len(s["runs"]))
        if best is None:
            raise SearchError(f"search {s['name']}: no trial finished with a {cfg['metric']} "
                              f"(see {reports / 'trials.csv'} and {s['dir']})")
        suggestion = {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("config/")}
        best_doc[s["name"]] = {"trial_id": best["trial_id"], cfg["metric"]: best[cfg["metric"]],
                               "epochs": best["epochs"], "suggested": suggestion,
                               "train": to_train(suggestion, cfg["train"])}
        reports.mkdir(parents=True, exist_ok=True)
        notes += _figures(s, reports)
    # the runs the values were searched for: the stages apply them there only (train.stages.tuned_hp),
    # not to other contrasts, other inputs or the scratch runs; the profile and the searches'
    # identities tell a stale file from this one
    doc = {"searched": True, "profile": params.get("profile"), "arch": cfg["arch"],
           "scope": {"contrasts": list(cfg["contrasts"]), "inputs": cfg["train"]["inputs"],
                     "stages": ["pretrain", "finetune"]},
           "metric": cfg["metric"], "mode": cfg["mode"], "per_contrast": cfg["per_contrast"]}
    if cfg["per_contrast"]:
        doc["train"] = {}
        doc["by_contrast"] = {name: b["train"] for name, b in best_doc.items()}
    else:
        doc["train"] = best_doc["shared"]["train"]
        doc["by_contrast"] = {}
    doc["scores"] = {name: {cfg["metric"]: b[cfg["metric"]], "trial_id": b["trial_id"], "epochs": b["epochs"]}
                     for name, b in best_doc.items()}
    doc["identity"] = {s["name"]: s["identity"]["digest"] for s in searches}
    summary = {"searched": True, "searches": best_doc, "trials": len(all_rows),
               "stopped_early": sum(r["status"] == "stopped_early" for r in all_rows),
               "errors": sum(r["status"] == "error" for r in all_rows), "notes": notes,
               "identity": {s["name"]: s["identity"] for s in searches}}
    _write_outputs(out, reports, doc, all_rows, summary)
    return summary


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        # on disk before the rename: after a crash the name holds the old text or the new, whole
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_outputs(out: Path, reports: Path, doc: dict, rows: list[dict], summary: dict) -> None:
    import io

    import yaml

    head = ("# Written by `qsnet tune`: the best configuration found, as train params. The pretrain and\n"
            "# finetune stages read it (`--tuned`) and apply it to the runs of its scope only (its arch,\n"
            "# contrasts and inputs); `searched: false` means they use the profile's params.\n")
    _atomic(out / "best.yaml", head + yaml.safe_dump(doc, sort_keys=False))
    reports.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys or ["search"])
    w.writeheader()
    w.writerows(rows)
    _atomic(reports / "trials.csv", buf.getvalue())
    _atomic(reports / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")


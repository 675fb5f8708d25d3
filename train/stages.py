"""The ``pretrain`` and ``finetune`` stages: which models to train on which data, and the registry.

- ``pretrain``: site A, healthy, training split (validation split for the plateau schedule
  and the best checkpoint); one model per (architecture, contrast) in params.
- ``finetune``: from the pretrained weights, site B (GBM) finetune split, the encoder frozen
  (no gradient, no optimiser state, unchanged bytes), decoder and discriminator trained.
  Architectures without a separable encoder (cgan, swin) are finetuned whole; their card says
  ``encoder_frozen: false``.
- ``extra_runs`` in params add the evaluation issue's models, e.g. site-A-only models with
  ``mri`` inputs, or QS-Net trained on site B from scratch (``stage: scratch``).

Each model lands in ``models/<stage>/<arch>/<contrast>/`` (weights + card), its per-epoch
curves in ``reports/train/<stage>/<arch>/<contrast>/plots/`` (dvclive: ``dvc plots show``) and
its summary in ``reports/train/<stage>.json`` (``dvc metrics show``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from ingest.params import ParamsError
from ingest.prepare.service import contract_mismatch, geometry_mismatch

__all__ = ["train_config", "run_stage", "STAGES"]

STAGES = ("pretrain", "finetune", "scratch")
CONTRASTS = ("t1w", "t2w", "t1flair", "t2flair", "swi")
DEFAULTS = {
    "archs": ["qsnet"], "contrasts": list(CONTRASTS), "inputs": "mrf", "width": 32, "epochs": 200,
    "batch_size": 1, "lr": 2e-4, "betas": [0.5, 0.999], "plateau_factor": 0.9, "plateau_after_epoch": 100,
    "ds_weights": [0.5, 0.25, 0.125, 0.0625], "adv_weight": 0.01, "ssim_weight": 0.0, "num_workers": 1, "use_gpu": "auto",
    "checkpoint_every": 1, "max_failures": 1, "augment": True, "loader_workers": 0, "amp": True,
    "extra_runs": [], "finetune_epochs": None, "parallel_runs": 1, "lr_d": None, "depth": 6, "ema_decay": 0.0,
    "compile": False,
}
# the training hyperparameters a Ray Train run carries (train.distributed reads them)
HP_KEYS = ("width", "depth", "epochs", "batch_size", "lr", "lr_d", "betas", "plateau_factor", "plateau_after_epoch",
           "ds_weights", "adv_weight", "ssim_weight", "augment", "checkpoint_every", "loader_workers", "amp", "seed",
           "ema_decay", "compile")
# what a tuned configuration (``qsnet tune``'s best.yaml) may set, per architecture and contrast
AUGMENT_KEYS = frozenset({"rotate_deg", "elastic_px", "noise"})  # train.data.Augment's strengths
TUNABLE = ("lr", "lr_d", "betas", "adv_weight", "ssim_weight", "ds_weights", "width", "depth", "augment", "plateau_factor",
           "plateau_after_epoch", "batch_size")
# (site, training split, validation split) per stage
DATA = {"pretrain": ("site-A", "train", "val"), "finetune": ("site-B", "finetune", "val"),
        "scratch": ("site-B", "finetune", "val")}


def train_config(params: dict) -> dict:
    """The profile's train section over the defaults, checked: a bad value fails here, in one line."""
    from train.models import ARCHITECTURES

    raw = params.get("train") or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params: train must be a mapping, got {type(raw).__name__}")
    # a misspelt key would otherwise train silently with the default it meant to change
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ParamsError(f"params: unknown train key(s) {unknown} (known: {', '.join(sorted(DEFAULTS))})")
    cfg = {**DEFAULTS, **raw}
    for key in ("archs", "contrasts"):
        if not isinstance(cfg[key], list) or not cfg[key]:
            raise ParamsError(f"params: train.{key} must be a non-empty list, got {cfg[key]!r}")
    bad = [a for a in cfg["archs"] if a not in ARCHITECTURES]
    if bad:
        raise ParamsError(f"params: unknown architecture(s) {bad} (known: {', '.join(ARCHITECTURES)})")
    bad = [c for c in cfg["contrasts"] if c not in CONTRASTS]
    if bad:
        raise ParamsError(f"params: unknown contrast(s) {bad} (known: {', '.join(CONTRASTS)})")
    if cfg["inputs"] not in ("mrf", "mri"):
        raise ParamsError(f"params: train.inputs must be mrf or mri, got {cfg['inputs']!r}")
    if cfg["finetune_epochs"] is None:
        cfg["finetune_epochs"] = cfg["epochs"]
    for key in ("epochs", "finetune_epochs", "num_workers", "checkpoint_every", "parallel_runs"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ParamsError(f"params: train.{key} must be a positive integer, got {cfg[key]!r}")
    for key in ("max_failures", "loader_workers"):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise ParamsError(f"params: train.{key} must be a whole number, 0 or more, got {cfg[key]!r}")
    check_hp({k: cfg[k] for k in HP_KEYS if k in cfg}, "params: train")
    use_gpu = _use_gpu(check_use_gpu(cfg["use_gpu"], "params: train.use_gpu"))
    cpus = os.cpu_count() or 1
    # on a cluster the check is against the cluster's CPUs, once it is joined (train.distributed)
    if use_gpu is False and not os.environ.get("RAY_ADDRESS") and cfg["num_workers"] * cfg["parallel_runs"] > cpus:
        raise ParamsError(f"params: train.num_workers {cfg['num_workers']} x parallel_runs {cfg['parallel_runs']} "
                          f"> {cpus} CPUs and no GPU: each Ray worker needs a CPU")
    if not isinstance(cfg["extra_runs"], list):
        raise ParamsError(f"params: train.extra_runs must be a list, got {cfg['extra_runs']!r}")
    for run in cfg["extra_runs"]:
        if (not isinstance(run, dict) or set(run) - {"arch", "inputs", "stage", "contrasts"}
                or run.get("stage", "pretrain") not in STAGES or run.get("arch", "qsnet") not in ARCHITECTURES
                or run.get("inputs", "mrf") not in ("mrf", "mri")
                or not isinstance(run.get("contrasts", []), list)
                or any(c not in CONTRASTS for c in run.get("contrasts", []))):
            raise ParamsError(f"params: bad train.extra_runs entry {run!r} (keys: arch, inputs mrf/mri, "
                              f"stage {'/'.join(STAGES)}, contrasts)")
    cfg["use_gpu"] = use_gpu
    cfg["seed"] = int(params.get("seed", 0))
    return cfg


def read_tuned(path: Path | None, params: dict | None = None) -> dict:
    """The overrides of a tuned configuration: ``{"arch", "scope", "train": {...}, "by_contrast":
    {c: {...}}}``, empty when no search ran (``searched: false``) or no file is given. With
    ``params``, a file written for another profile, or for an architecture params do not train, is
    refused: its values would be applied to models they were never searched for, or to none."""
    from ingest.params import read_mapping

    if path is None:
        return {}
    path = Path(path)
    doc = read_mapping(path, "tuned configuration")
    if not doc.get("searched"):
        return {}
    parts = [doc.get("train") or {}, *(doc.get("by_contrast") or {}).values()]
    bad = sorted({k for part in parts for k in part if k not in TUNABLE})
    if bad:
        raise ParamsError(f"{path}: keys {bad} cannot be tuned (tunable: {', '.join(TUNABLE)})")
    from train.models import ARCHITECTURES

    if doc.get("arch") not in ARCHITECTURES:
        raise ParamsError(f"{path}: unknown architecture {doc.get('arch')!r}")
    check_hp(doc.get("train") or {}, f"{path}: train")
    for c, part in (doc.get("by_contrast") or {}).items():
        check_hp(part or {}, f"{path}: by_contrast.{c}")
    scope = _tuned_scope(doc, path)
    if params is not None:
        if doc.get("profile") is not None and doc["profile"] != params.get("profile"):
            raise ParamsError(f"{path}: searched for profile {doc['profile']!r}, not {params.get('profile')!r}: "
                              "run `qsnet tune` with this profile (or give the other profile's best.yaml)")
        archs = (params.get("train") or {}).get("archs", DEFAULTS["archs"])
        if doc["arch"] not in archs:
            raise ParamsError(f"{path}: searched for architecture {doc['arch']}, which params' train.archs "
                              f"{archs} does not train: run `qsnet tune` again with these params")
    return {"arch": doc["arch"], "scope": scope, "train": doc.get("train") or {},
            "by_contrast": doc.get("by_contrast") or {}, "file": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _tuned_scope(doc: dict, path: Path) -> dict | None:
    """The runs a best.yaml's values are for (contrasts, inputs, stages), checked; None for a file
    written before `qsnet tune` recorded it, whose values go, as they did then, to every run of
    its architecture."""
    scope = doc.get("scope")
    if scope is None:
        return None
    if (not isinstance(scope, dict) or set(scope) != {"contrasts", "inputs", "stages"}
            or not isinstance(scope["contrasts"], list) or not set(scope["contrasts"]) <= set(CONTRASTS)
            or scope["inputs"] not in ("mrf", "mri")
            or not isinstance(scope["stages"], list) or not set(scope["stages"]) <= set(STAGES)):
        raise ParamsError(f"{path}: scope must map contrasts (of {', '.join(CONTRASTS)}), inputs (mrf or mri) and "
                          f"stages (of {', '.join(STAGES)}), got {scope!r}")
    outside = sorted(set(doc.get("by_contrast") or {}) - set(scope["contrasts"]))
    if outside:
        raise ParamsError(f"{path}: by_contrast names {outside}, outside its scope's contrasts {scope['contrasts']}")
    return scope


def tuned_hp(tuned: dict, run: dict) -> dict:
    """The tuned values for ``run`` (arch, contrast, inputs, stage): those of its search when the
    run is in the file's scope, else none. Pretrain and finetune of a searched arch, contrast and
    inputs take them (finetune must build the model pretrain built); runs with other inputs and
    the scratch runs (site B from random weights) were never searched: they keep the profile's."""
    if not tuned or tuned["arch"] != run["arch"]:
        return {}
    scope = tuned.get("scope")
    if scope is not None and (run["contrast"] not in scope["contrasts"] or run["inputs"] != scope["inputs"]
                              or run["stage"] not in scope["stages"]):
        return {}
    return {**tuned["train"], **tuned["by_contrast"].get(run["contrast"], {})}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)   # YAML's true is not 1 epoch


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_hp(hp: dict, where: str) -> None:
    """Training hyperparameters of the right type and range, else one line naming ``where``.
    Checked for params and for a tuned configuration alike: a string lr would otherwise reach
    the optimiser, and a string ``false`` would read as true."""
    def bad(key, want):
        raise ParamsError(f"{where}.{key} must be {want}, got {hp[key]!r}")

    for key in ("width", "batch_size"):
        if key in hp and (not _is_int(hp[key]) or hp[key] < 1):
            bad(key, "a positive integer")
    if "depth" in hp and (not _is_int(hp["depth"]) or not 3 <= hp["depth"] <= 8):
        bad("depth", "a whole number of U-Net levels, 3 to 8")
    if "plateau_after_epoch" in hp and (not _is_int(hp["plateau_after_epoch"]) or hp["plateau_after_epoch"] < 0):
        bad("plateau_after_epoch", "a whole number, 0 or more")
    if "lr" in hp and (not _is_num(hp["lr"]) or hp["lr"] <= 0):
        bad("lr", "a positive number")
    if hp.get("lr_d") is not None and (not _is_num(hp["lr_d"]) or hp["lr_d"] <= 0):
        bad("lr_d", "a positive number, or null for lr")
    if "betas" in hp and (not isinstance(hp["betas"], (list, tuple)) or len(hp["betas"]) != 2
                          or not all(_is_num(b) and 0 <= b < 1 for b in hp["betas"])):
        bad("betas", "two numbers in [0, 1), e.g. [0.5, 0.999]")
    if "plateau_factor" in hp and (not _is_num(hp["plateau_factor"]) or not 0 < hp["plateau_factor"] <= 1):
        bad("plateau_factor", "a number in (0, 1]")
    for key in ("adv_weight", "ssim_weight"):
        if key in hp and (not _is_num(hp[key]) or hp[key] < 0):
            bad(key, "a number, 0 or more")
    if "ds_weights" in hp and (not isinstance(hp["ds_weights"], (list, tuple))
                               or not all(_is_num(w) and w >= 0 for w in hp["ds_weights"])):
        bad("ds_weights", "a list of numbers, 0 or more (one per deep-supervision head)")
    if "ema_decay" in hp and (not _is_num(hp["ema_decay"]) or not 0 <= hp["ema_decay"] < 1):
        bad("ema_decay", "in [0, 1) (0: no average)")
    for key in ("amp", "compile"):
        if key in hp and not isinstance(hp[key], bool):
            bad(key, "true or false")
    # a tuned configuration names its augmentation strengths (tune.space.to_train)
    aug = hp.get("augment")
    if "augment" in hp and not isinstance(aug, bool) and not (
            isinstance(aug, dict) and set(aug) <= AUGMENT_KEYS
            and all(_is_num(v) and v >= 0 for v in aug.values())):
        bad("augment", f"true, false or a mapping of {', '.join(sorted(AUGMENT_KEYS))} to numbers, 0 or more")


def check_use_gpu(v, where: str) -> bool | str:
    """``true``, ``false`` or ``auto``: a quoted "false" is truthy, and would ask for a GPU."""
    if v == "auto" or isinstance(v, bool):
        return v
    raise ParamsError(f"{where} must be true, false or auto, got {v!r}")


def _use_gpu(v) -> bool | str:
    if v == "auto":
        if os.environ.get("RAY_ADDRESS"):
            return "auto"  # decided against the cluster's GPUs once it is joined (a CPU head has none)
        import torch

        return torch.cuda.is_available()
    return bool(v)


def params_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _runs(stage: str, cfg: dict) -> list[dict]:
    runs = []
    if stage in ("pretrain", "finetune"):
        runs = [{"arch": a, "contrast": c, "inputs": cfg["inputs"], "stage": stage}
                for a in cfg["archs"] for c in cfg["contrasts"]]
    for extra in cfg["extra_runs"]:
        s = extra.get("stage", "pretrain")
        if s == stage or (stage == "finetune" and s == "scratch"):
            for c in extra.get("contrasts", cfg["contrasts"]):
                runs.append({"arch": extra.get("arch", "qsnet"), "contrast": c,
                             "inputs": extra.get("inputs", cfg["inputs"]), "stage": s})
    return runs


def _folder(root: Path, run: dict) -> Path:
    name = run["arch"] if run["inputs"] == "mrf" else f"{run['arch']}-mri"
    return root / run["stage"] / name / run["contrast"]


def run_stage(stage: str, params: dict, stores, models, reports, storage,
              progress=None, tuned: Path | None = None) -> list[Path]:
    """Train every model of ``stage`` in one Ray Train run; returns the model card paths.
    ``tuned``: a search's best.yaml, whose values replace the profile's for the runs it searched (``tuned_hp``).
    ``stores``, ``models``, ``reports`` and ``storage`` may be fsspec URLs (``s3://...``): stores
    are read in place, models and reports written locally and uploaded when the stage succeeds,
    ``storage`` is Ray Train's run storage (every node reads and writes it)."""
    from ingest import storage as st
    from train.distributed import check_cluster

    if stage not in ("pretrain", "finetune"):
        raise ParamsError(f"unknown stage {stage!r}")
    cfg = train_config(params)
    read_tuned(tuned, params)  # a best.yaml of another profile or architecture fails before Ray starts
    for loc in (stores, models, reports, storage):
        st.check_access(str(loc), write=loc is not stores)
    # before any data is read: params that ask for GPUs the cluster lacks fail here, in one line
    cfg["use_gpu"] = check_cluster(cfg["num_workers"], cfg["use_gpu"])
    # finetune reads the pretrained cards from the same registry it writes to
    with st.staged(models, download=stage == "finetune") as models_dir, st.staged(reports) as reports_dir:
        cards = _run_stage(stage, params, cfg, stores, models_dir, reports_dir, storage, progress, tuned)
        # where the cards are once the block has uploaded them (the local folder goes)
        return [st.join(models, Path(c).relative_to(models_dir).as_posix()) if st.is_url(models) else c
                for c in cards]


def pretrained_mismatch(card: dict, arch: str, width: int, depth: int) -> str | None:
    """Why a pretrained model's weights do not fit the model finetune builds from params, or None.
    The workers would otherwise fail at loading them, with a wall of missing keys."""
    from train import registry
    from train.models import build_config, weight_layout

    have = weight_layout(registry.card_build(card))
    want = weight_layout(build_config(arch, 2, 1, width=width, depth=depth))
    diff = [f"{k} {have.get(k)!r} (params: {v!r})" for k, v in want.items() if have.get(k) != v]
    return f"pretrained with {', '.join(diff)}: run pretrain again" if diff else None


def _run_stage(stage, params, cfg, stores, models: Path, reports: Path, storage, progress, tuned) -> list[Path]:
    from ingest import storage as st
    from train import registry
    from train.distributed import run_parallel
    from train.models import build, depth_fits

    tuned_doc = read_tuned(tuned, params)
    run_storage = str(storage) if st.is_url(storage) else str(Path(storage).resolve())
    runs, key = [], []
    for run in _runs(stage, cfg):
        r = site_run(run, stores)
        r["hp"] = tuned_hp(tuned_doc, run)
        init_sha = None
        if run["stage"] == "finetune":
            card = registry.read_card(_folder(models, {**run, "stage": "pretrain"}) / "card.json")
            registry.load(card)  # checks the weights' hash before anything trains on them
            rc = {**cfg, **r["hp"]}
            why = pretrained_mismatch(card, run["arch"], rc["width"], rc["depth"])
            if why:
                raise ParamsError(f"{card['_path']}: {why}")
            # only MRF inputs are scaled by the contract; the geometry holds for either kind
            check = contract_mismatch if run["inputs"] == "mrf" else geometry_mismatch
            why = check(card.get("input"), _store_attr(r["train_stores"][0], "input_contract"))
            if why:
                raise ParamsError(f"{card['_path']}: {why}")
            init_sha = card["weights_sha256"]
            # in the run storage, which every node reads: the registry may be a folder on this node only
            r["init_weights"] = str(st.join(run_storage, "init", f"{init_sha}.pt"))
            if not st.exists(r["init_weights"]):
                st.write_bytes(r["init_weights"], (Path(card["_path"]).parent / card["weights"]).read_bytes())
            r["freeze_encoder"] = run["arch"] in ("qsnet", "resunet")
        runs.append(r)
        key.append("".join(prepare_digest(p) for p in r["train_stores"] + r["val_stores"]))
        if init_sha:
            key.append(init_sha)
    import zarr

    size = min(zarr.open_group(str(r["train_stores"][0]), mode="r")["brain"].shape[-1] for r in runs)
    depth = max([cfg["depth"]] + [r["hp"].get("depth", 0) for r in runs])
    if not depth_fits(size, depth):
        raise ParamsError(f"prepared images are {size} x {size}: a {depth}-level U-Net needs at least "
                          f"{2 ** depth} x {2 ** depth}, a multiple of {2 ** (depth - 1)} (params prepare.image_size)")
    hp = {k: cfg[k] for k in HP_KEYS}
    if stage == "finetune":  # site B's finetune split is smaller than site A's: more epochs, similar steps
        hp["epochs"] = cfg["finetune_epochs"]
    # the run's name carries a hash of everything it trains on and of the training code: an
    # interrupted run with the same inputs resumes from its checkpoint, a changed one starts afresh
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()
    digest = hashlib.sha256(json.dumps([hp, runs, key, code], sort_keys=True).encode()).hexdigest()[:12]
    config = {**hp, "name": f"{stage}-{digest}", "storage": run_storage, "runs": runs,
              "torch_threads": max(1, (os.cpu_count() or 1) // cfg["num_workers"])}
    if stage == "finetune":  # the stage's outputs exist even when params list no scratch run
        for root in (models, reports):
            (root / "scratch").mkdir(parents=True, exist_ok=True)
    done = run_parallel(config, cfg["num_workers"], cfg["use_gpu"], cfg["max_failures"], cfg["parallel_runs"])
    cards = []
    for run in runs:
        res = done[run["name"]]
        rc = {**cfg, **run["hp"]}
        model = build(run["arch"], in_channels=2, out_channels=1, width=rc["width"], depth=rc["depth"])
        model.generator.load_state_dict(res["best"]["state"])
        card = registry.save(models / run["name"], model.generator, {
            "architecture": run["arch"], "build": model.config, "contrast": run["contrast"],
            "inputs": run["inputs"], "stage": run["stage"], "profile": params.get("profile"),
            "params_hash": params_hash({**cfg, "tuned": run["hp"]} if run["hp"] else cfg),
            "data_version": registry.data_version(),
            "git_commit": registry.git_commit(), "encoder_frozen": run["freeze_encoder"],
            "trained_on": {"site": run["site"], "split": run["split"], "exams": len(run["train_stores"]),
                           "val_exams": len(run["val_stores"])},
            # how its input is made from two MRF maps (prepare's input contract): what serve reproduces
            "input": _store_attr(run["train_stores"][0], "input_contract"),
            "ray_run": config["name"], "best_epoch": res["best"]["epoch"],
            "validation": {"val_l1": res["best"]["val"] if math.isfinite(res["best"]["val"]) else None},
            "epochs": len(res["history"]),
            "tuned": ({"file": tuned_doc["file"], "sha256": tuned_doc["sha256"], "hp": run["hp"]}
                      if run["hp"] else None),
        })
        _dvclive(reports / run["name"], res["history"])
        cards.append(card)
        if progress:
            progress(card)
    summary = {}
    for c in cards:
        doc = registry.read_card(c)
        summary[str(Path(c).parent.relative_to(models))] = {
            "val_l1": doc["validation"]["val_l1"], "best_epoch": doc["best_epoch"], "epochs": doc["epochs"],
            "parameter_count": doc["parameter_count"], "encoder_frozen": doc["encoder_frozen"]}
    out = reports / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return cards


def site_run(run: dict, stores: Path) -> dict:
    """``run`` (arch, contrast, inputs, stage) with its site's training and validation stores
    (``DATA``): one model of a Ray Train run, from random weights, nothing frozen, no tuned values."""
    from ingest.storage import is_url
    from train.data import find_stores

    def absolute(p) -> str:  # workers have their own working directory
        return str(p) if is_url(p) else str(Path(p).resolve())

    site, tsplit, vsplit = DATA[run["stage"]]
    train_stores = find_stores(stores, splits=[tsplit], sites=[site])
    if not train_stores:
        raise FileNotFoundError(f"{stores}: no prepared {site} store in split {tsplit!r} "
                                "(run `qsnet prepare`, or see the splits in reports/prepare.json)")
    return {**run, "name": _folder(Path(""), run).as_posix(), "site": site, "split": tsplit,
            "train_stores": [absolute(p) for p in train_stores],
            "val_stores": [absolute(p) for p in find_stores(stores, splits=[vsplit], sites=[site])],
            "init_weights": None, "freeze_encoder": False, "hp": {}}


def _store_attr(store, key: str, default=None):
    from ingest import storage

    try:
        return storage.read_json(storage.join(store, "zarr.json"))["attributes"].get(key, default)
    except (OSError, ValueError, KeyError):
        return default


def prepare_digest(store) -> str:
    return str(_store_attr(store, "prepare_digest", ""))


def _dvclive(out: Path, history: list[dict]) -> None:
    import tempfile

    from dvclive import Live

    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    # Live is opened from a folder outside the repository: this stage writes plain metrics and
    # plots files (no DVC experiment), and dvclive 3.49 fails inside a git repository that has
    # no commit yet (it asks for HEAD before checking for one)
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as neutral:
        os.chdir(neutral)
        try:
            _log(Live, out, history)
        finally:
            os.chdir(here)


def _log(Live, out: Path, history: list[dict]) -> None:  # noqa: N803 - the class, passed in
    with Live(dir=str(out), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for row in history:
            for key in ("val_l1", "train_l1", "train_loss_g", "train_loss_d", "lr", "epoch_s"):
                if row.get(key) is not None:
                    live.log_metric(key, row[key])
            live.next_step()
    # dvc.yaml's plots name each stage's folder, and DVC reads every file in it as a curve:
    # dvclive's last-epoch metrics.json there drew a warning per model. The stage's summary
    # (reports/train/<stage>.json) holds what a model ended with.
    (out / "metrics.json").unlink(missing_ok=True)

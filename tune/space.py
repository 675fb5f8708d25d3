"""The search space and the search settings, read from params (``<profile>.tune``), checked.

A space entry names one hyperparameter and its distribution::

    lr:          {loguniform: [1.0e-3, 3.0e-2]}
    beta1:       {uniform: [0.3, 0.9]}
    plateau_after_epoch: {randint: [1, 10]}     # inclusive bounds
    width:       {choice: [8, 12, 16]}

Names are the training knobs a search may move (``NAMES``); each maps onto the train section's
keys by :func:`to_train` (e.g. ``beta1`` and ``beta2`` into ``betas``, the augmentation
strengths into ``augment``), so a tuned configuration is a set of train params.
"""

from __future__ import annotations

import math

from ingest.params import ParamsError

__all__ = ["NAMES", "REPORTED", "distributions", "to_train", "tune_config"]

# hyperparameter -> what it sets in the train section
NAMES = {
    "lr": "generator learning rate", "lr_d": "discriminator learning rate",
    "beta1": "Adam beta1", "beta2": "Adam beta2",
    "adv_weight": "adversarial loss weight", "ssim_weight": "weight of (1 - SSIM) in the generator loss", "ds_weight": "first deep-supervision weight (the others halve)",
    "width": "channels of the first U-Net level", "depth": "U-Net levels",
    "rotate_deg": "augmentation: rotation (degrees)", "elastic_px": "augmentation: elastic displacement (pixels)",
    "noise": "augmentation: input noise (share of range)",
    "plateau_factor": "learning-rate factor on a plateau", "plateau_after_epoch": "first epoch the plateau rule acts",
    "batch_size": "batch size",
}
INTEGER = {"width", "depth", "plateau_after_epoch", "batch_size"}
# what a value must be for the trial to train at all: (test, what it must be)
VALID = {
    **{k: (lambda v: v >= 1, "at least 1") for k in INTEGER},
    "depth": (lambda v: 3 <= v <= 8, "3 to 8 U-Net levels (what the models build)"),
    "plateau_after_epoch": (lambda v: v >= 0, "0 or more"),
    "lr": (lambda v: v > 0, "> 0"), "lr_d": (lambda v: v > 0, "> 0"),
    "beta1": (lambda v: 0 < v < 1, "in (0, 1)"), "beta2": (lambda v: 0 < v < 1, "in (0, 1)"),
    "plateau_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    **{k: (lambda v: v >= 0, ">= 0") for k in ("adv_weight", "ssim_weight", "ds_weight", "rotate_deg", "elastic_px",
                                                 "noise")},
}
# what the trainable reports each epoch (train.distributed's metrics), so a search can rank by it
REPORTED = ("score", "val_l1", "train_l1", "train_loss_g")
KINDS = ("uniform", "loguniform", "randint", "choice")

DEFAULTS = {
    "enabled": False, "arch": "qsnet", "contrasts": ["t1flair"], "per_contrast": True, "metric": "score",
    "mode": "min", "num_samples": 8, "max_concurrent": 2, "epochs": 10, "grace_period": 2, "reduction_factor": 2,
    "seed": None, "resources": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": "auto"}, "space": {},
}


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tune_config(params: dict) -> dict:
    """The profile's tune section over the defaults, checked: a bad value fails in one line."""
    from train.models import ARCHITECTURES
    from train.stages import CONTRASTS

    raw = params.get("tune") or {}
    if not isinstance(raw, dict):
        raise ParamsError("params: tune must be a mapping")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ParamsError(f"params: unknown tune key(s) {unknown} (known: {', '.join(DEFAULTS)})")
    if not isinstance(raw.get("resources") or {}, dict):
        raise ParamsError(f"params: tune.resources must be a mapping, got {raw['resources']!r}")
    cfg = {**DEFAULTS, **raw, "resources": {**DEFAULTS["resources"], **(raw.get("resources") or {})}}
    for key in ("enabled", "per_contrast"):  # a quoted "false" is truthy: it would run a search
        if not isinstance(cfg[key], bool):
            raise ParamsError(f"params: tune.{key} must be true or false, got {cfg[key]!r}")
    if cfg["seed"] is not None and (not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool)):
        raise ParamsError(f"params: tune.seed must be a whole number or null, got {cfg['seed']!r}")
    if cfg["arch"] not in ARCHITECTURES:
        raise ParamsError(f"params: tune.arch {cfg['arch']!r} unknown (known: {', '.join(ARCHITECTURES)})")
    if not cfg["contrasts"] or any(c not in CONTRASTS for c in cfg["contrasts"]):
        raise ParamsError(f"params: tune.contrasts {cfg['contrasts']!r}: name one or more of {', '.join(CONTRASTS)}")
    if cfg["metric"] not in REPORTED:
        raise ParamsError(f"params: tune.metric {cfg['metric']!r} is never reported by the trainable "
                          f"(it reports: {', '.join(REPORTED)})")
    if cfg["mode"] not in ("min", "max"):
        raise ParamsError(f"params: tune.mode must be min or max, got {cfg['mode']!r}")
    if cfg["mode"] == "max":
        # every reported metric is a loss: max would pick the worst trial
        raise ParamsError(f"params: tune.mode max with tune.metric {cfg['metric']} (a loss, lower is better): "
                          "use mode min")
    if len(set(cfg["contrasts"])) != len(cfg["contrasts"]):
        raise ParamsError(f"params: tune.contrasts {cfg['contrasts']!r} names a contrast twice")
    for key in ("num_samples", "max_concurrent", "epochs", "grace_period", "reduction_factor"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ParamsError(f"params: tune.{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["reduction_factor"] < 2:
        raise ParamsError("params: tune.reduction_factor must be at least 2")
    if cfg["grace_period"] > cfg["epochs"]:
        raise ParamsError(f"params: tune.grace_period {cfg['grace_period']} > tune.epochs {cfg['epochs']}")
    res = cfg["resources"]
    unknown = sorted(set(res) - set(DEFAULTS["resources"]))
    if unknown:  # a misspelt key (cpu_per_worker) would run every trial with the default it meant to change
        raise ParamsError(f"params: unknown tune.resources key(s) {unknown} "
                          f"(known: {', '.join(DEFAULTS['resources'])})")
    for key in ("num_workers", "cpus_per_worker"):
        if not isinstance(res.get(key), int) or isinstance(res[key], bool) or res[key] < 1:
            raise ParamsError(f"params: tune.resources.{key} must be a positive integer, got {res.get(key)!r}")
    from train.stages import check_use_gpu

    check_use_gpu(res.get("use_gpu"), "params: tune.resources.use_gpu")
    cfg["space"] = parse_space(cfg["space"])
    if cfg["seed"] is None:
        cfg["seed"] = int(params.get("seed", 0))
    _check_against_train(cfg, params)
    return cfg


def _check_against_train(cfg: dict, params: dict) -> None:
    """What the search settings must agree on with the train and prepare sections, checked before
    any trial runs: a search whose winner no stage trains, or whose values a trial cannot use."""
    from train.stages import train_config

    tcfg = train_config(params)
    if cfg["arch"] not in tcfg["archs"]:
        raise ParamsError(f"params: tune.arch {cfg['arch']} is not in train.archs {tcfg['archs']}: no stage would "
                          "train with its tuned values")
    space = cfg["space"]
    if "depth" in space:
        from ingest.prepare.service import config as prepare_config
        from train.models import depth_fits

        size = prepare_config(params)["image_size"]
        for d in _values(space["depth"]):
            if not depth_fits(size, d):
                raise ParamsError(f"params: tune.space.depth: a {d}-level U-Net does not fit the prepared {size} x "
                                  f"{size} images (prepare.image_size: it needs at least {2 ** d} pixels, a multiple "
                                  f"of {2 ** (d - 1)})")
    if "plateau_factor" in space or "plateau_after_epoch" in space:
        latest = plateau_latest(cfg["epochs"])
        if "plateau_after_epoch" in space:
            worst = max(_values(space["plateau_after_epoch"]))
            where = "tune.space.plateau_after_epoch"
        else:
            worst = tcfg["plateau_after_epoch"]
            where = f"tune.space.plateau_factor (with train.plateau_after_epoch {worst})"
        if worst > latest:
            # a value the rule never reaches trains exactly as every other such value: a dimension
            # of pure noise for TPE, whose arbitrary "best" pretrain and finetune would then take
            key = "plateau_after_epoch" if "plateau_after_epoch" in space else "train.plateau_after_epoch"
            fix = (f"keep {key} at {latest} or less" if latest >= 0
                   else "leave plateau_factor and plateau_after_epoch out of the space")
            raise ParamsError(f"params: {where}: with plateau_after_epoch {worst} the plateau rule never changes a "
                              f"trial of {cfg['epochs']} epochs (tune.epochs): it lowers the learning rate at the end "
                              f"of epoch plateau_after_epoch + {_patience() + 2} at the soonest, and a later epoch "
                              f"must train with it; {fix}, or raise tune.epochs")


def _values(spec: tuple) -> list:
    """The values an integer dimension can take (the bounds of a randint)."""
    kind, args = spec
    return list(args) if kind in ("choice", "randint") else []


def _patience() -> int:
    import inspect

    from train.loop import Trainer

    # train.distributed builds every Trainer with its default patience
    return int(inspect.signature(Trainer).parameters["patience"].default)


def plateau_latest(epochs: int) -> int:
    """The largest ``plateau_after_epoch`` whose plateau rule can change a run of ``epochs``.

    train.loop steps ReduceLROnPlateau (patience p) at the end of each epoch after epoch
    ``plateau_after_epoch`` = a: its first step sets the best loss and only the (p + 1)-th worse
    one after it lowers the rate, at the end of epoch a + p + 2 at the soonest; the epoch after
    that must still train. So a <= epochs - p - 3."""
    return epochs - _patience() - 3


def parse_space(space) -> dict:
    """``{name: (kind, args)}``; an empty or malformed space is an error naming the entry."""
    if not isinstance(space, dict) or not space:
        raise ParamsError("params: tune.space is empty: name at least one hyperparameter and its distribution "
                          f"(e.g. lr: {{loguniform: [1.0e-4, 1.0e-2]}}; names: {', '.join(NAMES)})")
    out = {}
    for name, spec in space.items():
        if name not in NAMES:
            raise ParamsError(f"params: tune.space.{name}: not a tunable hyperparameter (known: {', '.join(NAMES)})")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ParamsError(f"params: tune.space.{name}: expected one of {{{', '.join(KINDS)}: ...}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ParamsError(f"params: tune.space.{name}: choice needs a non-empty list of values")
            # the range of each integer is VALID's, as for randint (plateau_after_epoch may be 0)
            if name in INTEGER and not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
                raise ParamsError(f"params: tune.space.{name}: choices must be whole numbers, got {args!r}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args):
                raise ParamsError(f"params: tune.space.{name}: choices must be numbers, got {args!r}")
            _check_values(name, args)
            out[name] = (kind, list(args))
            continue
        if (not isinstance(args, list) or len(args) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)):
            hint = ""
            if isinstance(args, list) and any(isinstance(v, str) and _number(v) for v in args):
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
            raise ParamsError(f"params: tune.space.{name}: {kind} needs [low, high], got {args!r}{hint}")
        low, high = args
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ParamsError(f"params: tune.space.{name}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ParamsError(f"params: tune.space.{name}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ParamsError(f"params: tune.space.{name}: randint needs integer bounds, got [{low}, {high}]")
        if name in INTEGER and kind != "randint":
            raise ParamsError(f"params: tune.space.{name} is an integer: use randint or choice")
        _check_values(name, [low, high])
        out[name] = (kind, [low, high])
    return out


def _check_values(name: str, values: list) -> None:
    ok, want = VALID[name]
    bad = [v for v in values if not ok(v)]
    if bad:
        raise ParamsError(f"params: tune.space.{name}: values must be {want}, got {bad[0]}")


def distributions(space: dict) -> dict:
    """Optuna distributions for ``OptunaSearch(space=...)``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dist = {}
    for name, (kind, args) in space.items():
        if kind == "choice":
            dist[name] = CategoricalDistribution(args)
        elif kind == "randint":
            dist[name] = IntDistribution(args[0], args[1])
        else:
            dist[name] = FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")
    return dist


def to_train(suggestion: dict, base: dict) -> dict:
    """A suggested configuration as train params (only the keys it sets), ``base`` the profile's
    train section (for the halves of a pair it does not move, e.g. beta2 when only beta1 is searched)."""
    hp: dict = {}
    for key in ("lr", "lr_d", "adv_weight", "ssim_weight", "plateau_factor"):
        if key in suggestion:
            hp[key] = float(suggestion[key])
    for key in ("width", "depth", "plateau_after_epoch", "batch_size"):
        if key in suggestion:
            hp[key] = int(suggestion[key])
    if "beta1" in suggestion or "beta2" in suggestion:
        b1, b2 = base.get("betas", [0.5, 0.999])
        hp["betas"] = [float(suggestion.get("beta1", b1)), float(suggestion.get("beta2", b2))]
    if "ds_weight" in suggestion:
        n = len(base.get("ds_weights") or [0.5, 0.25, 0.125, 0.0625])
        hp["ds_weights"] = [float(suggestion["ds_weight"]) * 0.5 ** i for i in range(n)]
    searched = {k: float(suggestion[k]) for k in ("rotate_deg", "elastic_px", "noise") if k in suggestion}
    if searched:
        # every strength written out: a mapping's missing keys take Augment's defaults, so a searched
        # noise alone would switch rotation and deformation on where the profile has them off
        hp["augment"] = {**profile_augment(base), **searched}
    return hp


def profile_augment(base: dict) -> dict:
    """The augmentation strengths the train section ``base`` trains with (all 0 when it is off)."""
    import inspect

    from train.data import Augment
    from train.stages import AUGMENT_KEYS, DEFAULTS

    aug = base.get("augment", DEFAULTS["augment"])
    if not aug:
        return {k: 0.0 for k in sorted(AUGMENT_KEYS)}
    sig = inspect.signature(Augment).parameters
    given = aug if isinstance(aug, dict) else {}
    return {k: float(given.get(k, sig[k].default)) for k in sorted(AUGMENT_KEYS)}

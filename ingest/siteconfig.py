"""Site configuration files: one YAML per site, shared by the phantom and by ingest."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml

ROLES = ("mrf_t1", "mrf_t2", "t1w", "t2w", "t1flair", "t2flair", "swi")


class SiteConfigError(ValueError):
    pass


def builtin_sites() -> list[str]:
    files = resources.files("ingest.sites")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_site(name_or_path: str | Path) -> dict:
    """A built-in site by name (``site-A``) or any site file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
        where = str(path)
    else:
        name = str(name_or_path)
        if name not in builtin_sites():
            raise SiteConfigError(
                f"unknown site {name!r}: built-in sites are {', '.join(builtin_sites())}"
            )
        text = resources.files("ingest.sites").joinpath(f"{name}.yaml").read_text()
        where = f"ingest/sites/{name}.yaml"
    try:
        # libyaml's loader where the wheel has it: the pure-Python one takes ~35 ms a site file,
        # paid by every ingest before its first file
        cfg = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SiteConfigError(f"{where}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(cfg, dict) or "site" not in cfg or not isinstance(cfg.get("series"), dict):
        raise SiteConfigError(f"{where}: a site file needs 'site' and 'series' keys")
    for role, entry in cfg["series"].items():
        if role not in ROLES:
            raise SiteConfigError(f"{where}: series {role!r} is not a role ({', '.join(ROLES)})")
        _check_match(where, role, (entry or {}).get("match") if isinstance(entry, dict) else None)
    missing = [r for r in ROLES if r not in cfg["series"]]
    cfg["_source"] = where
    cfg["_missing_roles"] = missing
    return cfg


MATCH_KEYS = ("description", "image_type_all", "echo")


def _check_match(where: str, role: str, rule) -> None:
    """A rule with a misspelt key would match every series: refuse it when the file loads."""
    if rule is None:
        return
    if not isinstance(rule, dict):
        raise SiteConfigError(f"{where}: {role}.match must be a mapping of {', '.join(MATCH_KEYS)}")
    unknown = [k for k in rule if k not in MATCH_KEYS]
    if unknown:
        raise SiteConfigError(f"{where}: {role}.match has unknown key(s) {', '.join(map(str, unknown))} "
                              f"(known: {', '.join(MATCH_KEYS)})")
    if "description" in rule:
        if not isinstance(rule["description"], str):  # YAML reads `description: 12` as a number
            raise SiteConfigError(f"{where}: {role}.match.description must be a regular expression in quotes, "
                                  f"got {rule['description']!r}")
        try:
            re.compile(rule["description"])
        except re.error as exc:
            raise SiteConfigError(f"{where}: {role}.match.description is not a regular expression ({exc})") from None
    itypes = rule.get("image_type_all", [])
    if not isinstance(itypes, list) or not all(isinstance(t, str) for t in itypes):
        raise SiteConfigError(f"{where}: {role}.match.image_type_all must be a list of ImageType values")
    echo = rule.get("echo")
    if echo is not None and (isinstance(echo, bool) or not isinstance(echo, int) or echo < 1):
        raise SiteConfigError(f"{where}: {role}.match.echo must be an echo number (1, 2, ...), got {echo!r}")

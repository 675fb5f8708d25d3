"""Site configuration files: one YAML per site, shared by the phantom and by ingest."""

from __future__ import annotations

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
    cfg = yaml.safe_load(text)
    missing = [r for r in ROLES if r not in cfg.get("series", {})]
    if "site" not in cfg or "series" not in cfg:
        raise SiteConfigError(f"{where}: a site file needs 'site' and 'series' keys")
    cfg["_source"] = where
    cfg["_missing_roles"] = missing
    return cfg

"""Adds the config groups that installed bnn-harness plugins ship to Hydra's search path.

Hydra runs every installed search-path plugin in every Hydra app of the environment, so
this one stays inert (no torch, no entry points) unless the app's primary config is
bnn-harness's own tree: `pkg://harness.conf` (the CLI) or the folder that package is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PACKAGE = "harness.conf"


def _conf_dirs() -> set[Path]:
    """Where harness.conf lives (a wheel's harness/conf, an editable install's conf/)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return set()
    locations = spec.submodule_search_locations if spec is not None else None
    return {Path(p).resolve() for p in locations or ()}


def is_bnn_harness(search_path: ConfigSearchPath) -> bool:
    """Whether the running app's primary config is bnn-harness's config tree."""
    main = [e.path for e in search_path.get_path() if e.provider == "main" and e.path]
    if any(path.removeprefix("pkg://") == PACKAGE for path in main):
        return True
    folders = [
        Path(p.removeprefix("file://")) for p in main if "://" not in p or p.startswith("file://")
    ]
    if not folders:
        return False
    ours = _conf_dirs()
    return any(folder.resolve() in ours for folder in folders)


class BnnHarnessSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not is_bnn_harness(search_path):
            return
        from harness import registry

        for entry in registry.default().collect("bnn_harness_config_searchpath"):
            search_path.append(provider="bnn-harness-plugin", path=entry)

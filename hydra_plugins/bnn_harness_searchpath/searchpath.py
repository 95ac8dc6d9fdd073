"""Adds the config groups that installed bnn-harness plugins ship to Hydra's search path."""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class BnnHarnessSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from harness import registry

        for entry in registry.default().collect("bnn_harness_config_searchpath"):
            search_path.append(provider="bnn-harness-plugin", path=entry)

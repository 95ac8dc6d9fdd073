"""Plugin discovery through the `bnn_harness` entry-point group.

Entry points are loaded one by one so a plugin that fails to import is reported
and skipped instead of taking the others down.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from harness import hookspecs
from harness.api import HarnessError

KINDS = {
    "method": "bnn_harness_methods",
    "backend": "bnn_harness_backends",
    "dataset": "bnn_harness_datasets",
    "model": "bnn_harness_models",
    "quantizer": "bnn_harness_quantizers",
}


@dataclass
class Registry:
    manager: pluggy.PluginManager
    failures: dict[str, str] = field(default_factory=dict)

    def plugins(self, kind: str) -> dict[str, tuple[Any, str]]:
        """name -> (plugin, source package) for one kind."""
        if kind not in KINDS:
            raise HarnessError(f"unknown plugin kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        hook = getattr(self.manager.hook, KINDS[kind])
        found: dict[str, tuple[Any, str]] = {}
        for impl in hook.get_hookimpls():
            source = self.manager.get_name(impl.plugin) or "?"
            for plugin in impl.function() or []:
                found[plugin.name] = (plugin, source)
        return found

    def get(self, kind: str, name: str) -> Any:
        found = self.plugins(kind)
        if name not in found:
            valid = ", ".join(sorted(found)) or "none installed"
            raise HarnessError(f"unknown {kind} '{name}'; valid {kind}s: {valid}")
        return found[name][0]

    def collect(self, hook_name: str) -> list[Any]:
        return [item for result in getattr(self.manager.hook, hook_name)() for item in result]


def build(group: str = hookspecs.PROJECT) -> Registry:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    for ep in entry_points(group=group):
        try:
            module = ep.load()
        except Exception as err:
            registry.failures[f"{ep.name} ({ep.value})"] = f"{type(err).__name__}: {err}"
            continue
        if manager.is_registered(module):
            continue
        dist = ep.dist.name if ep.dist is not None else ep.value
        manager.register(module, name=f"{ep.name} [{dist}]")
    return registry


@functools.cache
def default() -> Registry:
    return build()

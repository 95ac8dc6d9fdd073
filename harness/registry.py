"""Plugin discovery through the `bnn_harness` entry-point group.

Entry points are loaded one by one so a plugin that fails to import, or that does not
meet its kind's contract (`harness.api.CONTRACTS`), is reported and skipped instead of
taking the others down. What loads is complete: optional members a plugin leaves out
are bound from its kind's base class, so the core calls every member directly.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from harness import hookspecs
from harness.api import CONTRACTS, HarnessError

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
    _found: dict[str, dict[str, tuple[Any, str]]] = field(default_factory=dict, repr=False)

    def plugins(self, kind: str) -> dict[str, tuple[Any, str]]:
        """name -> (plugin, source package) for one kind; checked against its contract once."""
        if kind not in KINDS:
            raise HarnessError(f"unknown plugin kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        if kind not in self._found:
            self._found[kind] = self._collect(kind)
        return self._found[kind]

    def _collect(self, kind: str) -> dict[str, tuple[Any, str]]:
        hook = getattr(self.manager.hook, KINDS[kind])
        found: dict[str, tuple[Any, str]] = {}
        for impl in hook.get_hookimpls():
            source = self.manager.get_name(impl.plugin) or "?"
            try:
                plugins = list(impl.function() or [])
            except Exception as err:
                self.failures[f"{KINDS[kind]} in {source}"] = f"{type(err).__name__}: {err}"
                continue
            for plugin in plugins:
                label = f"{kind} '{getattr(plugin, 'name', '?')}' from {source}"
                problem = conform(kind, plugin)
                if problem:
                    self.failures[label] = problem
                    continue
                if plugin.name in found:
                    raise HarnessError(
                        f"two {kind}s are named '{plugin.name}': one from {found[plugin.name][1]}, "
                        f"one from {source}; uninstall or rename one of them"
                    )
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


def conform(kind: str, plugin: Any) -> str | None:
    """What keeps `plugin` from meeting its contract, or None once its defaults are bound."""
    contract = CONTRACTS[kind]
    missing = contract.missing(plugin)
    if missing:
        return (
            f"missing required member(s) {', '.join(missing)} of harness.api."
            f"{contract.protocol.__name__}"
        )
    if not isinstance(plugin.name, str) or not plugin.name:
        return f"`name` must be a non-empty string, got {plugin.name!r}"
    for member in contract.optional():
        if hasattr(plugin, member):
            continue
        default = inspect.getattr_static(contract.defaults, member)
        value = types.MethodType(default, plugin) if inspect.isfunction(default) else default
        try:
            setattr(plugin, member, value)
        except (AttributeError, TypeError):
            return (
                f"has no `{member}` and takes no default for it; "
                f"inherit harness.api.{contract.defaults.__name__}"
            )
    return None


def build(group: str = hookspecs.PROJECT) -> Registry:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    for ep in entry_points(group=group):
        entry = f"{ep.name} ({ep.value})"
        try:
            module = ep.load()
        except Exception as err:
            registry.failures[entry] = f"{type(err).__name__}: {err}"
            continue
        if manager.is_registered(module):
            continue
        dist = ep.dist.name if ep.dist is not None else ep.value
        try:
            manager.register(module, name=f"{ep.name} [{dist}]")
            # A misspelled hook (e.g. `bnn_harness_method`) has no spec and would be
            # ignored without a word; check_pending names it.
            manager.check_pending()
        except pluggy.PluginValidationError as err:
            if manager.is_registered(module):
                manager.unregister(module)
            registry.failures[entry] = f"{err}; the hooks are listed in harness/hookspecs.py"
    return registry


@functools.cache
def default() -> Registry:
    return build()

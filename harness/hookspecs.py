"""Hook specifications: the only way plugins, built-in or third-party, join the harness.

Each hook returns a list so one package can contribute several plugins of a kind. Each
plugin is checked against its kind's contract in harness.api (Protocol plus base class
with the optional members' defaults) when the registry loads it; a hook implementation
whose name is not specified here is reported (pluggy's check_pending), not ignored.
"""

from __future__ import annotations

import pluggy

from harness.api import Backend, ConfigSchema, Dataset, Method, Model, Quantizer

PROJECT = "bnn_harness"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bnn_harness_methods() -> list[Method]:
    """Inference methods (harness.api.Method): fit a posterior, turn it into a program."""


@hookspec
def bnn_harness_backends() -> list[Backend]:
    """Backends (harness.api.Backend) that compile an InferenceProgram into an Executable."""


@hookspec
def bnn_harness_datasets() -> list[Dataset]:
    """Datasets (harness.api.Dataset): factories returning a DataBundle."""


@hookspec
def bnn_harness_models() -> list[Model]:
    """Network architectures (harness.api.Model), built from the dataset's spec."""


@hookspec
def bnn_harness_quantizers() -> list[Quantizer]:
    """Posterior quantizers (harness.api.Quantizer) with a memory account."""


@hookspec
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    """Structured-config dataclasses, stored in Hydra's ConfigStore so typos fail early."""


@hookspec
def bnn_harness_config_searchpath() -> list[str]:
    """Extra Hydra search-path entries (e.g. "pkg://my_plugin.conf") with config groups."""

"""Hook specifications: the only way plugins, built-in or third-party, join the harness.

Each hook returns a list so one package can contribute several plugins of a kind.
"""

from __future__ import annotations

import pluggy

from harness.api import Backend, ConfigSchema, Dataset, Method, Model, Quantizer

PROJECT = "bnn_harness"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bnn_harness_methods() -> list[Method]:
    """Inference methods: fit a posterior, turn it into an InferenceProgram."""


@hookspec
def bnn_harness_backends() -> list[Backend]:
    """Backends that compile an InferenceProgram into an Executable."""


@hookspec
def bnn_harness_datasets() -> list[Dataset]:
    """Dataset factories returning a DataBundle."""


@hookspec
def bnn_harness_models() -> list[Model]:
    """Network architectures, built from the dataset's spec."""


@hookspec
def bnn_harness_quantizers() -> list[Quantizer]:
    """Posterior quantizers with a memory account."""


@hookspec
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    """Structured-config dataclasses, stored in Hydra's ConfigStore so typos fail early."""


@hookspec
def bnn_harness_config_searchpath() -> list[str]:
    """Extra Hydra search-path entries (e.g. "pkg://my_plugin.conf") with config groups."""

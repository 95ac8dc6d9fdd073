"""An example bnn-harness plugin package: one method, one dataset, their config entries.

The harness loads this module through the `bnn_harness` entry point (see pyproject.toml)
and calls the hook implementations below; nothing in the harness names this package.
"""

from __future__ import annotations

import pluggy

from harness.api import ConfigSchema

hookimpl = pluggy.HookimplMarker("bnn_harness")


@hookimpl
def bnn_harness_methods() -> list:
    from bnn_harness_example.temperature import TemperatureScaling

    return [TemperatureScaling()]


@hookimpl
def bnn_harness_datasets() -> list:
    from bnn_harness_example.moons import TwoMoons

    return [TwoMoons()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    from bnn_harness_example.moons import TwoMoonsConfig
    from bnn_harness_example.temperature import TemperatureConfig

    return [
        ConfigSchema("method", "temperature_schema", TemperatureConfig),
        ConfigSchema("dataset", "two_moons_schema", TwoMoonsConfig),
    ]


@hookimpl
def bnn_harness_config_searchpath() -> list[str]:
    # conf/method/temperature.yaml, conf/dataset/two_moons.yaml, conf/experiment/moons.yaml
    return ["pkg://bnn_harness_example.conf"]

"""Built-in method plugins, registered exactly as a third-party package would be."""

from __future__ import annotations

import pluggy

from harness.api import ConfigSchema

hookimpl = pluggy.HookimplMarker("bnn_harness")


@hookimpl
def bnn_harness_methods() -> list:
    from plugins.methods.deterministic import Deterministic
    from plugins.methods.ensemble import Ensemble
    from plugins.methods.imported import Imported
    from plugins.methods.mc_dropout import MCDropout
    from plugins.methods.qat import SVIQAT
    from plugins.methods.svi import SVI

    return [Deterministic(), MCDropout(), Ensemble(), SVI(), SVIQAT(), Imported()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    from plugins.methods.deterministic import DeterministicConfig
    from plugins.methods.ensemble import EnsembleConfig
    from plugins.methods.imported import ImportedConfig
    from plugins.methods.mc_dropout import MCDropoutConfig
    from plugins.methods.qat import SVIQATConfig
    from plugins.methods.svi import SVIConfig

    return [
        ConfigSchema("method", "deterministic_schema", DeterministicConfig),
        ConfigSchema("method", "mc_dropout_schema", MCDropoutConfig),
        ConfigSchema("method", "ensemble_schema", EnsembleConfig),
        ConfigSchema("method", "svi_schema", SVIConfig),
        ConfigSchema("method", "svi_qat_schema", SVIQATConfig),
        ConfigSchema("method", "imported_schema", ImportedConfig),
    ]

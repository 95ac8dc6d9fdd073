"""The identity quantizer: float32 as trained, with the memory account every run logs."""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

from harness.api import ConfigSchema, MemoryAccount, Posterior, QuantizerBase, param_bytes

hookimpl = pluggy.HookimplMarker("bnn_harness")


@dataclass
class NoneConfig:
    name: str = "none"
    bits: int = 32  # ignored (float32); lets a sweep over quant.bits include the baseline


class NoQuantization(QuantizerBase):
    name = "none"

    def apply(self, posterior: Posterior, cfg: NoneConfig) -> tuple[Posterior, MemoryAccount]:
        size = param_bytes(posterior.tensors)
        return posterior, MemoryAccount(bytes_before=size, bytes_after=size)


@hookimpl
def bnn_harness_quantizers() -> list:
    return [NoQuantization()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("quant", "none_schema", NoneConfig)]

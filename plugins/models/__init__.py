"""Network architectures as nn.Sequential, so methods can walk layers in order."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pluggy
from torch import nn

from harness.api import ConfigSchema, DataSpec, HarnessError, NetFactory

hookimpl = pluggy.HookimplMarker("bnn_harness")


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    dropout: float = 0.1


@dataclass
class LeNet5Config:
    name: str = "lenet5"
    dropout: float = 0.1


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise HarnessError(f"model.dropout must be in [0, 1), got {p}")


class MLP:
    name = "mlp"

    def factory(self, cfg: MLPConfig, spec: DataSpec) -> NetFactory:
        _check_dropout(cfg.dropout)
        widths = [math.prod(spec.input_shape), *cfg.hidden]
        if any(w <= 0 for w in widths):
            raise HarnessError(f"model.hidden widths must be positive, got {list(cfg.hidden)}")

        def build() -> nn.Module:
            layers: list[nn.Module] = [nn.Flatten()]
            for fan_in, fan_out in itertools.pairwise(widths):
                layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.Dropout(cfg.dropout)]
            layers.append(nn.Linear(widths[-1], spec.num_classes))
            return nn.Sequential(*layers)

        return build


class LeNet5:
    """LeNet-5 as in the PFP seed: conv6x5x5 pad 2, pool, conv16x5x5, pool, 120-84-C."""

    name = "lenet5"

    def factory(self, cfg: LeNet5Config, spec: DataSpec) -> NetFactory:
        _check_dropout(cfg.dropout)
        channels, height, width = spec.input_shape
        side = lambda s: ((s // 2) - 4) // 2  # noqa: E731 - conv5 valid after pool, then pool
        if side(height) < 1 or side(width) < 1:
            # Small inputs (8x8 digits) keep the topology with padded second conv.
            pad2 = 2
            side = lambda s: (s // 2) // 2  # noqa: E731
        else:
            pad2 = 0
        flat = 16 * side(height) * side(width)

        def build() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(channels, 6, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5, padding=pad2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(flat, 120),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(120, 84),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(84, spec.num_classes),
            )

        return build


@hookimpl
def bnn_harness_models() -> list:
    return [MLP(), LeNet5()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [
        ConfigSchema("model", "mlp_schema", MLPConfig),
        ConfigSchema("model", "lenet5_schema", LeNet5Config),
    ]

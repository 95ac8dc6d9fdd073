"""Network architectures: MLP and LeNet-5 as nn.Sequential, ResNet as a residual module.

Moment methods trace any of them with torch.fx (harness.moments.build_ops), so a model
may use residual adds and flatten/view as long as its layers are the supported ones."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pluggy
from torch import Tensor, nn

from harness.api import ConfigSchema, DataSpec, HarnessError, ModelBase, NetFactory

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


class MLP(ModelBase):
    name = "mlp"

    def check(self, cfg: MLPConfig) -> None:
        _check_dropout(cfg.dropout)
        if any(w <= 0 for w in cfg.hidden):
            raise HarnessError(f"model.hidden widths must be positive, got {list(cfg.hidden)}")

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


class LeNet5(ModelBase):
    """LeNet-5 as in the PFP seed: conv6x5x5 pad 2, pool, conv16x5x5, pool, 120-84-C."""

    name = "lenet5"

    def check(self, cfg: LeNet5Config) -> None:
        _check_dropout(cfg.dropout)

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


@dataclass
class ResNetConfig:
    name: str = "resnet"
    width: int = 16  # channels of every convolution
    blocks: int = 2  # residual blocks, each followed by a 2x2 average pooling


class Block(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then relu (He et al. 2016, basic block)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResidualCNN(nn.Module):
    """Stem conv, `blocks` residual blocks with average pooling between them, global
    average pooling and a linear head. Average pooling (not max) keeps every op of the
    moment program exact for independent Gaussian inputs; batch norm runs in eval mode
    at inference, with the running statistics the posterior carries (`buffer.`)."""

    def __init__(self, channels: int, side: int, width: int, blocks: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.pools = nn.ModuleList(nn.AvgPool2d(2) for _ in range(blocks))
        self.head_pool = nn.AvgPool2d(side >> blocks)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block, pool in zip(self.blocks, self.pools, strict=True):
            h = pool(block(h))
        h = self.head_pool(h)
        return self.fc(h.view(h.size(0), -1))


class ResNet(ModelBase):
    """A small residual CNN for square images (28x28 MNIST; 8x8 digits with blocks <= 3)."""

    name = "resnet"

    def check(self, cfg: ResNetConfig) -> None:
        if cfg.width <= 0 or cfg.blocks < 0:
            raise HarnessError(
                f"model.width must be positive and model.blocks >= 0, got {cfg.width}, {cfg.blocks}"
            )

    def factory(self, cfg: ResNetConfig, spec: DataSpec) -> NetFactory:
        self.check(cfg)
        channels, height, width = spec.input_shape
        if height != width or height >> cfg.blocks < 1:
            raise HarnessError(
                f"model=resnet needs square inputs of side >= 2^blocks, got {height}x{width} "
                f"with model.blocks={cfg.blocks}"
            )

        def build() -> nn.Module:
            return ResidualCNN(channels, height, cfg.width, cfg.blocks, spec.num_classes)

        return build


@hookimpl
def bnn_harness_models() -> list:
    return [MLP(), LeNet5(), ResNet()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [
        ConfigSchema("model", "mlp_schema", MLPConfig),
        ConfigSchema("model", "lenet5_schema", LeNet5Config),
        ConfigSchema("model", "resnet_schema", ResNetConfig),
    ]

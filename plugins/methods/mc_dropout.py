"""MC dropout (Gal & Ghahramani): the deterministic network sampled with dropout on."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from harness.api import (
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
    training,
)
from plugins.methods.deterministic import load_net


@dataclass
class MCDropoutConfig:
    name: str = "mc_dropout"
    samples: int = 30
    fit: training.FitConfig = field(default_factory=training.FitConfig)


class DropoutSampler(InferenceProgram):
    """All S passes in one batch of S*B rows: one big matmul beats S small ones."""

    kind = "samples"

    def __init__(self, net: nn.Module, samples: int):
        super().__init__()
        self.net, self.samples = training.active_dropout(net), samples

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        rows = x.unsqueeze(0).expand(self.samples, *x.shape).reshape(-1, *x.shape[1:])
        return self.net(rows).reshape(self.samples, batch, -1)


class MCDropout(MethodBase):
    name = "mc_dropout"
    base = "deterministic"
    fit_options = ()  # samples is inference-only

    def check(self, cfg: MCDropoutConfig) -> None:
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: MCDropoutConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        if base is None:
            raise HarnessError("mc_dropout needs the deterministic posterior as its base")
        return Posterior(self.name, dict(base.tensors), dict(base.meta))

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: MCDropoutConfig
    ) -> InferenceProgram:
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")
        net = load_net(posterior, net_factory)
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules()):
            raise HarnessError("mc_dropout needs a model with dropout > 0 (model.dropout)")
        return DropoutSampler(net, cfg.samples)

"""MAP network: the baseline every Bayesian method must beat on calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from harness.api import DataBundle, InferenceProgram, MethodBase, NetFactory, Posterior, training


@dataclass
class DeterministicConfig:
    name: str = "deterministic"
    fit: training.FitConfig = field(default_factory=training.FitConfig)


def fit_map(net_factory: NetFactory, data: DataBundle, cfg: training.FitConfig) -> nn.Module:
    net = net_factory()
    training.train(
        net,
        data,
        cfg,
        lambda m, x, y, _: training.cross_entropy_nll(m, x, y),
        training.cross_entropy_nll,
    )
    return net.eval()


def load_net(posterior: Posterior, net_factory: NetFactory, prefix: str = "net") -> nn.Module:
    net = net_factory()
    net.load_state_dict(posterior.subset(prefix))
    return net.eval()


class SinglePass(InferenceProgram):
    kind = "samples"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unsqueeze(0)


class Deterministic(MethodBase):
    name = "deterministic"
    base = None
    fit_options = ()  # what trains it is all in fit (and the model)

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: DeterministicConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        net = fit_map(net_factory, data, cfg.fit)
        return Posterior(self.name, training.state_tensors("net", net))

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: DeterministicConfig
    ) -> InferenceProgram:
        return SinglePass(load_net(posterior, net_factory))

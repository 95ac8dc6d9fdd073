"""Temperature scaling (Guo et al., 2017): the cheapest post-hoc calibration baseline.

One scalar T divides the MAP network's logits; it is fitted by minimising the NLL on the
validation split, so a Bayesian method has to beat it, not just the raw MAP network. T > 0
never changes the argmax, so accuracy is the MAP network's by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from harness.api import (
    DataBundle,
    FitConfig,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
)

# The MAP network comes from the built-in `deterministic` method (the runner fits it, or
# reads it from the cache, because `base` below names it). Its training settings are the
# built-in FitConfig (the shared training loop's, from harness.api), so a plain
# `method=deterministic` run and this method share one cached network.

T_RANGE = (0.05, 20.0)


@dataclass
class TemperatureConfig:
    name: str = "temperature"
    fit: FitConfig = field(default_factory=FitConfig)
    max_iter: int = 200


def load_net(posterior: Posterior, net_factory: NetFactory) -> nn.Module:
    """The MAP network from the `deterministic` posterior (`net.<param>` tensors)."""
    net = net_factory()
    net.load_state_dict(posterior.subset("net"))
    return net.eval()


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int) -> float:
    """argmin_T NLL(logits / T), searched over log T so T stays positive.

    The range is clamped: on a validation split the network fits perfectly, the NLL keeps
    falling as T -> 0, and an unbounded T would turn the program's logits into infinities.
    """
    lo, hi = (math.log(t) for t in T_RANGE)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.clamp(lo, hi).exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().clamp(lo, hi).exp())
    if not math.isfinite(t):
        raise HarnessError("temperature scaling diverged (non-finite validation logits?)")
    return t


class Scaled(InferenceProgram):
    kind = "samples"

    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net = net
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, x: Tensor) -> Tensor:
        return (self.net(x) * self.inv_t).unsqueeze(0)


class TemperatureScaling(MethodBase):
    """Inherits MethodBase for the optional members' defaults (fit_options, base_config)."""

    name = "temperature"
    base = "deterministic"
    fit_options = ("max_iter",)  # outside `fit`, yet it changes the fitted temperature

    def check(self, cfg: TemperatureConfig) -> None:
        """Runs before the MAP network trains, so a bad option costs nothing."""
        if cfg.max_iter <= 0:
            raise HarnessError(f"method.max_iter must be positive, got {cfg.max_iter}")

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: TemperatureConfig,
        base: Posterior | None,
    ) -> Posterior:
        if base is None:
            raise HarnessError("method 'temperature' needs the deterministic posterior as base")
        x, y = data.val
        with torch.no_grad():
            logits = load_net(base, net_factory)(x)
        t = fit_temperature(logits, y.long(), cfg.max_iter)
        tensors = dict(base.tensors) | {"temperature": torch.tensor([t])}
        return Posterior(self.name, tensors, {"temperature": t})

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: TemperatureConfig
    ) -> InferenceProgram:
        return Scaled(load_net(posterior, net_factory), float(posterior.tensors["temperature"]))

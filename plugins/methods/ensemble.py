"""Deep ensemble (Lakshminarayanan et al.): M independently initialised MAP networks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from harness.api import (
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
    over_draws,
    training,
)
from plugins.methods.deterministic import fit_map, load_net


@dataclass
class EnsembleConfig:
    name: str = "ensemble"
    members: int = 5
    # Members train to convergence (no weight decay, long patience): averaging already
    # softens the predictive, so early-stopped members make an underconfident ensemble.
    fit: training.FitConfig = field(
        default_factory=lambda: training.FitConfig(epochs=100, weight_decay=0.0, patience=40)
    )


class StackedEnsemble(InferenceProgram):
    """Members' weights stacked and vmapped: one call, no Python loop over members."""

    kind = "samples"

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        params, buffers = stack_module_state(nets)
        self.params = nn.ParameterDict({k.replace(".", "/"): v for k, v in params.items()})
        self.buffers_ = {k: v for k, v in buffers.items()}
        self.skeleton = [nets[0]]  # a list hides it from parameters()/state_dict()

    def forward(self, x: Tensor) -> Tensor:
        params = {k.replace("/", "."): v for k, v in self.params.items()}

        def one(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
            return functional_call(self.skeleton[0], (p, b), (x,))

        return over_draws(self.skeleton[0], one, params, self.buffers_)


class Ensemble(MethodBase):
    name = "ensemble"
    base = None
    fit_options = ("members",)  # how many networks train: part of the cache key

    def check(self, cfg: EnsembleConfig) -> None:
        if cfg.members <= 0:
            raise HarnessError(f"method.members must be positive, got {cfg.members}")

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: EnsembleConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        if cfg.members <= 0:
            raise HarnessError(f"method.members must be positive, got {cfg.members}")
        tensors = {}
        for i in range(cfg.members):
            torch.manual_seed(torch.initial_seed() + i)
            tensors |= training.state_tensors(f"member{i}", fit_map(net_factory, data, cfg.fit))
        return Posterior(self.name, tensors, {"members": cfg.members})

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: EnsembleConfig
    ) -> InferenceProgram:
        count = int(posterior.meta["members"])
        nets = [load_net(posterior, net_factory, f"member{i}") for i in range(count)]
        return StackedEnsemble(nets).eval()

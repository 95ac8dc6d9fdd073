"""Local linearisation (SUQ; Li, Klasson, Solin, Trapp, arXiv 2411.18425): one pass, probit out.

Linear layers (dense, conv, average pooling, batch norm) propagate a diagonal Gaussian
exactly as PFP does, weight uncertainty included; nonlinearities are linearised at the
mean, E[g(h)] ~ g(E[h]) and Var ~ g'(E[h])^2 Var[h]. So it differs from PFP only in ReLU
(mean relu(m), variance v where m > 0) and max-pooling (the window's element with the
largest mean, its variance). Residual adds sum means and variances, assuming independent
branches (mean field), exactly as in PFP. The posterior comes from the `base` config node: SVI by
default, or any method whose posterior is a diagonal Gaussian in the mu./sigma. format
(e.g. `method@method.base=laplace method.base.hessian=diag`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pluggy
import torch
from torch import Tensor
from torch.nn import functional as F

from harness.api import (
    ConfigSchema,
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    MomentOp,
    NetFactory,
    Posterior,
)
from harness.api import moments as gops

hookimpl = pluggy.HookimplMarker("bnn_harness")


@dataclass
class LinearisedConfig:
    name: str = "linearised"
    base: Any = None  # a whole method config, composed by Hydra (conf/method/linearised.yaml)


def relu(mean: Tensor, var: gops.Var) -> gops.Moments:
    if var is None:
        return torch.relu(mean), None
    return torch.relu(mean), torch.where(mean > 0, var, torch.zeros_like(var))


def maxpool2d(mean: Tensor, var: gops.Var, kernel: int, stride: int) -> gops.Moments:
    """The max is locally the element with the largest mean: its gradient is one-hot."""
    out, idx = F.max_pool2d(mean, kernel, stride, return_indices=True)
    if var is None:
        return out, None
    picked = var.flatten(2).gather(2, idx.flatten(2)).view_as(out)
    return out, picked


OPS = gops.OPS | {"relu": relu, "maxpool2d": maxpool2d}


class LinearisedProgram(InferenceProgram):
    """Same op list as PFP, other activations: not the MomentOp semantics, so no moment_ops()."""

    kind = "moments"

    def __init__(self, ops: list[MomentOp]):
        super().__init__()
        self.ops = ops
        for i, op in enumerate(ops):
            for name, tensor in op.tensors.items():
                self.register_buffer(f"op{i}_{name}", tensor, persistent=False)

    def _step(self, i: int, op: MomentOp, args: list[gops.Moments]) -> gops.Moments:
        tensors = {k: getattr(self, f"op{i}_{k}") for k in op.tensors}
        return OPS[op.op](*[t for pair in args for t in pair], **tensors, **op.attrs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = gops.run_graph(self.ops, x, self._step)
        return mean, torch.zeros_like(mean) if var is None else var


class Linearised(MethodBase):
    name = "linearised"
    base = "svi"
    fit_options = ()  # reads its base's posterior, trains nothing

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: LinearisedConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        if base is None:
            raise HarnessError(
                "linearised needs a base posterior: set method.base (e.g. method@method.base=svi)"
            )
        return Posterior(self.name, dict(base.tensors), {**base.meta, "base": base.method})

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: LinearisedConfig
    ) -> InferenceProgram:
        net = gops.load_buffers(posterior, net_factory().eval())
        mu, var = gops.diagonal_moments(posterior, net)
        return LinearisedProgram(gops.build_ops(net, mu, var))


@hookimpl
def bnn_harness_methods() -> list:
    return [Linearised()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("method", "linearised_schema", LinearisedConfig)]

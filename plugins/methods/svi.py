"""Mean-field Gaussian SVI (Bayes by backprop) with an optional local reparameterisation.

The posterior is plain data: `mu.<param>` and `sigma.<param>` for every parameter of
the network, so PFP, quantizers and other backends read it without this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from harness.api import DataBundle, HarnessError, InferenceProgram, NetFactory, Posterior
from plugins.methods import training


@dataclass
class SVIFit(training.FitConfig):
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 0.0
    patience: int = 30
    prior_std: float = 1.0
    init_sigma: float = 1e-3
    kl_weight: float = 0.03
    local_reparam: bool = True
    val_samples: int = 16


@dataclass
class SVIConfig:
    name: str = "svi"
    samples: int = 100
    local_reparam: bool = False
    fit: SVIFit = field(default_factory=SVIFit)


def lrt_forward(
    net: nn.Sequential, mu: dict[str, Tensor], var: dict[str, Tensor], x: Tensor
) -> Tensor:
    """Sample pre-activations of linear/conv layers instead of weights (Kingma et al. 2015)."""
    h = x
    for idx, layer in enumerate(net):
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            w, b = f"{idx}.weight", f"{idx}.bias"
            op = F.linear if isinstance(layer, nn.Linear) else _conv(layer)
            mean = op(h, mu[w], mu.get(b))
            spread = op(h * h, var[w], var.get(b))
            h = mean + spread.clamp_min(0).sqrt() * torch.randn_like(mean)
        else:
            h = layer(h)
    return h


def _conv(layer: nn.Conv2d):
    return lambda h, w, b: F.conv2d(
        h, w, b, layer.stride, layer.padding, layer.dilation, layer.groups
    )


class MeanField(nn.Module):
    """Trainable q(θ) = N(μ, softplus(ρ)²) over a skeleton network's parameters."""

    def __init__(self, net: nn.Module, init_sigma: float):
        super().__init__()
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        rho0 = math.log(math.expm1(init_sigma))
        self.rho = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, rho0)) for p in net.parameters()]
        )

    def moments(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        mu = dict(self.net.named_parameters())
        sigma = {n: F.softplus(r) for n, r in zip(self.names, self.rho, strict=True)}
        return mu, sigma

    def forward(self, x: Tensor, local_reparam: bool = True) -> Tensor:
        mu, sigma = self.moments()
        if local_reparam:
            return lrt_forward(self.net, mu, {k: s * s for k, s in sigma.items()}, x)
        sample = {k: mu[k] + sigma[k] * torch.randn_like(mu[k]) for k in mu}
        return functional_call(self.net, sample, (x,))

    def kl(self, prior_std: float) -> Tensor:
        mu, sigma = self.moments()
        total = torch.zeros(())
        for k in mu:
            s2, p2 = sigma[k] ** 2, prior_std**2
            total = (
                total
                + (
                    0.5 * (s2 + mu[k] ** 2) / p2 - torch.log(sigma[k]) + math.log(prior_std) - 0.5
                ).sum()
            )
        return total


def predictive_nll(logits: Tensor, y: Tensor) -> Tensor:
    """NLL of the sample-averaged predictive, from logits [S, B, C]."""
    log_probs = torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(logits.shape[0])
    return F.nll_loss(log_probs, y)


class SampledWeights(InferenceProgram):
    """S weight draws inside forward, vmapped: sampling cost is part of the timing."""

    kind = "samples"

    def __init__(self, net: nn.Module, posterior: Posterior, samples: int, local_reparam: bool):
        super().__init__()
        self.skeleton = [net.eval()]
        self.samples, self.local_reparam = samples, local_reparam
        names = [n for n, _ in net.named_parameters()]
        for n in names:
            self.register_buffer("mu_" + n.replace(".", "_"), posterior.tensors[f"mu.{n}"])
            self.register_buffer("sigma_" + n.replace(".", "_"), posterior.tensors[f"sigma.{n}"])
        self.names = names

    def _get(self, kind: str) -> dict[str, Tensor]:
        return {n: getattr(self, f"{kind}_{n.replace('.', '_')}") for n in self.names}

    def forward(self, x: Tensor) -> Tensor:
        mu, sigma = self._get("mu"), self._get("sigma")
        if self.local_reparam:
            rows = x.unsqueeze(0).expand(self.samples, *x.shape).reshape(-1, *x.shape[1:])
            var = {k: s * s for k, s in sigma.items()}
            return lrt_forward(self.skeleton[0], mu, var, rows).reshape(
                self.samples, x.shape[0], -1
            )
        draws = {k: mu[k] + sigma[k] * torch.randn(self.samples, *mu[k].shape) for k in mu}
        return torch.vmap(lambda p: functional_call(self.skeleton[0], p, (x,)))(draws)


class SVI:
    name = "svi"
    base = None

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: SVIConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        fit = cfg.fit
        if fit.prior_std <= 0 or fit.init_sigma <= 0:
            raise HarnessError("method.fit.prior_std and init_sigma must be positive")
        q = MeanField(net_factory(), fit.init_sigma)

        def loss(m: MeanField, x: Tensor, y: Tensor, n_train: int) -> Tensor:
            nll = F.cross_entropy(m(x, fit.local_reparam), y)
            return nll + fit.kl_weight * m.kl(fit.prior_std) / n_train

        def val_nll(m: MeanField, x: Tensor, y: Tensor) -> Tensor:
            rows = x.repeat(fit.val_samples, *[1] * (x.dim() - 1))
            return predictive_nll(m(rows, True).reshape(fit.val_samples, len(x), -1), y)

        training.train(q, data, fit, loss, val_nll)
        mu, sigma = q.moments()
        tensors = {f"mu.{k}": v.detach().clone() for k, v in mu.items()}
        tensors |= {f"sigma.{k}": v.detach().clone() for k, v in sigma.items()}
        return Posterior(self.name, tensors, {"prior_std": fit.prior_std})

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: SVIConfig
    ) -> InferenceProgram:
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")
        return SampledWeights(net_factory(), posterior, cfg.samples, cfg.local_reparam)

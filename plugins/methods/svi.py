"""Mean-field Gaussian SVI (Bayes by backprop) with an optional local reparameterisation.

The posterior is plain data: `mu.<param>` and `sigma.<param>` for every parameter of
the network, so PFP, quantizers and other backends read it without this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.nn import functional as F

from harness.api import (
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
    QuantSpec,
    fake_quant,
    log_quant,
    moments,
    over_draws,
    training,
)
from plugins.methods import families


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
    family: str = "gaussian"  # the noise law z of theta = mu + sigma z (plugins.methods.families)
    family_path: str | None = None  # device-noise sample (CSV/NPY) for family "empirical"


@dataclass
class SVIConfig:
    name: str = "svi"
    samples: int = 100
    local_reparam: bool = False
    family: str | None = None  # deploy family for the same (mu, sigma); None: fit.family
    family_path: str | None = None  # None: fit.family_path
    fit: SVIFit = field(default_factory=SVIFit)
    # A whole method config whose diagonal posterior to sample instead of training one
    # (e.g. `method@method.base=imported`); None: train with `fit`.
    base: Any = None


def _lrt_layer(
    path: str, layer: nn.Module, mu: dict[str, Tensor], var: dict[str, Tensor], h: Tensor
) -> Tensor:
    w, b = f"{path}.weight", f"{path}.bias"
    op = F.linear if isinstance(layer, nn.Linear) else _conv(layer)
    mean = op(h, mu[w], mu.get(b))
    spread = op(h * h, var[w], var.get(b))
    return mean + spread.clamp_min(0).sqrt() * torch.randn_like(mean)


class _LRT(fx.Interpreter):
    """Runs a traced network with its linear/conv layers replaced by `_lrt_layer`; other
    parameters (batch-norm affine) take their posterior means."""

    def __init__(self, net: nn.Module, mu: dict[str, Tensor], var: dict[str, Tensor]):
        super().__init__(net, graph=moments.trace(net))
        self.mu, self.var = mu, var

    def call_module(self, target, args, kwargs):
        layer = self.fetch_attr(target)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            return _lrt_layer(target, layer, self.mu, self.var, args[0])
        return _at_means(target, layer, self.mu, *args, **kwargs)


def _at_means(path: str, layer: nn.Module, mu: dict[str, Tensor], *args, **kwargs) -> Tensor:
    own = {k: mu[f"{path}.{k}"] for k, _ in layer.named_parameters()}
    return functional_call(layer, own, args, kwargs) if own else layer(*args, **kwargs)


def lrt_forward(net: nn.Module, mu: dict[str, Tensor], var: dict[str, Tensor], x: Tensor) -> Tensor:
    """Sample pre-activations of linear/conv layers instead of weights (Kingma et al. 2015).

    An nn.Sequential is walked directly; any other network is traced with torch.fx (the
    graph harness.moments builds PFP from), so residual networks work too.
    """
    if not isinstance(net, nn.Sequential):
        return _LRT(net, mu, var).run(x)
    h = x
    for idx, layer in enumerate(net):
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            h = _lrt_layer(str(idx), layer, mu, var, h)
        else:
            h = _at_means(str(idx), layer, mu, h)
    return h


def _conv(layer: nn.Conv2d):
    return lambda h, w, b: F.conv2d(
        h, w, b, layer.stride, layer.padding, layer.dilation, layer.groups
    )


class MeanField(nn.Module):
    """Trainable q(θ) = μ + softplus(ρ)·z, z ~ a standardised family (N(0, 1) by default).

    Local reparameterisation is exact only for Gaussian z, so other families always
    sample weights.
    """

    def __init__(self, net: nn.Module, init_sigma: float, family: families.Family | None = None):
        super().__init__()
        self.net = net
        self.family = family or families.get("gaussian")
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
        if local_reparam and self.family.name == "gaussian":
            return lrt_forward(self.net, mu, {k: s * s for k, s in sigma.items()}, x)
        sample = {
            k: mu[k] + sigma[k] * self.family.sample(v.shape, dtype=v.dtype) for k, v in mu.items()
        }
        return functional_call(self.net, sample, (x,))

    def kl(self, prior_std: float) -> Tensor:
        mu, sigma = self.moments()
        total = torch.zeros(())
        for k in mu:
            total = total + self.family.kl_to_gaussian(mu[k], sigma[k], prior_std).sum()
        return total

    def sampled(self, x: Tensor, samples: int) -> Tensor:
        """Logits [S, B, C] of `samples` weight draws from the family, vmapped."""
        mu, sigma = self.moments()
        draws = {
            k: mu[k] + sigma[k] * self.family.sample((samples, *v.shape)) for k, v in mu.items()
        }
        return over_draws(self.net, lambda p: functional_call(self.net, p, (x,)), draws)


def predictive_nll(logits: Tensor, y: Tensor) -> Tensor:
    """NLL of the sample-averaged predictive, from logits [S, B, C]."""
    log_probs = torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(logits.shape[0])
    return F.nll_loss(log_probs, y)


class QuantReLU(nn.Module):
    """ReLU, then its output on a b-bit unsigned grid with one scale per row (JQ)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, h: Tensor) -> Tensor:
        return fake_quant(F.relu(h), self.bits, dim=0)


class SampledWeights(InferenceProgram):
    """S weight draws inside forward, vmapped: sampling cost is part of the timing.

    posterior.meta["quant"] (QuantSpec): `weights` puts each sampled weight tensor on a
    b-bit grid with its own scale per sample (with local_reparam no weight is sampled, so
    the two operands, mu and the variance, are quantized: uniform and logarithmic);
    `activations` quantizes every ReLU output per row and sample (see plugins.quantizers.qbnn).
    """

    kind = "samples"

    def __init__(
        self,
        net: nn.Module,
        posterior: Posterior,
        samples: int,
        local_reparam: bool,
        family: families.Family | None = None,
    ):
        super().__init__()
        self.family = family or families.get("gaussian")
        local_reparam = local_reparam and self.family.name == "gaussian"  # exact only then
        self.spec = QuantSpec.from_meta(posterior.meta)
        if self.spec and self.spec.activations:
            for path, layer in list(net.named_modules()):
                if isinstance(layer, nn.ReLU):
                    net.set_submodule(path, QuantReLU(self.spec.bits))
        self.skeleton = [moments.load_buffers(posterior, net.eval())]
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
        bits = self.spec.bits if self.spec and self.spec.weights else None
        if self.local_reparam:
            rows = x.unsqueeze(0).expand(self.samples, *x.shape).reshape(-1, *x.shape[1:])
            var = {k: s * s for k, s in sigma.items()}
            if bits:
                mu = {k: fake_quant(v, bits) for k, v in mu.items()}
                var = {k: log_quant(v, bits) for k, v in var.items()}
            return lrt_forward(self.skeleton[0], mu, var, rows).reshape(
                self.samples, x.shape[0], -1
            )
        draws = {k: mu[k] + sigma[k] * self.family.sample((self.samples, *mu[k].shape)) for k in mu}
        if bits:
            draws = {k: fake_quant(v, bits, dim=0) for k, v in draws.items()}
        net = self.skeleton[0]
        return over_draws(net, lambda p: functional_call(net, p, (x,)), draws)


class SVI(MethodBase):
    name = "svi"
    base = None
    fit_options = ()  # samples, local_reparam, family: inference-only

    def check(self, cfg: SVIConfig) -> None:
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")
        if cfg.fit.prior_std <= 0 or cfg.fit.init_sigma <= 0:
            raise HarnessError("method.fit.prior_std and init_sigma must be positive")
        families.get(cfg.fit.family, cfg.fit.family_path)  # names the valid families
        if cfg.family:
            families.get(cfg.family, cfg.family_path or cfg.fit.family_path)

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: SVIConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        fit = cfg.fit
        self.check(cfg)
        if base is not None:  # sample a given posterior (an imported one): nothing to train
            return Posterior(self.name, dict(base.tensors), {**base.meta, "base": base.method})
        q = MeanField(net_factory(), fit.init_sigma, families.get(fit.family, fit.family_path))

        def loss(m: MeanField, x: Tensor, y: Tensor, n_train: int) -> Tensor:
            nll = F.cross_entropy(m(x, fit.local_reparam), y)
            return nll + fit.kl_weight * m.kl(fit.prior_std) / n_train

        def val_nll(m: MeanField, x: Tensor, y: Tensor) -> Tensor:
            rows = x.repeat(fit.val_samples, *[1] * (x.dim() - 1))
            if m.family.name != "gaussian":
                return predictive_nll(m.sampled(x, fit.val_samples), y)
            return predictive_nll(m(rows, True).reshape(fit.val_samples, len(x), -1), y)

        training.train(q, data, fit, loss, val_nll)
        mu, sigma = q.moments()
        tensors = {f"mu.{k}": v.detach().clone() for k, v in mu.items()}
        tensors |= {f"sigma.{k}": v.detach().clone() for k, v in sigma.items()}
        tensors |= {f"buffer.{k}": v.detach().clone() for k, v in q.net.named_buffers()}
        return Posterior(self.name, tensors, {"prior_std": fit.prior_std})

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: SVIConfig
    ) -> InferenceProgram:
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")
        family = families.get(cfg.family or cfg.fit.family, cfg.family_path or cfg.fit.family_path)
        return SampledWeights(net_factory(), posterior, cfg.samples, cfg.local_reparam, family)

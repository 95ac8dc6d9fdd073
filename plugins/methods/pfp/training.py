"""PFP training: fit a mean-field posterior through the moment program itself.

The loss is the tempered ELBO of SVI (same prior, same kl_weight, same MeanField), but
the expected log-likelihood is taken under the Gaussian logits N(mean, var) that PFP
computes in closed form, instead of under sampled weights. Two estimators of it:

- "mc" (default): `logit_samples` draws of the logits only, eps ~ N(0, 1) on [S, B, C];
  unbiased for E[log softmax(f)_y] and costs nothing next to the forward pass, because
  no weight or activation is sampled;
- "probit": -log softmax(mean / sqrt(1 + pi/8 var))_y, sampling-free; it is the log of
  the approximate predictive, so it upper-bounds the expected log-likelihood (Jensen) and
  rewards variance less than the ELBO does.

Validation NLL is the probit predictive's, the quantity the harness evaluates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from harness.api import DataBundle, HarnessError, NetFactory, Posterior, training
from harness.api import moments as gops
from plugins.methods.svi import MeanField, SVIFit

OBJECTIVES = ("mc", "probit")


def moments(q: MeanField, x: Tensor) -> tuple[Tensor, Tensor]:
    """Gaussian logits of the current posterior; ops are rebuilt so gradients reach mu, rho."""
    mu, sigma = q.moments()
    return gops.run(gops.build_ops(q.net, mu, {k: s * s for k, s in sigma.items()}), x)


def probit_log_probs(mean: Tensor, var: Tensor) -> Tensor:
    return F.log_softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)


def expected_nll(mean: Tensor, var: Tensor, y: Tensor, objective: str, samples: int) -> Tensor:
    if objective == "probit":
        return F.nll_loss(probit_log_probs(mean, var), y)
    eps = torch.randn(samples, *mean.shape, dtype=mean.dtype)
    logits = mean + (var + 1e-12).sqrt() * eps  # +tiny: finite gradient where var == 0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(samples))


def fit_pfp(
    net_factory: NetFactory, data: DataBundle, fit: SVIFit, objective: str, samples: int
) -> Posterior:
    if objective not in OBJECTIVES:
        raise HarnessError(
            f"method.fit.objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'"
        )
    if samples <= 0:
        raise HarnessError(f"method.fit.logit_samples must be positive, got {samples}")
    if fit.prior_std <= 0 or fit.init_sigma <= 0:
        raise HarnessError("method.fit.prior_std and init_sigma must be positive")
    q = MeanField(net_factory(), fit.init_sigma)

    def loss(m: MeanField, x: Tensor, y: Tensor, n_train: int) -> Tensor:
        mean, var = moments(m, x)
        nll = expected_nll(mean, var, y, objective, samples)
        return nll + fit.kl_weight * m.kl(fit.prior_std) / n_train

    def val_nll(m: MeanField, x: Tensor, y: Tensor) -> Tensor:
        return F.nll_loss(probit_log_probs(*moments(m, x)), y)

    training.train(q, data, fit, loss, val_nll)
    mu, sigma = q.moments()
    tensors = {f"mu.{k}": v.detach().clone() for k, v in mu.items()}
    tensors |= {f"sigma.{k}": v.detach().clone() for k, v in sigma.items()}
    return Posterior("pfp", tensors, {"prior_std": fit.prior_std, "objective": objective})

"""Quantization-aware fine-tuning of an SVI posterior (method `svi_qat`).

Low bit widths move mu and sigma off what the ELBO optimised; a few epochs of training
with the stored grid in the loop (straight-through gradients) let the posterior settle on
it. The quantizer cannot do this itself (it sees a posterior, not data or a network), so
this is a method whose base is SVI: its posterior is fitted (or loaded from the cache) as
usual, then fine-tuned with the same Lightning loop and ELBO, mu on the uniform grid and
sigma on the logarithmic one that `quant=vpq`/`jq` store, and, optionally, ReLU outputs
quantized as JQ computes them. The result is still a float posterior: run it with the
matching quantizer (conf/method/svi_qat.yaml reads quant.bits) to store it at b bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from harness.api import (
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
    check_bits,
    fake_quant,
    log_quant,
    training,
)
from plugins.methods.svi import MeanField, QuantReLU, SampledWeights, SVIConfig, predictive_nll


@dataclass
class QATFit(training.FitConfig):
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    bits: int = 4
    per_channel: bool = True
    activations: bool = False  # also quantize ReLU outputs while training (for quant=jq)
    prior_std: float = 1.0
    kl_weight: float = 0.03
    val_samples: int = 16


@dataclass
class SVIQATConfig:
    name: str = "svi_qat"
    samples: int = 100
    local_reparam: bool = False
    fit: QATFit = field(default_factory=QATFit)
    base: Any = field(default_factory=SVIConfig)


class QuantAwareMeanField(MeanField):
    """The SVI guide with its moments read through the VPQ grid (STE gradients)."""

    def __init__(self, net: nn.Module, posterior: Posterior, fit: QATFit):
        super().__init__(net, init_sigma=1.0)
        self.bits, self.per_channel = fit.bits, fit.per_channel
        with torch.no_grad():
            for name, p, rho in zip(self.names, net.parameters(), self.rho, strict=True):
                p.copy_(posterior.tensors[f"mu.{name}"])
                sigma = posterior.tensors[f"sigma.{name}"].clamp_min(1e-12)
                rho.copy_(sigma + torch.log(-torch.expm1(-sigma)))  # softplus^-1

    def moments(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        mu, sigma = super().moments()
        dims = {k: 0 if self.per_channel and v.dim() >= 2 else None for k, v in mu.items()}
        mu = {k: fake_quant(v, self.bits, dims[k]) for k, v in mu.items()}
        return mu, {k: log_quant(v, self.bits) for k, v in sigma.items()}


def check_qat_bits(bits: int) -> None:
    try:
        check_bits(bits)
    except HarnessError as err:
        raise HarnessError(
            f"method svi_qat fine-tunes for a quantizer: use quant=vpq, spq or jq ({err})"
        ) from None


class SVIQAT(MethodBase):
    name = "svi_qat"
    base = "svi"
    fit_options = ()  # QAT settings live in fit

    def check(self, cfg: SVIQATConfig) -> None:
        """Before the base trains: QAT needs a b-bit quantizer to aim at."""
        check_qat_bits(cfg.fit.bits)
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")

    def base_config(self, cfg: SVIQATConfig) -> tuple[str, Any]:
        return cfg.base.name, cfg.base

    def fit(
        self, net_factory: NetFactory, data: DataBundle, cfg: SVIQATConfig, base: Posterior | None
    ) -> Posterior:
        fit = cfg.fit
        check_qat_bits(fit.bits)
        if base is None or not any(k.startswith("sigma.") for k in base.tensors):
            raise HarnessError("svi_qat fine-tunes a mean-field posterior: its base must be svi")
        net = net_factory()
        if fit.activations:
            for i, layer in enumerate(net):
                if isinstance(layer, nn.ReLU):
                    net[i] = QuantReLU(fit.bits)
        q = QuantAwareMeanField(net, base, fit)

        def loss(m: MeanField, x: Tensor, y: Tensor, n_train: int) -> Tensor:
            nll = F.cross_entropy(m(x, True), y)  # local reparameterisation, as SVI trains
            return nll + fit.kl_weight * m.kl(fit.prior_std) / n_train

        def val_nll(m: MeanField, x: Tensor, y: Tensor) -> Tensor:
            rows = x.repeat(fit.val_samples, *[1] * (x.dim() - 1))
            return predictive_nll(m(rows, True).reshape(fit.val_samples, len(x), -1), y)

        training.train(q, data, fit, loss, val_nll)
        mu, sigma = MeanField.moments(q)  # the float latents; the quantizer stores them
        tensors = {f"mu.{k}": v.detach().clone() for k, v in mu.items()}
        tensors |= {f"sigma.{k}": v.detach().clone() for k, v in sigma.items()}
        meta = base.meta | {"qat": {"bits": fit.bits, "epochs": fit.epochs}}
        return Posterior(self.name, tensors, meta)

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: SVIQATConfig
    ) -> InferenceProgram:
        if cfg.samples <= 0:
            raise HarnessError(f"method.samples must be positive, got {cfg.samples}")
        return SampledWeights(net_factory(), posterior, cfg.samples, cfg.local_reparam)

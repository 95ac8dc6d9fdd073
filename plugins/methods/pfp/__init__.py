"""PFP, the probabilistic forward pass: Gaussian logits from one pass, no sampling.

Mean-field Gaussian weights and Gaussian activations, propagated by their first two
moments layer by layer (ops.py). By default it runs on the SVI posterior, trained with
SVI's own config so the cache entry is the one `method=svi` uses: PFP vs SVI is then a
like-for-like comparison of inference alone. `method.train=true` fits its own posterior
through the moment program (training.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import pluggy
from omegaconf import DictConfig, OmegaConf

from harness.api import (
    ConfigSchema,
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
    QuantSpec,
)
from harness.api import moments as gops
from plugins.methods.pfp.program import PFPProgram
from plugins.methods.svi import SVIConfig, SVIFit

hookimpl = pluggy.HookimplMarker("bnn_harness")


@dataclass
class PFPFit(SVIFit):
    """SVI's settings (shared with its cache entry) plus the PFP-training objective."""

    objective: str = "mc"
    logit_samples: int = 16


@dataclass
class PFPConfig:
    name: str = "pfp"
    train: bool = False
    fit: PFPFit = field(default_factory=PFPFit)
    # A whole method config whose diagonal posterior to propagate (e.g.
    # `method@method.base=imported`); None: SVI trained with `fit`.
    base: Any = None


def svi_node(fit: DictConfig) -> DictConfig:
    """A plain `method=svi` config with these fit settings: same training key, same cache."""
    shared = {f.name: fit[f.name] for f in fields(SVIFit)}
    return OmegaConf.structured(SVIConfig(fit=SVIFit(**shared)))


def make_program(posterior: Posterior, net_factory: NetFactory) -> PFPProgram:
    net = gops.load_buffers(posterior, net_factory().eval())
    mu, var = gops.diagonal_moments(posterior, net)
    quant = QuantSpec.from_meta(posterior.meta)
    act_bits = quant.bits if quant is not None and quant.activations else None
    return PFPProgram(gops.build_ops(net, mu, var, quant), act_bits)


class PFP(MethodBase):
    name = "pfp"
    base = "svi"
    fit_options = ()  # train picks the base; objective lives in fit

    def base_config(self, cfg: DictConfig) -> tuple[str, DictConfig] | None:
        if cfg.train:
            return None
        node = cfg.get("base")
        return (node.name, node) if node is not None else (self.base, svi_node(cfg.fit))

    def check(self, cfg: DictConfig) -> None:
        objectives = ("mc", "probit")
        if cfg.train and cfg.fit.objective not in objectives:
            raise HarnessError(
                f"method.fit.objective={cfg.fit.objective!r} is not valid for pfp; "
                f"valid values: {', '.join(objectives)}"
            )
        if cfg.train and cfg.fit.logit_samples <= 0:
            raise HarnessError(
                f"method.fit.logit_samples must be positive, got {cfg.fit.logit_samples}"
            )

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: PFPConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        if cfg.train:
            from plugins.methods.pfp.training import fit_pfp

            return fit_pfp(net_factory, data, cfg.fit, cfg.fit.objective, cfg.fit.logit_samples)
        if base is None:
            raise HarnessError("pfp needs a base posterior (svi) unless method.train=true")
        return Posterior(self.name, dict(base.tensors), {**base.meta, "base": base.method})

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: PFPConfig
    ) -> InferenceProgram:
        return make_program(posterior, net_factory)


@hookimpl
def bnn_harness_methods() -> list:
    return [PFP()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("method", "pfp_schema", PFPConfig)]

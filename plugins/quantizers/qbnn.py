"""Quantized BNNs (Borras et al., "Uncertainty-Preserving QBNNs"): VPQ, SPQ and JQ.

- vpq stores the variational parameters at b bits: mu on a symmetric uniform grid (one
  scale per tensor or per output channel), sigma on a logarithmic grid, because sigmas
  span orders of magnitude and a uniform grid rounds the small ones to zero. Programs
  compute in float on the dequantized tensors; the memory account counts what is stored.
- spq keeps float storage and asks the program (posterior.meta["quant"]) to quantize every
  sampled, or propagated, weight tensor at b bits before it is used.
- jq is both, plus activations: the program quantizes only post-ReLU activations, whose
  range is known ([0, max], so the unsigned grid gives all b bits to magnitude) with one
  dynamic scale per input row and sample, so a prediction never depends on its batch-mates.
  Network inputs and logits stay float: the logits carry the predictive distribution whose
  entropy split is measured, and quantizing them would measure the quantizer instead.

Posteriors without `mu.`/`sigma.` tensors (a deterministic `net.*`, ensemble `member*.`)
have every float tensor stored on the uniform grid: that is VPQ of a point estimate. For
them SPQ quantizes the stored tensors directly (the sampled weights are the stored ones),
keeping the float32 storage account. Integer tensors (counters) are kept and counted as is.
Run-time quantization (SPQ's draws, JQ's activations) happens only in programs that read
QuantSpec (SVI's SampledWeights, PFP); other programs ignore meta["quant"].
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy
import torch
from torch import Tensor

from harness.api import (
    ConfigSchema,
    HarnessError,
    MemoryAccount,
    Posterior,
    QuantizerBase,
    check_bits,
    fake_quant,
    log_quant,
    require_finite,
)

hookimpl = pluggy.HookimplMarker("bnn_harness")

SIGMA_SCHEMES = ("log", "pow2", "uniform")


@dataclass
class VPQConfig:
    name: str = "vpq"
    bits: int = 4
    per_channel: bool = True  # mu: one scale per output channel of every weight (ndim >= 2)
    sigma_scheme: str = "log"  # log: uniform in log2; pow2: power-of-two codes; uniform


@dataclass
class SPQConfig:
    name: str = "spq"
    bits: int = 4


@dataclass
class JQConfig:
    name: str = "jq"
    bits: int = 4
    per_channel: bool = True
    sigma_scheme: str = "log"
    activations: bool = True  # false: VPQ storage + SPQ only


def quant_bytes(count: int, bits: int, scales: int) -> int:
    """Bytes of `count` codes of `bits` bits packed together, plus float32 scale words."""
    return -(-count * bits // 8) + 4 * scales


def pow2_quant(x: Tensor, bits: int) -> Tensor:
    """Nearest power of two, exponents in a window of 2^b - 1 codes below the largest.

    Code 0 is zero; one float32 word (the top exponent) per tensor. Smaller values clamp
    to the window's bottom, which is what makes pow2 coarser than `log` at low bits.
    """
    mag = x.abs()
    nonzero = mag > 0
    expo = torch.log2(torch.where(nonzero, mag, torch.ones_like(mag))).round()
    top = expo[nonzero].max() if nonzero.any() else torch.zeros(())
    expo = expo.clamp(top - (2**bits - 2), top)
    return torch.where(nonzero, torch.sign(x) * torch.exp2(expo), torch.zeros_like(x))


def quantize_sigma(t: Tensor, bits: int, scheme: str) -> tuple[Tensor, int]:
    """The dequantized sigma and its number of float32 scale words."""
    if scheme == "log":
        return log_quant(t, bits), 2
    if scheme == "pow2":
        return pow2_quant(t, bits), 1
    return fake_quant(t, bits), 1


def store(
    posterior: Posterior, bits: int, per_channel: bool, sigma_scheme: str
) -> tuple[dict[str, Tensor], MemoryAccount]:
    """Every float tensor quantized as stored; bytes against float32 storage of the same."""
    check_options(VPQConfig(bits=bits, sigma_scheme=sigma_scheme))
    out: dict[str, Tensor] = {}
    before = after = 0
    for name, t in posterior.tensors.items():
        if not t.is_floating_point():
            out[name] = t
            size = t.numel() * t.element_size()
            before, after = before + size, after + size
            continue
        require_finite(t, f"posterior tensor '{name}'")
        if name.startswith("sigma."):
            if (t < 0).any():
                raise HarnessError(f"posterior tensor '{name}' is a std but has negative entries")
            q, scales = quantize_sigma(t, bits, sigma_scheme)
        else:
            dim = 0 if per_channel and t.dim() >= 2 else None
            q, scales = fake_quant(t, bits, dim), (t.shape[0] if dim == 0 else 1)
        out[name] = q.to(t.dtype)
        before += 4 * t.numel()
        after += quant_bytes(t.numel(), bits, scales)
    return out, MemoryAccount(bytes_before=before, bytes_after=after)


def float32_account(posterior: Posterior) -> MemoryAccount:
    size = sum(
        (4 if t.is_floating_point() else t.element_size()) * t.numel()
        for t in posterior.tensors.values()
    )
    return MemoryAccount(bytes_before=size, bytes_after=size)


def has_sigma(posterior: Posterior) -> bool:
    return any(k.startswith("sigma.") for k in posterior.tensors)


def with_spec(posterior: Posterior, bits: int, activations: bool) -> dict:
    return posterior.meta | {"quant": {"bits": bits, "weights": True, "activations": activations}}


def check_options(cfg: VPQConfig | SPQConfig | JQConfig) -> None:
    """Called by the runner before anything trains, so a bad width costs no training."""
    check_bits(cfg.bits)
    scheme = getattr(cfg, "sigma_scheme", "log")
    if scheme not in SIGMA_SCHEMES:
        raise HarnessError(
            f"quant.sigma_scheme must be one of {', '.join(SIGMA_SCHEMES)}, got {scheme!r}"
        )


class VPQ(QuantizerBase):
    name = "vpq"
    check = staticmethod(check_options)

    def apply(self, posterior: Posterior, cfg: VPQConfig) -> tuple[Posterior, MemoryAccount]:
        tensors, account = store(posterior, cfg.bits, cfg.per_channel, cfg.sigma_scheme)
        return Posterior(posterior.method, tensors, dict(posterior.meta)), account


class SPQ(QuantizerBase):
    name = "spq"
    check = staticmethod(check_options)

    def apply(self, posterior: Posterior, cfg: SPQConfig) -> tuple[Posterior, MemoryAccount]:
        check_bits(cfg.bits)
        account = float32_account(posterior)
        tensors = dict(posterior.tensors)
        if not has_sigma(posterior):
            tensors = {
                k: fake_quant(t, cfg.bits) if t.is_floating_point() else t
                for k, t in tensors.items()
            }
        return Posterior(posterior.method, tensors, with_spec(posterior, cfg.bits, False)), account


class JQ(QuantizerBase):
    name = "jq"
    check = staticmethod(check_options)

    def apply(self, posterior: Posterior, cfg: JQConfig) -> tuple[Posterior, MemoryAccount]:
        tensors, account = store(posterior, cfg.bits, cfg.per_channel, cfg.sigma_scheme)
        meta = with_spec(posterior, cfg.bits, cfg.activations)
        return Posterior(posterior.method, tensors, meta), account


@hookimpl
def bnn_harness_quantizers() -> list:
    return [VPQ(), SPQ(), JQ()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [
        ConfigSchema("quant", "vpq_schema", VPQConfig),
        ConfigSchema("quant", "spq_schema", SPQConfig),
        ConfigSchema("quant", "jq_schema", JQConfig),
    ]

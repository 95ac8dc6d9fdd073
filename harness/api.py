"""Contracts between the core and plugins.

Plugins import only from here (and from libraries); the core never imports a plugin.
Everything that crosses a boundary is plain data (tensors, dicts, dataclasses), so
posteriors save without pickling code and programs compile on any backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

Split = tuple[Tensor, Tensor]
OutputKind = Literal["samples", "moments"]
NetFactory = Callable[[], nn.Module]


class HarnessError(Exception):
    """A user-facing error: printed as one line, never as a traceback wall."""


@dataclass(frozen=True)
class DataSpec:
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass
class DataBundle:
    """In-distribution splits, an optional aleatoric-heavy split and OOD sets."""

    train: Split
    val: Split
    test: Split
    spec: DataSpec
    ambiguous: Split | None = None
    ood: dict[str, Split] = field(default_factory=dict)

    def splits(self) -> dict[str, Split]:
        named = {"train": self.train, "val": self.val, "test": self.test}
        if self.ambiguous is not None:
            named["ambiguous"] = self.ambiguous
        named.update({f"ood_{k}": v for k, v in self.ood.items()})
        return named


@dataclass
class Posterior:
    """Tensors plus JSON metadata; saved with safetensors so loading runs no code."""

    method: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        flat = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(flat, str(directory / "tensors.safetensors"))
        (directory / "meta.json").write_text(
            json.dumps({"method": self.method, "meta": self.meta}, indent=2, sort_keys=True)
        )

    @classmethod
    def load(cls, directory: Path) -> Posterior:
        head = json.loads((directory / "meta.json").read_text())
        tensors = load_file(str(directory / "tensors.safetensors"))
        return cls(method=head["method"], tensors=tensors, meta=head["meta"])

    def subset(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under `prefix.`, with the prefix stripped (a state dict)."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


MOMENT_OPS = ("dense", "conv2d", "relu", "maxpool2d", "avgpool2d", "batchnorm", "flatten")


@dataclass
class MomentOp:
    """One layer of a moment-propagation program, as plain data a backend can lower.

    A backend that has its own Gaussian operators (TVM) compiles the list instead of
    tracing the module, so both run the same graph. Conventions, shared by every
    backend: activations are (mean, variance) pairs; the input is deterministic.

    - dense: tensors mean_w [out, in], var_w [out, in], mean_b [out], var_b [out];
      attrs first (bool: input has no variance). mean = m W^T + b;
      var = (m^2 + v) var_w^T + v (mean_w^2)^T + var_b (first: x^2 var_w^T + var_b).
    - conv2d: tensors as dense with weights [out, in, kh, kw]; attrs first, stride,
      padding (ints), same formulas with convolution in place of the matrix product.
    - relu: exact moments of max(0, N(m, v)).
    - maxpool2d / avgpool2d: attrs kernel, stride. Max of the window folded pairwise in
      row-major order, ((x00 v x01) v x10) v x11, each step Clark's moment match.
    - batchnorm: tensors scale [C], shift [C] (eval mode folded): m*scale + shift,
      v*scale^2, broadcast over the channel axis 1.
    - flatten: from axis 1.
    """

    op: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class InferenceProgram(nn.Module):
    """A module mapping a batch to raw outputs of a declared kind.

    kind "samples": logits of S passes, [S, B, C].
    kind "moments": Gaussian logits as a tuple (mean [B, C], variance [B, C]).
    """

    kind: OutputKind = "samples"

    def moment_ops(self) -> list[MomentOp] | None:
        """The program as a MomentOp list, when it is pure moment propagation."""
        return None


@runtime_checkable
class Executable(Protocol):
    def __call__(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Predictive:
    """Same structure for every method: probabilities and the entropy split."""

    probs: Tensor
    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


@runtime_checkable
class Method(Protocol):
    """`base` names the method whose posterior this one starts from (or None).

    The runner fits or loads the base through the cache, keyed by `cfg.fit`, and
    passes it in, so e.g. MC dropout reuses the deterministic network unretrained.
    """

    name: str
    base: str | None

    def fit(
        self, net_factory: NetFactory, data: DataBundle, cfg: Any, base: Posterior | None
    ) -> Posterior: ...

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: Any
    ) -> InferenceProgram: ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def compile(self, program: InferenceProgram, example: Tensor, cfg: Any) -> Executable: ...


@runtime_checkable
class Dataset(Protocol):
    name: str

    def load(self, cfg: Any, seed: int) -> DataBundle: ...


@runtime_checkable
class Model(Protocol):
    name: str

    def factory(self, cfg: Any, spec: DataSpec) -> NetFactory: ...


@dataclass
class MemoryAccount:
    bytes_before: int
    bytes_after: int


QUANT_BITS = range(2, 9)


@dataclass(frozen=True)
class QuantSpec:
    """What a program quantizes while it computes (SPQ, JQ), read from posterior.meta["quant"].

    Stored parameters are quantized by the quantizer itself (VPQ); this spec is for what only
    exists at run time: sampled or propagated weights, and activations.
    """

    bits: int
    weights: bool = False
    activations: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> QuantSpec | None:
        node = meta.get("quant")
        if node is None:
            return None
        unknown = set(node) - {"bits", "weights", "activations"}
        if unknown:
            raise HarnessError(
                f"posterior meta 'quant' has unknown keys {sorted(unknown)}; "
                "valid keys: bits, weights, activations"
            )
        return cls(**node)


def check_bits(bits: Any) -> None:
    """Fail early and by name: 16/32 bits are float formats, spelt `quant=none`."""
    valid = f"{QUANT_BITS.start}..{QUANT_BITS.stop - 1}"
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANT_BITS:
        hint = " (float16/float32 is quant=none)" if bits in (16, 32) else ""
        raise HarnessError(f"quant.bits must be an integer in {valid}, got {bits!r}{hint}")


def _keep(x: Tensor, dim: int | None) -> list[int]:
    """The axes reduced over when one scale serves each slice along `dim` (all if None)."""
    if dim is None:
        return list(range(x.dim()))
    return [d for d in range(x.dim()) if d != dim % x.dim()]


def fake_quant(x: Tensor, bits: int, dim: int | None = None) -> Tensor:
    """Uniform quantize-dequantize with one max-magnitude scale per tensor or per slice.

    Slices with a negative entry use the symmetric grid s * clip(round(x / s), -2^(b-1),
    2^(b-1) - 1), s = max|x| / (2^(b-1) - 1). Non-negative slices (post-ReLU activations)
    spend the sign bit on magnitude: s * clip(round(x / s), 0, 2^b - 1), s = max x / (2^b - 1);
    the mode costs no storage since it can ride in the always-positive scale's sign bit.
    `dim` keeps one scale per slice along it (per output channel, per sample, per row).
    The choice is made with tensor ops, not Python branches, so it traces and vmaps. The
    gradient passes straight through (STE), so quantization-aware training works.
    """
    check_bits(bits)
    signed_top = 2 ** (bits - 1) - 1
    if x.dim() == 0:
        return fake_quant(x.reshape(1), bits).reshape(())
    axes = _keep(x, dim)
    xd = x.detach()
    if axes:
        peak = xd.abs().amax(dim=axes, keepdim=True)
        signed = (xd < 0).any(dim=axes, keepdim=True)
    else:  # a 1-d tensor with one scale per entry
        peak, signed = xd.abs(), xd < 0
    top = torch.where(signed, signed_top, 2 * signed_top + 1).to(x.dtype)
    bottom = torch.where(signed, -signed_top - 1, 0).to(x.dtype)
    scale = peak.clamp_min(torch.finfo(x.dtype).tiny) / top
    q = torch.minimum(torch.maximum((xd / scale).round(), bottom), top) * scale
    return q + (x - xd)  # exactly q forward, identity gradient (STE)


def log_quant(x: Tensor, bits: int, dim: int | None = None) -> Tensor:
    """Logarithmic quantize-dequantize for standard deviations and variances.

    Code 0 is exact zero (e.g. sigma outside a last-layer subset); the other 2^b - 1 codes
    spread log2|x| uniformly from its smallest to its largest non-zero value per tensor (or
    per slice along `dim`), so the relative error is at most 2^(step / 2) - 1 at every order
    of magnitude, where a uniform grid would round small sigmas to zero. Two float32 numbers
    (offset, step) per scale group are stored. Meant for non-negative tensors; a sign is
    carried through but is not part of the b bits. Gradient: straight through.
    """
    check_bits(bits)
    if x.dim() == 0:
        return log_quant(x.reshape(1), bits).reshape(())
    axes = _keep(x, dim)
    xd = x.detach()
    mag = xd.abs()
    nonzero = mag > 0
    logs = torch.log2(torch.where(nonzero, mag, torch.ones_like(mag)))
    low = torch.where(nonzero, logs, torch.full_like(logs, torch.inf))
    high = torch.where(nonzero, logs, torch.full_like(logs, -torch.inf))
    if axes:
        low, high = low.amin(axes, keepdim=True), high.amax(axes, keepdim=True)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    span = (high - low).clamp_min(0)
    levels = 2**bits - 2  # intervals between the 2^b - 1 non-zero codes
    step = torch.where(span > 0, span / levels, torch.ones_like(span))
    code = ((logs - low) / step).round().clamp(0, levels)
    q = torch.where(nonzero, torch.sign(xd) * torch.exp2(low + code * step), torch.zeros_like(xd))
    return q + (x - xd)  # exactly q forward, identity gradient (STE)


@runtime_checkable
class Quantizer(Protocol):
    name: str

    def apply(self, posterior: Posterior, cfg: Any) -> tuple[Posterior, MemoryAccount]: ...


@dataclass(frozen=True)
class ConfigSchema:
    """A structured-config node a plugin registers with Hydra's ConfigStore."""

    group: str
    name: str
    node: Any


def param_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def require_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise HarnessError(f"{what} contains NaN or infinite values")

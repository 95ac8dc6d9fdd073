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

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> QuantSpec | None:
        node = meta.get("quant")
        return None if node is None else cls(**node)


def check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise HarnessError(f"quant.bits must be an integer in 2..8, got {bits}")


def fake_quant(x: Tensor, bits: int, dim: int | None = None) -> Tensor:
    """Symmetric uniform quantize-dequantize, s * clip(round(x / s), -2^(b-1), 2^(b-1) - 1).

    The scale is the max magnitude per tensor (or per slice along `dim`, e.g. per output
    channel); the gradient passes straight through so quantization-aware training works.
    """
    check_bits(bits)
    levels = 2 ** (bits - 1) - 1
    mag = x.detach().abs()
    if dim is None:
        peak = mag.amax()
    else:
        peak = mag.amax(dim=[d for d in range(x.dim()) if d != dim % x.dim()], keepdim=True)
    scale = peak.clamp_min(torch.finfo(x.dtype).tiny) / levels
    q = (x / scale).round().clamp(-levels - 1, levels) * scale
    return x + (q - x).detach()


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

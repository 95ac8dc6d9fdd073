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


class InferenceProgram(nn.Module):
    """A module mapping a batch to raw outputs of a declared kind.

    kind "samples": logits of S passes, [S, B, C].
    kind "moments": Gaussian logits as a tuple (mean [B, C], variance [B, C]).
    """

    kind: OutputKind = "samples"


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

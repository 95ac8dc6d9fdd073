"""Contracts between the core and plugins.

Plugins import only from here (and from libraries); the core never imports a plugin.
Everything that crosses a boundary is plain data (tensors, dicts, dataclasses), so
posteriors save without pickling code and programs compile on any backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

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


MOMENT_OPS = ("dense", "conv2d", "relu", "maxpool2d", "avgpool2d", "batchnorm", "flatten", "add")
MOMENT_INPUT = "input"  # the name MomentOp.inputs use for the program's (deterministic) input


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
    - add: two inputs, m1 + m2 and v1 + v2 (a residual connection). Adding variances assumes
      the two branches are independent, the mean-field assumption every op here makes; a
      skip connection shares its input with the branch, so this is an approximation.

    A list of ops is a chain unless ops say otherwise: an op with empty `inputs` takes the
    previous op's output (the first op takes the program input), so every list written
    before graphs existed means what it meant. `inputs` names the ops whose outputs it
    takes, by their `name` (MOMENT_INPUT is the program input); the last op's output is
    the program's output. Ops only refer to ops before them, so the list is in
    topological order and a backend may run it front to back.
    """

    op: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    inputs: tuple[str, ...] = ()


DISTRIBUTIONS = ("normal", "uniform", "bernoulli(p)")


@dataclass(frozen=True)
class Draw:
    """One random tensor a program needs per call, declared so a compiler can take it as input.

    dist: "normal" (standard), "uniform" on [0, 1), or "bernoulli(p)" (1.0 with probability
    p, else 0.0; dropout's keep mask is "bernoulli(1 - rate)"). Graph compilers freeze or drop
    random operators (TVM's PyTorch frontend turns randn into a constant and dropout into the
    identity), so a backend that compiles a graph feeds these in instead, sampled per call.
    """

    name: str
    shape: tuple[int, ...]
    dist: str

    def __post_init__(self) -> None:
        if self.dist not in ("normal", "uniform") and _bernoulli_p(self.dist) is None:
            raise HarnessError(
                f"draw '{self.name}': unknown distribution '{self.dist}'; "
                f"valid: {', '.join(DISTRIBUTIONS)}"
            )

    def sample(self, generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
        """A fresh draw; into `out` when given (same values as without: torch.randn and
        torch.rand are normal_ and uniform_ on a new tensor)."""
        if out is None:
            out = torch.empty(self.shape)
        if self.dist == "normal":
            return out.normal_(generator=generator)
        out.uniform_(generator=generator)
        if self.dist == "uniform":
            return out
        return out.copy_(out < self.bernoulli_p)

    @property
    def bernoulli_p(self) -> float | None:
        """p of a "bernoulli(p)" draw (None for the others): for a compiler drawing it itself."""
        return _bernoulli_p(self.dist)


def _bernoulli_p(dist: str) -> float | None:
    if not (dist.startswith("bernoulli(") and dist.endswith(")")):
        return None
    try:
        p = float(dist[len("bernoulli(") : -1])
    except ValueError:
        return None
    return p if 0.0 <= p <= 1.0 else None


def sample_draws(
    draws: list[Draw], generator: torch.Generator | None = None, out: list[Tensor] | None = None
) -> list[Tensor]:
    """Fresh noise for one call, in declaration order (the order `with_draws` expects).

    out: buffers of the draws' shapes, refilled in place. A compiled executable that owns
    its inputs reuses them call after call: a fresh 31 MB tensor (SVI's MLP at batch 100)
    costs its page faults on every call, 36 ms to draw instead of 27 here.

    Drawn on one PyTorch thread: the generators are serial anyway, and a parallel
    comparison (a Bernoulli mask) left PyTorch's OpenMP worker spinning for milliseconds
    on the core that the compiled program's own workers then needed (MC dropout's MLP at
    batch 100 on TVM, two cores: 8.4 ms in TVM's kernels instead of 1.2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if out is None:
            return [d.sample(generator) for d in draws]
        return [d.sample(generator, buf) for d, buf in zip(draws, out, strict=True)]
    finally:
        torch.set_num_threads(threads)


def draw_buffers(draws: list[Draw]) -> list[Tensor]:
    """Buffers for `sample_draws(..., out=)`, one per draw."""
    return [torch.empty(d.shape) for d in draws]


_NORMAL = (torch.randn, torch.randn_like)
_UNIFORM = (torch.rand, torch.rand_like)


def _draw_shape(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...]:
    if func in (torch.randn_like, torch.rand_like):
        return tuple(args[0].shape)
    size = kwargs.get("size", args)
    if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
        size = size[0]
    return tuple(int(s) for s in size)


class DrawsAsInputs(TorchFunctionMode):
    """Records a program's random draws (feed None) or serves them from `feed`, in order.

    Intercepts torch.randn/randn_like (normal), torch.rand/rand_like (uniform) and
    F.dropout (a bernoulli keep mask), the draws PyTorch programs make. Served noise
    replaces each call in order, so a program must make its draws through these calls
    (no private torch.Generator, which is refused rather than silently frozen).
    """

    def __init__(self, feed: list[Tensor] | None = None):
        super().__init__()
        self.feed, self.draws = feed, []

    def _next(self, shape: tuple[int, ...], dist: str) -> Tensor:
        draw = Draw(f"draw{len(self.draws)}", shape, dist)
        self.draws.append(draw)
        if self.feed is None:
            return draw.sample()
        i = len(self.draws) - 1
        if i >= len(self.feed) or tuple(self.feed[i].shape) != shape:
            raise HarnessError("the program's random draws changed between tracing and export")
        return self.feed[i]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMAL or func in _UNIFORM:
            if kwargs.get("generator") is not None:
                raise HarnessError(
                    "a program with its own torch.Generator must declare its draws "
                    "(override InferenceProgram.draws)"
                )
            dist = "normal" if func in _NORMAL else "uniform"
            return self._next(_draw_shape(func, args, kwargs), dist)
        if func is F.dropout:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if not training or p == 0:
                return x
            keep = self._next(tuple(x.shape), f"bernoulli({1.0 - p:g})")
            return x * keep.to(x.dtype) / (1.0 - p)
        return func(*args, **kwargs)


class WithDraws(nn.Module):
    """A program as a pure function of (x, *noise): what a graph compiler exports.

    The noise tensors are the program's draws for x's shape, in order (`sample_draws`);
    with the same noise, the output equals the program's eager output under that noise.
    """

    def __init__(self, program: InferenceProgram):
        super().__init__()
        self.program = program

    def forward(self, x: Tensor, *noise: Tensor) -> Any:
        with DrawsAsInputs(list(noise)):
            return self.program(x)


def with_draws(program: InferenceProgram, x: Tensor) -> tuple[WithDraws, list[Draw]]:
    """The exportable (x, *noise) module of `program` and its draws at x's shape."""
    return WithDraws(program), program.draws(x)


def over_draws(net: nn.Module, fn: Callable[..., Tensor], *stacked: Any) -> Tensor:
    """`fn` on each draw (dim 0 of every tensor in the `stacked` pytrees), outputs stacked.

    Traced or compiled (torch.export, torch.compile, ONNX): vmap, one batched graph. Eager
    with convolutions in `net`: a loop over draws, because vmap turns a conv with a
    per-draw weight into a grouped conv that oneDNN runs 2-4x slower than the draws' plain
    convs (LeNet-5, 100 draws, batch 100, one core), which would flatter every speedup
    against a sampled reference. Eager dense-only networks: vmap (its bmm wins there).
    """
    traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if traced or not any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules()):
        return torch.vmap(fn)(*stacked)
    count = torch.utils._pytree.tree_leaves(stacked)[0].shape[0]
    return torch.stack(
        [fn(*torch.utils._pytree.tree_map(lambda t, i=i: t[i], stacked)) for i in range(count)]
    )


class InferenceProgram(nn.Module):
    """A module mapping a batch to raw outputs of a declared kind.

    kind "samples": logits of S passes, [S, B, C].
    kind "moments": Gaussian logits as a tuple (mean [B, C], variance [B, C]).

    Train/eval flags are the program's, fixed when it is built: `train()` and `eval()` do
    not reach its submodules, so a backend may call either (exporters do) without turning
    MC dropout's sampling off or a MAP network's dropout on. A program that needs a mode
    sets it on its submodules in `__init__`.
    """

    kind: OutputKind = "samples"

    def train(self, mode: bool = True) -> InferenceProgram:
        self.training = mode  # the flag only: submodules keep the modes the program chose
        return self

    def moment_ops(self) -> list[MomentOp] | None:
        """The program as a MomentOp list, when it is pure moment propagation."""
        return None

    def draws(self, x: Tensor) -> list[Draw]:
        """The random tensors one call on a batch shaped like x takes, in order.

        Default: traced by running the program once under `DrawsAsInputs`, which sees
        torch.randn/rand(_like) and dropout. A deterministic program returns []. Override
        to declare them without a tracing pass; the list must match the calls the program
        makes, in order, since `WithDraws` serves them to those calls.
        """
        with torch.no_grad(), DrawsAsInputs() as mode:
            self(x)
        return mode.draws


@runtime_checkable
class Executable(Protocol):
    """What `Backend.compile` returns: a callable on a batch, plus a description.

    `__call__(x)`: x is a float tensor [B, *input_shape] on the CPU, with any B: the
    runner calls it at every timed batch size and on evaluation chunks of up to
    `eval_batch_size` rows (the last chunk is shorter). It returns torch tensors, the
    program's raw outputs: [S, B, C] for kind "samples", a (mean [B, C], variance [B, C])
    tuple for kind "moments".

    `describe()`: JSON-serialisable facts, written to results.json. Conventional keys:
    "target" (what it runs on), "tuning" (what tuning was used), "compile_s" (the
    backend's own account of compile time, e.g. lazy per-batch-size builds; the logged
    `compile/seconds` is timed by the runner around `compile`, not read from here). The
    one key the runner reads is "tags", a dict of run tags: {"device": "emulated"} marks
    latencies that are not the device's, so no speedup is computed from them.
    """

    def __call__(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Predictive:
    """Same structure for every method: probabilities and the entropy split.

    `variance` is the mean logit variance of a moment program, the seed code's own OOD
    score; sample programs leave it None (their spread is already in `epistemic`).
    """

    probs: Tensor
    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor
    variance: Tensor | None = None


# Plugin contracts. Each kind is a Protocol (what the core calls) plus a base class holding
# the defaults of its optional members. Inheriting the base class is the easy way to meet
# the Protocol; a plugin that does not inherit it gets the missing optional members bound
# from it by the registry when it loads, and a plugin missing a required member is
# reported by the registry (`bnn-harness plugins`) and not loaded. `cfg` is always the
# plugin's own config node (`cfg.method`, `cfg.backend`, ...), a DictConfig built from
# the plugin's registered schema.


class PluginBase:
    """The optional member every kind shares."""

    def check(self, cfg: Any) -> None:
        """Reject bad options with a one-line HarnessError before anything trains.

        Called by the runner for the job's and the reference's plugins before data is
        loaded, a posterior fitted or an MLflow run opened, so a wrong option writes
        nothing. For what Hydra's schema cannot see: ranges, combinations, missing
        optional installs. Default: accept everything.
        """
        return None


@runtime_checkable
class Method(Protocol):
    """Fits a posterior and turns it into an InferenceProgram.

    Required: `name`, `fit`, `program`. Optional (defaults in MethodBase): `base`,
    `fit_options`, `base_config`, `check`.

    `base` names the method whose posterior this one starts from (or None). The runner
    fits or loads the base through the cache and passes it to `fit`, so e.g. MC dropout
    reuses the deterministic network unretrained.
    """

    name: str
    base: str | None
    fit_options: Sequence[str]

    def fit(
        self, net_factory: NetFactory, data: DataBundle, cfg: Any, base: Posterior | None
    ) -> Posterior: ...

    def program(
        self, posterior: Posterior, net_factory: NetFactory, cfg: Any
    ) -> InferenceProgram: ...

    def base_config(self, cfg: Any) -> tuple[str, Any] | None: ...

    def check(self, cfg: Any) -> None: ...


class MethodBase(PluginBase):
    base: str | None = None
    # Keys of the method's config outside `fit` that change the trained posterior (e.g.
    # Laplace's `hessian`): they join the cache key. Everything under `fit` always does.
    fit_options: Sequence[str] = ()

    def base_config(self, cfg: Any) -> tuple[str, Any] | None:
        """The base to start from: (method name, the config node that trains it), or None.

        Default: a `base` node in the config (a whole method config, e.g. linearised on
        Laplace); failing that the fixed `base`, trained with this method's own config so
        that its `fit` settings, and its cache entry, match a plain run of the base.
        Override to choose per config (PFP trains its own posterior with `train=true`).
        """
        node = getattr(cfg, "base", None)
        if node is not None:
            return node.name, node
        return None if self.base is None else (self.base, cfg)

    def base_with_fit(self, cfg: Any) -> tuple[str, Any]:
        """The fixed base's plain config with this method's `fit`: for methods whose own
        options the base does not know (Laplace, SWAG), so the base's cache entry is shared."""
        from omegaconf import OmegaConf

        if self.base is None:
            raise HarnessError(f"method '{self.name}' has no fixed base")
        return self.base, OmegaConf.create({"name": self.base, "fit": cfg.fit})


@runtime_checkable
class Backend(Protocol):
    """Compiles an InferenceProgram into an Executable.

    Required: `name`, `compile`. Optional (defaults in BackendBase): `check`, `release`.

    `compile(program, example, cfg)`: `example` is one test row, shape [1, *input_shape]
    (batch 1), for tracing and for building eagerly so that errors surface in `compile`;
    the Executable is then called at every timed batch size and on evaluation chunks of
    up to `eval_batch_size` rows, so it must accept any batch size (build per shape on
    first use where shapes must be static). `cfg` is the `backend` config node. The
    program's outputs are torch tensors ([S, B, C] samples, or a (mean, var) tuple for
    moments) and the executable must return the same. Random draws: `program.draws(x)`
    lists them; a graph compiler exports `with_draws(program, x)` and feeds
    `sample_draws(draws)` on every call. Train/eval modes are fixed by the program:
    calling `.eval()` on it is harmless. The runner times `compile` itself.

    Errors: options are checked by `check(cfg)` before any run exists; a HarnessError
    raised inside `compile` (e.g. an operator the compiler cannot import) is a real
    failure of that job and is recorded as a FAILED MLflow run.

    Optional hooks (looked up with getattr, no default): `export(program, example, cfg,
    out) -> dict` writes a deployable artefact for the example's batch size into the folder
    `out` (`bnn-harness export`; the runner adds the manifest's common fields and merges
    the returned dict into `out/manifest.json`). Executables may carry `describe()["tags"]`
    (e.g. `{"device": "emulated"}`), which the runner sets as MLflow run tags; an
    emulated candidate timed against a non-emulated reference logs `lat_emulated/...`
    and no `speedup/...`.
    """

    name: str

    def compile(self, program: InferenceProgram, example: Tensor, cfg: Any) -> Executable: ...

    def check(self, cfg: Any) -> None: ...

    def release(self, executable: Executable) -> None: ...


class BackendBase(PluginBase):
    def release(self, executable: Executable) -> None:
        """Free what `executable` holds outside this process once the job is done with it.

        The runner calls it when a job's evaluation and timing end, failed or not. A board
        reached over RPC serves one session at a time: left to garbage collection, a
        finished job's session kept the next client (the next job, another process)
        waiting until the server's session timeout (600 s). Default: nothing to free.
        """
        return None


@runtime_checkable
class Dataset(Protocol):
    """Required: `name`, `load(cfg, seed) -> DataBundle`. Optional: `check` (DatasetBase)."""

    name: str

    def load(self, cfg: Any, seed: int) -> DataBundle: ...

    def check(self, cfg: Any) -> None: ...


class DatasetBase(PluginBase):
    pass


@runtime_checkable
class Model(Protocol):
    """Required: `name`, `factory(cfg, spec) -> () -> nn.Module`. Optional: `check`."""

    name: str

    def factory(self, cfg: Any, spec: DataSpec) -> NetFactory: ...

    def check(self, cfg: Any) -> None: ...


class ModelBase(PluginBase):
    pass


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
    """Required: `name`, `apply(posterior, cfg)`. Optional: `check` (QuantizerBase)."""

    name: str

    def apply(self, posterior: Posterior, cfg: Any) -> tuple[Posterior, MemoryAccount]: ...

    def check(self, cfg: Any) -> None: ...


class QuantizerBase(PluginBase):
    pass


@dataclass(frozen=True)
class Contract:
    """One plugin kind: the Protocol, the base class with its defaults, the required members."""

    protocol: type
    defaults: type
    required: tuple[str, ...]

    def missing(self, plugin: Any) -> list[str]:
        return [m for m in self.required if not hasattr(plugin, m)]

    def optional(self) -> list[str]:
        members = [m for m in dir(self.defaults) if not m.startswith("_")]
        return [m for m in members if m not in self.required]


CONTRACTS: dict[str, Contract] = {
    "method": Contract(Method, MethodBase, ("name", "fit", "program")),
    "backend": Contract(Backend, BackendBase, ("name", "compile")),
    "dataset": Contract(Dataset, DatasetBase, ("name", "load")),
    "model": Contract(Model, ModelBase, ("name", "factory")),
    "quantizer": Contract(Quantizer, QuantizerBase, ("name", "apply")),
}


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


# The shared training loop (harness/training.py), re-exported here because plugins import
# only this module; loaded on first use so that importing the API does not import lightning.
TRAINING = (
    "FitConfig",
    "LossFn",
    "NllFn",
    "active_dropout",
    "cross_entropy_nll",
    "quiet_lightning",
    "state_tensors",
    "train",
)


def __getattr__(name: str) -> Any:
    """`from harness.api import FitConfig, train` or `from harness.api import training`."""
    if name == "moments":  # harness/moments.py imports this module: loaded on first use
        import harness.moments

        return harness.moments
    if name == "training" or name in TRAINING:
        import harness.training

        return harness.training if name == "training" else getattr(harness.training, name)
    raise AttributeError(f"module 'harness.api' has no attribute {name!r}")

"""`method=imported`: a diagonal-Gaussian posterior trained elsewhere, read from a file.

Users have trained BNNs already (Pyro `AutoNormal` guides saved as param-store states,
bayesian-torch models saved as state dicts); this turns such a checkpoint into the same
`mu.` / `sigma.` / `buffer.` Posterior that SVI writes (docs/posterior-format.md), so PFP,
linearisation, SVI's sampler and every quantizer run on it as its `base`:

    bnn-harness run method=pfp method@method.base=imported method.base.path=ckpt.pt

Nothing is trained: `fit` reads the file. The cache key holds the file's sha256 (the
`sha256` option resolves to it), so a changed file is imported again.

Loading runs no code from the file. Pyro's param store is a pickle that holds constraint
objects; it is read with `torch.load(weights_only=True)` and an allowlist of inert
stand-ins for exactly those constraint classes (the stand-ins carry the pickled state and
nothing else; Pyro need not be installed). Any other global is refused, by name.

Formats and what is read:

- `pyro`: `torch.save(pyro.get_param_store().get_state(), path)` with an `AutoNormal`-style
  guide: params `<guide>.locs.<site>` and `<guide>.scales.<site>`. The store keeps
  unconstrained values; each is mapped through its stored constraint (`softplus_positive`
  for AutoNormal's scales, `positive`, `real`), giving AutoNormal's standard deviation.
  `scale_param` says what that constrained value is: `std` (AutoNormal, the default),
  `log_std`, `variance` or `log_variance` (what the PFP operator library's loader assumes).
- `bayesian_torch`: `torch.save(model.state_dict(), path)` of a model of bayesian-torch
  `*Reparameterization` / `*Flipout` layers: `mu_weight` / `mu_kernel` / `mu_bias` with
  `rho_*` (std = softplus(rho)); ordinary layers' weights enter with sigma 0, batch-norm
  running statistics as buffers; priors and `eps_*` buffers are ignored.
- `safetensors`: our own format, `mu.<name>` / `sigma.<name>` (std) / `buffer.<name>`.

`variance_scale` multiplies every variance (the seed code's rescale of pretrained
variances). Parameters are matched to the job's model by module path when every name
fits, otherwise by order with shapes checked (`match`); a mismatch names the first
parameter that does not fit.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from harness.api import (
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
)

FORMATS = ("pyro", "bayesian_torch", "safetensors")
SCALE_PARAMS = ("std", "log_std", "variance", "log_variance")
MATCHES = ("auto", "path", "order")
RESOLVER = "bnn_file_sha256"


@dataclass
class ImportedConfig:
    name: str = "imported"
    path: str | None = None
    format: str = "pyro"
    model: str | None = None  # the model the weights belong to; None: the job's `model=`
    variance_scale: float = 1.0
    scale_param: str = "std"  # what a Pyro guide's constrained `scales` are
    match: str = "auto"  # auto: by module path if every name fits, else by order
    # Filled in, not set: the file's content hash (cache key) and the job's model name.
    sha256: str = "${" + RESOLVER + ":${.path}}"
    job_model: str | None = "${oc.select:model.name,null}"


_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | None) -> str:
    """The file's sha256, or "missing" (check() then says what is wrong, in one line)."""
    if not path:
        return "missing"
    file = Path(path).expanduser()
    try:
        stat = file.stat()
    except OSError:
        return "missing"
    memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _digests:
        digest = hashlib.sha256()
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _digests[memo] = digest.hexdigest()
    return _digests[memo]


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, file_sha256)


# Safe loading. Each allowed global is an inert stand-in registered under the pickled
# name: unpickling makes an empty instance and fills its __dict__, and no function from
# the file is ever called.


class _Constraint:
    """A constraint as pickled: its class name and state (e.g. lower_bound), no behaviour."""

    pickled_as = ""

    def __repr__(self) -> str:
        return f"{self.pickled_as}({self.__dict__})"


def _standin(qualname: str) -> type:
    module, _, cls = qualname.rpartition(".")
    return type(cls, (_Constraint,), {"__module__": module, "pickled_as": qualname})


CONSTRAINTS = {
    name: _standin(name)
    for name in (
        "torch.distributions.constraints._Real",
        "torch.distributions.constraints._Positive",
        "torch.distributions.constraints._GreaterThan",
        "torch.distributions.constraints._GreaterThanEq",
        "pyro.distributions.constraints._SoftplusPositive",
        "pyro.distributions.constraints._Positive",
    )
}


def safe_load(path: Path) -> Any:
    """torch.load(weights_only=True) with the constraint stand-ins allowed, nothing else."""
    allowed = [(cls, name) for name, cls in CONSTRAINTS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = found.group(1) if found else _first_global(path) or _reason(str(err))
        raise HarnessError(
            f"refused to load {path}: it asks for the global '{what}', which is not on the "
            "allowlist (tensors, containers, Pyro/torch constraints); checkpoints are loaded "
            "without running code from them"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise HarnessError(
            f"cannot read {path} as a torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0]})"
        ) from None


def _reason(message: str) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return found.group(1).strip() if found else message.splitlines()[0]


def _first_global(path: Path) -> str | None:
    """The first global a bare (non-zip) pickle names, read from its opcodes, not run."""
    if zipfile.is_zipfile(path):
        return None
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle at all: the torch message says enough
        return None
    return None


def _constrain(value: Tensor, constraint: Any, name: str) -> Tensor:
    """The constrained value Pyro's `pyro.param(name)` returns (torch's transform_to)."""
    kind = getattr(constraint, "pickled_as", type(constraint).__name__).rsplit(".", 1)[-1]
    bound = float(getattr(constraint, "lower_bound", 0.0))
    if kind == "_Real":
        return value
    if kind == "_SoftplusPositive":
        return F.softplus(value) + bound
    if kind in ("_Positive", "_GreaterThan", "_GreaterThanEq"):
        return value.exp() + bound
    raise HarnessError(f"Pyro param '{name}' has constraint {kind}, which cannot be read")


def _to_std(scale: Tensor, scale_param: str) -> Tensor:
    if scale_param == "std":
        return scale
    if scale_param == "log_std":
        return scale.exp()
    if scale_param == "variance":
        return scale.clamp_min(0).sqrt()
    return (0.5 * scale).exp()  # log_variance


@dataclass
class Checkpoint:
    """What a file holds, in its own names and order: means, stds, buffers."""

    locs: dict[str, Tensor]
    stds: dict[str, Tensor]
    buffers: dict[str, Tensor]


def read_pyro(path: Path, scale_param: str) -> Checkpoint:
    state = safe_load(path)
    if not (isinstance(state, dict) and set(state) == {"params", "constraints"}):
        raise HarnessError(
            f"{path} is not a Pyro param-store state "
            "(save it with torch.save(pyro.get_param_store().get_state(), path))"
        )
    locs: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    guides = set()
    for name, value in state["params"].items():
        found = re.match(r"^(.+?)\.(locs|scales)\.(.+)$", name)
        if found is None or not isinstance(value, Tensor):
            continue
        guides.add(found.group(1))
        constrained = _constrain(value.detach().float(), state["constraints"].get(name), name)
        (locs if found.group(2) == "locs" else scales)[found.group(3)] = constrained
    if len(guides) > 1:
        raise HarnessError(f"{path} holds several guides ({', '.join(sorted(guides))}); keep one")
    if not locs:
        raise HarnessError(
            f"{path} has no '<guide>.locs.<site>' params: only AutoNormal-style guides are read"
        )
    unmatched = [s for s in locs if s not in scales] + [s for s in scales if s not in locs]
    if unmatched:
        raise HarnessError(f"{path}: site '{unmatched[0]}' has a loc or a scale but not both")
    stds = {site: _to_std(scales[site], scale_param) for site in locs}
    return Checkpoint(locs, stds, {})


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def read_bayesian_torch(path: Path) -> Checkpoint:
    state = safe_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HarnessError(f"{path} is not a state dict (torch.save(model.state_dict(), path))")
    locs: dict[str, Tensor] = {}
    stds: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        prefix = f"{module}." if module else ""
        found = re.match(r"^(mu|rho)_(weight|kernel|bias)$", leaf)
        if found:
            name = prefix + ("bias" if found.group(2) == "bias" else "weight")
            if found.group(1) == "mu":
                locs[name] = value.float()
            else:
                stds[name] = F.softplus(value.float())
        elif leaf in ("weight", "bias"):
            locs[key], stds[key] = value.float(), torch.zeros_like(value, dtype=torch.float32)
        elif leaf in _BUFFERS:
            buffers[key] = value
        # prior_* and eps_* are the layers' priors and noise buffers: not the posterior.
    missing = [n for n in locs if n not in stds] + [n for n in stds if n not in locs]
    if missing:
        raise HarnessError(f"{path}: '{missing[0]}' has a mu_ or a rho_ tensor but not both")
    if not locs:
        raise HarnessError(f"{path} has no mu_weight/mu_kernel tensors: not a bayesian-torch model")
    return Checkpoint(locs, stds, buffers)


def read_safetensors(path: Path) -> Checkpoint:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise HarnessError(f"cannot read {path} as safetensors ({err})") from None
    part = lambda p: {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    locs, stds = part("mu."), part("sigma.")
    if not locs or set(locs) != set(stds):
        raise HarnessError(
            f"{path} needs matching 'mu.<name>' and 'sigma.<name>' tensors "
            "(docs/posterior-format.md)"
        )
    return Checkpoint({k: v.float() for k, v in locs.items()}, stds, part("buffer."))


def _pairing(
    ours: list[tuple[str, torch.Size]], theirs: dict[str, Tensor], how: str, what: str, model: str
) -> tuple[dict[str, str], str]:
    """Our name -> the checkpoint's name, by module path or by order, shapes checked."""
    names = [n for n, _ in ours]
    by_path = set(theirs) == set(names)
    if how == "path" or (how == "auto" and by_path):
        for n, shape in ours:
            if n not in theirs:
                raise HarnessError(
                    f"checkpoint does not fit model '{model}': it has no {what} '{n}' "
                    f"(match=order pairs {what}s by position)"
                )
            if theirs[n].shape != shape:
                raise HarnessError(
                    f"checkpoint does not fit model '{model}': {what} '{n}' is "
                    f"{list(theirs[n].shape)} in the checkpoint, {list(shape)} in the model"
                )
        return {n: n for n in names}, "path"
    keys = list(theirs)
    for i, (n, shape) in enumerate(ours):
        if i >= len(keys):
            raise HarnessError(
                f"checkpoint does not fit model '{model}': the model's {what} {i} '{n}' "
                f"{list(shape)} has no counterpart (the checkpoint has {len(keys)})"
            )
        if theirs[keys[i]].shape != shape:
            raise HarnessError(
                f"checkpoint does not fit model '{model}': the model's {what} {i} '{n}' is "
                f"{list(shape)}, the checkpoint's {what} {i} '{keys[i]}' is "
                f"{list(theirs[keys[i]].shape)}"
            )
    if len(keys) > len(ours):
        raise HarnessError(
            f"checkpoint does not fit model '{model}': it has {len(keys)} {what}s, the model "
            f"{len(ours)}; the first extra is '{keys[len(ours)]}'"
        )
    return dict(zip(names, keys, strict=False)), "order"


def to_posterior(ckpt: Checkpoint, net: nn.Module, cfg: Any) -> Posterior:
    """The checkpoint in our names: `mu.`/`sigma.` per parameter, `buffer.` per buffer."""
    model = cfg.model or cfg.job_model or "the job's model"
    params = [(n, p.shape) for n, p in net.named_parameters()]
    pairs, how = _pairing(params, ckpt.locs, cfg.match, "parameter", model)
    scale = math.sqrt(cfg.variance_scale)
    tensors: dict[str, Tensor] = {}
    for ours, theirs in pairs.items():
        mu, std = ckpt.locs[theirs], ckpt.stds[theirs] * scale
        if not (torch.isfinite(mu).all() and torch.isfinite(std).all()):
            raise HarnessError(f"checkpoint parameter '{theirs}' has NaN or infinite values")
        if (std < 0).any():
            raise HarnessError(f"checkpoint parameter '{theirs}' has a negative scale")
        tensors[f"mu.{ours}"], tensors[f"sigma.{ours}"] = mu.clone(), std.clone()
    if ckpt.buffers:
        buffers = [(n, b.shape) for n, b in net.named_buffers()]
        pairs_b, _ = _pairing(buffers, ckpt.buffers, cfg.match, "buffer", model)
        tensors |= {f"buffer.{o}": ckpt.buffers[t].clone() for o, t in pairs_b.items()}
    meta = {
        "format": cfg.format,
        "source": str(cfg.path),
        "sha256": file_sha256(cfg.path),
        "model": model,
        "scale_param": cfg.scale_param,
        "variance_scale": cfg.variance_scale,
        "matched_by": how,
    }
    return Posterior("imported", tensors, meta)


def read(cfg: Any) -> Checkpoint:
    path = Path(cfg.path).expanduser()
    if cfg.format == "pyro":
        return read_pyro(path, cfg.scale_param)
    if cfg.format == "bayesian_torch":
        return read_bayesian_torch(path)
    return read_safetensors(path)


def _one_of(value: Any, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise HarnessError(f"imported: {key}={value!r} is not valid; valid: {', '.join(valid)}")


class Imported(MethodBase):
    name = "imported"
    base = None
    # The content hash keys the entry (a changed file is read again); path is there too
    # because the hash is resolved from it.
    fit_options = ("path", "format", "model", "variance_scale", "scale_param", "match", "sha256")

    def check(self, cfg: Any) -> None:
        if not cfg.path:
            raise HarnessError(
                "imported: set the checkpoint's path (method.path=..., or method.base.path=... "
                "when it is the base of pfp, linearised or svi)"
            )
        if not Path(cfg.path).expanduser().is_file():
            raise HarnessError(f"imported: no checkpoint file at path={cfg.path}")
        _one_of(cfg.format, FORMATS, "format")
        _one_of(cfg.scale_param, SCALE_PARAMS, "scale_param")
        _one_of(cfg.match, MATCHES, "match")
        if cfg.format != "pyro" and cfg.scale_param != "std":
            raise HarnessError(
                f"imported: scale_param applies to format=pyro only ({cfg.format} stores "
                "its own parametrisation); leave it at std"
            )
        if not cfg.variance_scale > 0:
            raise HarnessError(f"imported: variance_scale must be > 0, got {cfg.variance_scale}")
        if cfg.model is not None and cfg.job_model is not None and cfg.model != cfg.job_model:
            raise HarnessError(
                f"imported: the weights belong to model {cfg.model!r} but the job's model is "
                f"{cfg.job_model!r}; run with model={cfg.model}"
            )

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle | None,
        cfg: Any,
        base: Posterior | None = None,
    ) -> Posterior:
        self.check(cfg)
        return to_posterior(read(cfg), net_factory(), cfg)

    def program(self, posterior: Posterior, net_factory: NetFactory, cfg: Any) -> InferenceProgram:
        raise HarnessError(
            "imported is a posterior, not an inference method: use it as a base, e.g. "
            "method=pfp method@method.base=imported method.base.path=..."
        )

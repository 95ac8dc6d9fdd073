"""SWAG (Maddox et al. 2019): a Gaussian fitted to the SGD iterates around the MAP network.

Own compact implementation: torch-uncertainty's SWAG is a training wrapper that keeps one
deep-copied module per sample and loops over them, and its package needs torchvision,
which this environment must not install. laplace-torch ships only a diagonal variant.

From the cached MAP network, SGD continues at a constant (or cyclic) learning rate; after
every `epochs_per_snapshot` epochs the flat weights are a snapshot. With K snapshots:
mean = average, diagonal variance = E[θ²] - E[θ]² (clamped), and the deviation matrix D
holds the last `rank` deviations θ_i - mean_i from the running mean (Algorithm 1 of the
paper). A draw is θ = mean + sqrt(scale) (sqrt(var) ⊙ z1 + D^T z2 / sqrt(R - 1)), and
scale = 1/2 is the paper's. The program draws S weight vectors per call and runs them
vmapped, like SVI, so sampling cost is part of the timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from harness.api import (
    ConfigSchema,
    DataBundle,
    HarnessError,
    InferenceProgram,
    MethodBase,
    NetFactory,
    Posterior,
    over_draws,
    training,
)
from plugins.methods.deterministic import load_net

hookimpl = pluggy.HookimplMarker("bnn_harness")

SCHEDULES = ("constant", "cyclic")
BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class SWAGConfig:
    name: str = "swag"
    samples: int = 30  # S weight draws per call
    scale: float = 0.5  # covariance scale; 1/2 is the paper's
    snapshots: int = 20  # K
    rank: int = 20  # R <= K columns of the deviation matrix
    lr: float = 0.05
    schedule: str = "constant"  # cyclic: lr -> lr / 100 linearly within each snapshot period
    epochs_per_snapshot: int = 1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    var_clamp: float = 1e-30
    bn_rows: int = 512  # training inputs kept for the batch-norm refresh (BN models only)
    fit: training.FitConfig = field(default_factory=training.FitConfig)  # the MAP's


def check_options(cfg: Any) -> None:
    if cfg.schedule not in SCHEDULES:
        raise HarnessError(
            f"method.schedule={cfg.schedule!r} is not valid for swag; valid values: "
            + ", ".join(SCHEDULES)
        )
    for key in ("samples", "snapshots", "epochs_per_snapshot", "batch_size", "bn_rows"):
        if getattr(cfg, key) <= 0:
            raise HarnessError(f"method.{key} must be positive, got {getattr(cfg, key)}")
    if not 2 <= cfg.rank <= cfg.snapshots:
        raise HarnessError(f"method.rank must be in 2..snapshots ({cfg.snapshots}), got {cfg.rank}")
    for key in ("lr", "momentum", "weight_decay", "scale", "var_clamp"):
        if not getattr(cfg, key) >= 0:
            raise HarnessError(f"method.{key} must be >= 0, got {getattr(cfg, key)}")


def flat_params(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def collect(net: nn.Module, data: DataBundle, cfg: SWAGConfig) -> Tensor:
    """SGD from the current weights; the K flat snapshots, [K, P]. Trains `net` in place."""
    x, y = data.train
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    opt = torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps = cfg.epochs_per_snapshot * len(loader)
    snaps = []
    net.train()
    for _ in range(cfg.snapshots):
        step = 0
        for _ in range(cfg.epochs_per_snapshot):
            for xb, yb in loader:
                step += 1
                if cfg.schedule == "cyclic":  # Izmailov et al.: snapshot at the cycle's low
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * (1 - 0.99 * step / steps)
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise HarnessError(f"swag: SGD diverged at method.lr={cfg.lr}; lower it")
        snaps.append(flat_params(net))
    net.eval()
    return torch.stack(snaps)


def moments(snaps: Tensor, rank: int, var_clamp: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [P], diagonal variance [P], deviations [R, P]) of K snapshots [K, P].

    The deviations are from the running mean at the time of each snapshot, as the paper's
    online algorithm keeps them; float64 so E[θ²] - E[θ]² does not cancel to noise.
    """
    s = snaps.double()
    count = torch.arange(1, len(s) + 1, dtype=s.dtype)[:, None]
    running = s.cumsum(0) / count
    mean = running[-1]
    var = ((s * s).mean(0) - mean * mean).clamp_min(var_clamp)
    dev = (s - running)[-rank:]
    return mean.to(snaps.dtype), var.to(snaps.dtype), dev.to(snaps.dtype)


def batchnorm_layers(net: nn.Module) -> list[int]:
    """Indices of batch-norm layers, which the refresh requires to sit in the Sequential."""
    found = [m for m in net.modules() if isinstance(m, BATCHNORM)]
    if not found:
        return []
    if not isinstance(net, nn.Sequential) or any(
        not any(m is layer for layer in net) for m in found
    ):
        raise HarnessError(
            "swag: batch-norm refresh needs batch-norm layers directly in a Sequential"
        )
    return [i for i, layer in enumerate(net) if isinstance(layer, BATCHNORM)]


def refresh_batchnorm(net: nn.Sequential, theta: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """Batch-norm running statistics of each weight draw on `x`, vmapped: [S, C] each.

    Same as torch.optim.swa_utils.update_bn with one batch: layers run in train mode for
    the normalisation (biased batch variance), the stored variance is unbiased. Dropout
    stays off, so the statistics are those the draw sees at prediction.
    """
    groups: list[tuple[nn.Module, str]] = [(layer, f"{i}.") for i, layer in enumerate(net)]

    def one(p: dict[str, Tensor]) -> dict[str, Tensor]:
        h, stats = x, {}
        for layer, prefix in groups:
            own = {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}
            if isinstance(layer, BATCHNORM):
                dims = [0, *range(2, h.dim())]
                shape = [1, -1] + [1] * (h.dim() - 2)
                mean, var = h.mean(dims), h.var(dims, correction=0)
                count = h.numel() // h.shape[1]
                stats[prefix + "running_mean"] = mean
                stats[prefix + "running_var"] = var * count / max(count - 1, 1)
                h = (h - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + layer.eps)
                if layer.affine:
                    h = h * own["weight"].reshape(shape) + own["bias"].reshape(shape)
            else:
                h = functional_call(layer, own, (h,)) if own else layer(h)
        return stats

    return torch.vmap(one)(theta)


class SWAGProgram(InferenceProgram):
    """S draws of the SWAG Gaussian per call, the network vmapped over them."""

    kind = "samples"

    def __init__(self, net: nn.Module, posterior: Posterior, samples: int, scale: float):
        super().__init__()
        self.net = net.eval()
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        t = posterior.tensors
        self.register_buffer("mean", flat_params(net))
        self.register_buffer("std", torch.cat([t[f"var.{n}"].flatten() for n in self.names]).sqrt())
        self.register_buffer("dev", torch.cat([t[f"dev.{n}"].flatten(1) for n in self.names], 1))
        self.bn = batchnorm_layers(net)
        if self.bn:
            self.register_buffer("bn_x", t["bn.x"])
        self.samples, self.scale = samples, scale

    def sample(self, count: int) -> dict[str, Tensor]:
        rank = self.dev.shape[0]
        z1 = torch.randn(count, self.mean.numel(), dtype=self.mean.dtype)
        z2 = torch.randn(count, rank, dtype=self.mean.dtype)
        flat = self.mean + math.sqrt(self.scale) * (
            self.std * z1 + (z2 @ self.dev) / math.sqrt(rank - 1)
        )
        parts = flat.split([s.numel() for s in self.shapes], dim=1)
        return {
            n: p.reshape(count, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def forward(self, x: Tensor) -> Tensor:
        theta = self.sample(self.samples)
        stats = refresh_batchnorm(self.net, theta, self.bn_x) if self.bn else {}
        return over_draws(
            self.net, lambda p, b: functional_call(self.net, (p, b), (x,)), theta, stats
        )


class SWAG(MethodBase):
    name = "swag"
    base = "deterministic"
    fit_options = (
        "snapshots",
        "rank",
        "lr",
        "schedule",
        "epochs_per_snapshot",
        "momentum",
        "weight_decay",
        "batch_size",
        "var_clamp",
        "bn_rows",
    )

    def check(self, cfg: Any) -> None:
        check_options(cfg)

    def base_config(self, cfg: Any) -> tuple[str, Any]:
        return self.base_with_fit(cfg)

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: SWAGConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        if base is None:
            raise HarnessError("swag needs the deterministic posterior as its base")
        check_options(cfg)
        net = load_net(base, net_factory)
        bn = batchnorm_layers(net)
        mean, var, dev = moments(collect(net, data, cfg), cfg.rank, cfg.var_clamp)
        torch.nn.utils.vector_to_parameters(mean, net.parameters())
        tensors = training.state_tensors("net", net)
        sizes = [p.numel() for p in net.parameters()]
        for (n, p), v, d in zip(
            net.named_parameters(), var.split(sizes), dev.split(sizes, dim=1), strict=True
        ):
            tensors[f"var.{n}"] = v.reshape(p.shape).clone()
            tensors[f"dev.{n}"] = d.reshape(len(d), *p.shape).clone()
        if bn:
            rows = torch.randperm(len(data.train[0]))[: cfg.bn_rows]
            tensors["bn.x"] = data.train[0][rows].clone()
        return Posterior(self.name, tensors, {"snapshots": cfg.snapshots, "rank": cfg.rank})

    def program(self, posterior: Posterior, net_factory: NetFactory, cfg: Any) -> InferenceProgram:
        check_options(cfg)
        return SWAGProgram(load_net(posterior, net_factory), posterior, cfg.samples, cfg.scale)


@hookimpl
def bnn_harness_methods() -> list:
    return [SWAG()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("method", "swag_schema", SWAGConfig)]

"""Gaussian moment operators: the reference definitions of every MomentOp kind.

Each function maps an activation (mean, var) to the next one, exactly as the MomentOp
docstring in harness/api.py specifies, so another backend (TVM) can mirror them one to one.
`var=None` means "exactly zero" (a deterministic tensor, e.g. the network input): it lets
the first dense/conv layer skip its variance products instead of multiplying by zeros.

Numerical conventions, shared with any backend that mirrors this file:

- every variance an op returns is clamped to [0, VAR_MAX]; VAR_MAX keeps a huge-sigma
  posterior finite (a saturated Gaussian still has a finite mean, so no inf - inf = NaN);
- standard deviations are sqrt(max(v, TINY)): at sigma -> 0 the standardised score z is
  huge, the CDF saturates to exactly 0 or 1 and the PDF to 0, so ReLU and max-pool reduce
  to their deterministic versions (no 0/0) without an epsilon that would bias the mean;
- ReLU and Clark's max share one form through g(z) = z Phi(z) + phi(z):
  mean = m2 + a g, var = v2 + (v1 - v2) Phi(z) + a^2 g (z - g), a = sqrt(v1 + v2),
  z = (m1 - m2) / a (ReLU: m2 = v2 = 0). It is algebraically Clark's, but avoids
  E[x^2] - E[x]^2, which loses every digit when the mean dominates, and needs one CDF.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from harness.api import MOMENT_OPS, HarnessError, MomentOp

Var = Tensor | None
Moments = tuple[Tensor, Var]

VAR_MAX = 1e30
TINY = torch.finfo(torch.float32).tiny
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _clamp(v: Tensor) -> Tensor:
    return v.clamp(0.0, VAR_MAX)


def dense(
    mean: Tensor,
    var: Var,
    mean_w: Tensor,
    var_w: Tensor,
    mean_b: Tensor,
    var_b: Tensor,
    first: bool = False,
) -> Moments:
    """mean = m W^T + b; var = (m^2 + v) var_w^T + v (W^2)^T + var_b (first: v = 0)."""
    out_mean = F.linear(mean, mean_w, mean_b)
    if first or var is None:
        return out_mean, _clamp(F.linear(mean * mean, var_w, var_b))
    out_var = F.linear(mean * mean + var, var_w, var_b) + F.linear(var, mean_w * mean_w)
    return out_mean, _clamp(out_var)


def conv2d(
    mean: Tensor,
    var: Var,
    mean_w: Tensor,
    var_w: Tensor,
    mean_b: Tensor,
    var_b: Tensor,
    first: bool = False,
    stride: int = 1,
    padding: int = 0,
) -> Moments:
    """The dense formulas with convolution in place of the matrix product."""

    def conv(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return F.conv2d(x, w, b, stride, padding)

    out_mean = conv(mean, mean_w, mean_b)
    if first or var is None:
        return out_mean, _clamp(conv(mean * mean, var_w, var_b))
    out_var = conv(mean * mean + var, var_w, var_b) + conv(var, mean_w * mean_w)
    return out_mean, _clamp(out_var)


def _standard_max(z: Tensor) -> tuple[Tensor, Tensor]:
    """Phi(z) and g(z) = z Phi(z) + phi(z) = E[max(Z + z, 0)] for Z ~ N(0, 1).

    Both ReLU and Clark's max reduce to it: with a the spread and z the standardised gap,
    E[max] = m2 + a g and Var[max] = v2 + (v1 - v2) Phi + a^2 g (z - g). For |z| beyond
    float range of z^2 the PDF is exactly 0 and g is z Phi, so sigma -> 0 needs no special
    case and no epsilon that would bias the mean.
    """
    cdf = torch.special.ndtr(z)
    pdf = torch.exp(z.square().mul(-0.5)).mul(_INV_SQRT_2PI)
    return cdf, torch.addcmul(pdf, z, cdf)


def relu(mean: Tensor, var: Var) -> Moments:
    """Exact moments of max(0, N(m, v)): E = s g(m / s), Var = v (Phi + g (z - g))."""
    if var is None:
        return torch.relu(mean), None
    s = var.clamp_min(TINY).sqrt()
    z = mean / s
    cdf, g = _standard_max(z)
    return s * g, _clamp(var * torch.addcmul(cdf, g, z - g))


def clark_max(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """Moment match of max(X1, X2) for independent Gaussians (Clark 1961)."""
    total = (v1 + v2).clamp_min(TINY)
    a = total.sqrt()
    z = (m1 - m2) / a
    cdf, g = _standard_max(z)
    mean = torch.addcmul(m2, a, g)
    var = torch.addcmul(v2, v1 - v2, cdf).addcmul_(total, g * (z - g))
    return mean, _clamp(var)


def _windows(x: Tensor, kernel: int, stride: int) -> list[Tensor]:
    """The kernel*kernel strided views of a pooling window, in row-major order."""
    rows = (x.shape[-2] - kernel) // stride + 1
    cols = (x.shape[-1] - kernel) // stride + 1
    return [
        x[..., i : i + stride * (rows - 1) + 1 : stride, j : j + stride * (cols - 1) + 1 : stride]
        for i in range(kernel)
        for j in range(kernel)
    ]


def maxpool2d(mean: Tensor, var: Var, kernel: int, stride: int) -> Moments:
    """Max over each window folded pairwise, ((x00 v x01) v x10) v x11, by Clark's match."""
    if var is None:
        return F.max_pool2d(mean, kernel, stride), None
    means, variances = _windows(mean, kernel, stride), _windows(var, kernel, stride)
    m, v = means[0], variances[0]
    for m2, v2 in zip(means[1:], variances[1:], strict=True):
        m, v = clark_max(m, v, m2, v2)
    return m, v


def avgpool2d(mean: Tensor, var: Var, kernel: int, stride: int) -> Moments:
    """Mean of k*k independent inputs: the variance is their average divided by k*k."""
    out_mean = F.avg_pool2d(mean, kernel, stride)
    if var is None:
        return out_mean, None
    return out_mean, _clamp(F.avg_pool2d(var, kernel, stride) / (kernel * kernel))


def batchnorm(mean: Tensor, var: Var, scale: Tensor, shift: Tensor) -> Moments:
    """Eval-mode batch norm folded to an affine map per channel (axis 1)."""
    shape = (-1,) + (1,) * (mean.dim() - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    out_mean = mean * scale + shift
    return out_mean, None if var is None else _clamp(var * scale * scale)


def flatten(mean: Tensor, var: Var) -> Moments:
    return mean.flatten(1), None if var is None else var.flatten(1)


OPS: dict[str, Callable[..., Moments]] = {
    "dense": dense,
    "conv2d": conv2d,
    "relu": relu,
    "maxpool2d": maxpool2d,
    "avgpool2d": avgpool2d,
    "batchnorm": batchnorm,
    "flatten": flatten,
}
assert set(OPS) == set(MOMENT_OPS), "every MomentOp kind needs exactly one operator"


def apply(op: MomentOp, mean: Tensor, var: Var) -> Moments:
    """Run one MomentOp; its tensors and attrs are the operator's keyword arguments."""
    if op.op not in OPS:
        raise HarnessError(f"unknown moment op '{op.op}'; valid ops: {', '.join(MOMENT_OPS)}")
    return OPS[op.op](mean, var, **op.tensors, **op.attrs)


def run(ops: list[MomentOp], x: Tensor) -> tuple[Tensor, Tensor]:
    """The whole program on a deterministic input; the output variance is never None."""
    mean, var = x, None
    for op in ops:
        mean, var = apply(op, mean, var)
    return mean, torch.zeros_like(mean) if var is None else var

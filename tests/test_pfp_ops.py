"""The Gaussian operators of PFP against Monte Carlo, one op at a time, and their edge cases.

Every op here is exact for independent Gaussian inputs (dense, conv, avg-pool, batch norm:
first two moments; ReLU and the max of two: moments of the true non-Gaussian output), so
the only error is Monte Carlo's: the tests allow 5 standard errors, estimated per entry.
With n = 1e5..2e5 draws that is about 1.5% of the std on a mean and 2-5% on a variance
(more for rare events, e.g. a ReLU input 3 std below zero). Max-pooling over 4 inputs
folds pairwise, and a max of Gaussians is not Gaussian, so the fold is an approximation
with its own, looser, stated tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from harness import moments as ops
from harness.api import HarnessError, MomentOp

N = 200_000
Z = 5.0  # standard errors: a false alarm has probability < 1e-6 per entry


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def gauss(mean: Tensor, var: Tensor, n: int = N) -> Tensor:
    """n draws of independent N(mean, var) entries, in float64 so MC sums add no error."""
    return mean.double() + var.double().sqrt() * torch.randn(n, *mean.shape, dtype=torch.float64)


def assert_moments(mean: Tensor, var: Tensor, draws: Tensor, z: float = Z) -> None:
    """Within z Monte Carlo standard errors, estimated per entry from the draws themselves.

    SE(mean) = std / sqrt(n); SE(var) = sqrt((m4 - var^2) / n), m4 the 4th central moment:
    a rare event (a far-negative ReLU input is positive in a few hundred of 2e5 draws) gets
    the wide error bar it deserves instead of a fixed relative tolerance it cannot meet.
    """
    n = draws.shape[0]
    mc_mean = draws.mean(0)
    centred = draws - mc_mean
    mc_var = centred.square().mean(0)
    se_mean = (mc_var / n).sqrt()
    se_var = ((centred**4).mean(0) - mc_var.square()).clamp_min(0).div(n).sqrt()
    floor = 1e-6  # float32 rounding of the operators themselves
    assert ((mean.double() - mc_mean).abs() <= z * se_mean + floor).all()
    assert ((var.double() - mc_var).abs() <= z * se_var + floor).all()


def test_relu_matches_monte_carlo_across_regimes() -> None:
    m = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0]).repeat(3)
    v = torch.tensor([0.25, 1.0, 4.0]).repeat_interleave(6)
    out_mean, out_var = ops.relu(m, v)
    assert_moments(out_mean, out_var, gauss(m, v).clamp_min(0))


def test_clark_max_of_two_matches_monte_carlo() -> None:
    m1, v1 = torch.tensor([0.0, 1.0, -2.0, 3.0]), torch.tensor([1.0, 0.5, 2.0, 0.1])
    m2, v2 = torch.tensor([0.0, -1.0, -1.5, 3.2]), torch.tensor([1.0, 2.0, 0.3, 0.2])
    mean, var = ops.clark_max(m1, v1, m2, v2)
    assert_moments(mean, var, torch.maximum(gauss(m1, v1), gauss(m2, v2)))
    # Two i.i.d. standard normals: E = 1/sqrt(pi), Var = 1 - 1/pi (closed form).
    assert mean[0].item() == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    assert var[0].item() == pytest.approx(1 - 1 / math.pi, rel=1e-5)


def test_dense_matches_monte_carlo_with_random_input_and_weights() -> None:
    x_mean, x_var = torch.randn(2, 6), torch.rand(2, 6)
    t = {"mean_w": torch.randn(3, 6), "var_w": 0.2 * torch.rand(3, 6)}
    t |= {"mean_b": torch.randn(3), "var_b": 0.1 * torch.rand(3)}
    mean, var = ops.dense(x_mean, x_var, **t, first=False)
    n = 100_000
    x, w = gauss(x_mean, x_var, n), gauss(t["mean_w"], t["var_w"], n)
    b = gauss(t["mean_b"], t["var_b"], n)
    assert_moments(mean, var, torch.einsum("nbi,noi->nbo", x, w) + b[:, None])


def test_first_dense_skips_input_variance_and_ignores_any() -> None:
    x = torch.randn(4, 5)
    t = {"mean_w": torch.randn(3, 5), "var_w": torch.rand(3, 5)}
    t |= {"mean_b": torch.randn(3), "var_b": torch.rand(3)}
    mean, var = ops.dense(x, None, **t)
    assert torch.allclose(var, x**2 @ t["var_w"].T + t["var_b"])
    again = ops.dense(x, torch.ones(4, 5), **t, first=True)
    assert torch.equal(again[1], var) and torch.equal(again[0], mean)
    mean0, var0 = ops.dense(x, torch.zeros(4, 5), **t, first=False)
    assert torch.allclose(mean0, mean) and torch.allclose(var0, var, rtol=1e-5)


def test_conv2d_is_dense_on_patches() -> None:
    """Convolution is the dense op on each input patch (checked by MC above), exactly."""
    x_mean, x_var = torch.randn(2, 2, 5, 5), torch.rand(2, 2, 5, 5)
    t = {"mean_w": torch.randn(3, 2, 3, 3), "var_w": 0.1 * torch.rand(3, 2, 3, 3)}
    t |= {"mean_b": torch.randn(3), "var_b": 0.1 * torch.rand(3)}
    mean, var = ops.conv2d(x_mean, x_var, **t, first=False, stride=2, padding=1)

    def patches(x: Tensor) -> Tensor:  # [B * positions, C * kh * kw]
        return F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).flatten(0, 1)

    flat = {k: v.flatten(1) if v.dim() > 1 else v for k, v in t.items()}
    d_mean, d_var = ops.dense(patches(x_mean), patches(x_var), **flat)
    assert torch.allclose(mean.permute(0, 2, 3, 1).reshape(-1, 3), d_mean, atol=1e-5)
    assert torch.allclose(var.permute(0, 2, 3, 1).reshape(-1, 3), d_var, rtol=1e-5, atol=1e-6)


def test_conv2d_first_layer_is_convolution_of_squares() -> None:
    x = torch.randn(2, 1, 6, 6)
    t = {"mean_w": torch.randn(4, 1, 3, 3), "var_w": torch.rand(4, 1, 3, 3)}
    t |= {"mean_b": torch.randn(4), "var_b": torch.rand(4)}
    mean, var = ops.conv2d(x, None, **t, first=True, stride=1, padding=1)
    assert torch.allclose(mean, F.conv2d(x, t["mean_w"], t["mean_b"], padding=1))
    assert torch.allclose(var, F.conv2d(x * x, t["var_w"], t["var_b"], padding=1), atol=1e-5)


def test_avgpool_matches_monte_carlo() -> None:
    m, v = torch.randn(1, 2, 4, 4), torch.rand(1, 2, 4, 4)
    mean, var = ops.avgpool2d(m, v, kernel=2, stride=2)
    draws = gauss(m, v)
    assert_moments(mean, var, F.avg_pool2d(draws.flatten(0, 1), 2).reshape(N, 1, 2, 2, 2))


def test_maxpool_pairwise_fold_against_monte_carlo() -> None:
    """Folding a 2x2 window pairwise moment-matches a non-Gaussian max three times; on
    inputs of comparable means (the hard case) the measured error is < 3% of the std on
    the mean and < 6% on the variance, so the bounds are 5% and 10%."""
    m, v = 0.5 * torch.randn(2, 3, 4, 4), 0.5 + torch.rand(2, 3, 4, 4)
    mean, var = ops.maxpool2d(m, v, kernel=2, stride=2)
    draws = F.max_pool2d(gauss(m, v, 100_000).flatten(0, 1), 2).reshape(100_000, 2, 3, 2, 2)
    mc_mean, mc_var = draws.mean(0), draws.var(0)
    assert ((mean - mc_mean).abs() / mc_var.sqrt()).max() < 0.05
    assert ((var - mc_var).abs() / mc_var).max() < 0.10


def test_maxpool_window_order_and_overlap() -> None:
    m, v = torch.randn(1, 1, 5, 5), torch.rand(1, 1, 5, 5)
    mean, _ = ops.maxpool2d(m, v, kernel=3, stride=2)
    assert mean.shape == F.max_pool2d(m, 3, 2).shape == (1, 1, 2, 2)
    window = (m[0, 0, 2:5, 0:3].flatten(), v[0, 0, 2:5, 0:3].flatten())
    acc = (window[0][0], window[1][0])
    for i in range(1, 9):
        acc = ops.clark_max(acc[0], acc[1], window[0][i], window[1][i])
    assert torch.allclose(mean[0, 0, 1, 0], acc[0])


def test_batchnorm_matches_eval_module() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    shift = bn.bias - bn.running_mean * scale
    m, v = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    mean, var = ops.batchnorm(m, v, scale.detach(), shift.detach())
    assert torch.allclose(mean, bn(m), atol=1e-6)
    assert torch.allclose(var, v * scale.detach()[:, None, None] ** 2)


@pytest.mark.parametrize("var_value", [0.0, 1e-45, 1e-30, 1e-8])
def test_vanishing_variance_gives_deterministic_relu_and_max(var_value: float) -> None:
    m = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 3.0])
    v = torch.full_like(m, var_value)
    mean, var = ops.relu(m, v)
    assert torch.allclose(mean, m.clamp_min(0), atol=1e-4) and (var >= 0).all()
    assert torch.isfinite(var).all() and var.max() <= max(var_value, 1e-30) * 1.01
    mean, var = ops.clark_max(m, v, m.flip(0), v)
    assert torch.allclose(mean, torch.maximum(m, m.flip(0)), atol=1e-4)
    assert torch.isfinite(var).all() and (var >= 0).all()


@pytest.mark.parametrize("var_value", [1e20, 1e30, 1e38])
def test_huge_variance_stays_finite(var_value: float) -> None:
    m, v = torch.randn(1, 2, 4, 4), torch.full((1, 2, 4, 4), var_value)
    for fn in (ops.relu, lambda a, b: ops.maxpool2d(a, b, 2, 2)):
        mean, var = fn(m, v)
        assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()
    t = {"mean_w": torch.randn(3, 32), "var_w": torch.full((3, 32), 1e30)}
    t |= {"mean_b": torch.zeros(3), "var_b": torch.zeros(3)}
    mean, var = ops.dense(*ops.flatten(m, v.clamp(max=ops.VAR_MAX)), **t)
    assert torch.isfinite(mean).all() and (var == ops.VAR_MAX).all()


def test_unknown_op_is_a_clear_error() -> None:
    with pytest.raises(HarnessError, match="valid ops: dense, conv2d, relu"):
        ops.apply(MomentOp("softmax"), torch.zeros(1), None)

"""Failures that are failures: a diverged fit or a broken covariance is an error, not a result."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness import registry, runner
from harness.api import DataBundle, HarnessError, Posterior
from harness.training import FitConfig, cross_entropy_nll, state_tensors, train
from plugins.datasets import DirtyDigits, DirtyDigitsConfig
from plugins.methods.deterministic import fit_map
from plugins.methods.laplace import (
    OUTPUT_JITTER,
    LaplaceConfig,
    LaplaceMethod,
    _batched_cholesky,
)
from plugins.models import MLP, MLPConfig


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return DirtyDigits().load(DirtyDigitsConfig(), 0)


def _entries(root: Path) -> list[Path]:
    return [p for p in root.iterdir()] if root.exists() else []


def test_huge_learning_rate_stops_training_and_caches_nothing(make_cfg, tmp_path: Path) -> None:
    """AdamW at lr 1e12 overflows the weights within the first epoch."""
    cfg = make_cfg("method=deterministic", "method.fit.lr=1e12")
    job = runner.prepare(cfg, registry.default())
    with pytest.raises(HarnessError, match=r"training diverged: non-finite .* at epoch 0; lower"):
        runner.fit_or_load(job, cfg.method)
    assert _entries(tmp_path / "cache") == []


def test_nan_validation_from_the_start_is_an_error(data: DataBundle) -> None:
    """Before: early stopping ended the fit and the initial random weights came back as best."""
    x, y = data.val
    poisoned = replace(data, val=(torch.full_like(x, float("nan")), y))
    net = MLP().factory(MLPConfig(hidden=[8]), data.spec)()
    before = state_tensors("net", net)
    with pytest.raises(HarnessError, match=r"non-finite validation NLL .* at epoch 0"):
        train(
            net,
            poisoned,
            FitConfig(epochs=2),
            lambda m, a, b, _: cross_entropy_nll(m, a, b),
            cross_entropy_nll,
        )
    assert all(torch.equal(v, state_tensors("net", net)[k]) for k, v in before.items())


def test_nan_training_loss_names_the_epoch(data: DataBundle) -> None:
    calls = []

    def loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, _: int) -> torch.Tensor:
        calls.append(1)
        value = cross_entropy_nll(m, x, y)
        return value * float("nan") if len(calls) > 30 else value  # 26 steps per epoch

    net = MLP().factory(MLPConfig(hidden=[8]), data.spec)()
    with pytest.raises(HarnessError, match=r"non-finite training loss .* at epoch 1"):
        train(net, data, FitConfig(epochs=3), loss, cross_entropy_nll)


@pytest.mark.parametrize("field", ["epochs", "batch_size", "patience", "lr"])
def test_bad_fit_settings_are_harness_errors(data: DataBundle, field: str) -> None:
    net = MLP().factory(MLPConfig(hidden=[8]), data.spec)()
    with pytest.raises(HarnessError, match=rf"method\.fit\.{field} must be (a )?positive"):
        train(net, data, replace(FitConfig(), **{field: 0}), None, cross_entropy_nll)  # type: ignore[arg-type]


def _spd(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=g)
    return a @ a.transpose(1, 2) + n * torch.eye(n)


def test_output_cholesky_retries_with_growing_jitter() -> None:
    """A matrix just short of positive definite factors at the next jitter, not as zeros."""
    cov = _spd(5, 3, 0)
    scale = cov.diagonal(dim1=1, dim2=2).mean(-1)
    # matrix 1 gets its smallest eigenvalue at -5e-5 x mean diagonal: 1e-5 fails, 1e-4 works
    vals, vecs = torch.linalg.eigh(cov[1])
    vals[0] = -5e-5 * scale[1]
    cov[1] = vecs @ torch.diag(vals) @ vecs.T
    chol = _batched_cholesky(cov)
    eye = torch.eye(5)
    jitters = torch.tensor([OUTPUT_JITTER[0], OUTPUT_JITTER[1], OUTPUT_JITTER[0]])
    expected = cov + (jitters * scale)[:, None, None] * eye
    assert torch.allclose(chol @ chol.transpose(1, 2), expected, atol=1e-4)
    assert torch.isfinite(chol).all() and (chol.diagonal(dim1=1, dim2=2) > 0).all()


def test_output_cholesky_of_a_non_covariance_is_an_error() -> None:
    cov = _spd(4, 2, 1)
    cov[0] = -cov[0]  # negative definite: no jitter in the ladder rescues it
    with pytest.raises(HarnessError, match=r"1 output covariance\(s\) are not positive definite"):
        _batched_cholesky(cov)


def test_output_cholesky_in_an_exported_graph_is_nan_not_zeros() -> None:
    """Graphs cannot raise on data: a failed matrix comes out NaN, the others as in eager."""

    class Factor(torch.nn.Module):
        def forward(self, cov: torch.Tensor) -> torch.Tensor:
            return _batched_cholesky(cov)

    good = _spd(4, 3, 2)
    bad = good.clone()
    bad[2] = -bad[2]
    exported = torch.export.export(Factor(), (good,)).module()
    assert torch.allclose(exported(good), _batched_cholesky(good), atol=1e-6)
    out = exported(bad)
    assert torch.isnan(out[2]).all() and torch.allclose(out[:2], _batched_cholesky(good)[:2])


def test_laplace_program_with_a_broken_covariance_raises(data: DataBundle) -> None:
    """A real last-layer diagonal Laplace, its variances spoilt: sampling logits must fail."""
    factory = MLP().factory(MLPConfig(hidden=[8]), data.spec)
    torch.manual_seed(0)
    base = Posterior("deterministic", state_tensors("net", fit_map(factory, data, FitConfig(1))))
    fitted = LaplaceMethod().fit(factory, data, LaplaceConfig(hessian="diag", tune="none"), base)
    x = data.test[0][:4]
    cfg = LaplaceConfig(hessian="diag", link="mc", samples=3)
    with torch.no_grad():
        assert torch.isfinite(LaplaceMethod().program(fitted, factory, cfg)(x)).all()
    spoilt = {k: -v.abs() - 1.0 if k.startswith("var.") else v for k, v in fitted.tensors.items()}
    broken = Posterior(fitted.method, spoilt, fitted.meta)
    with torch.no_grad(), pytest.raises(HarnessError, match="not positive definite"):
        LaplaceMethod().program(broken, factory, cfg)(x)

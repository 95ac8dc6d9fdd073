"""Weight-shape study: divergences, SVI with a family end to end, the width effect."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from harness import registry, runner
from harness.api import DataSpec, HarnessError, Posterior
from plugins.methods import divergence, families
from plugins.methods.svi import SVI, SVIConfig, SVIFit

ROOT = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "weight_shape", ROOT / "benchmarks/weight_shape.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_energy_distance_matches_scipy_and_the_vector_form() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    q = 1.5 * torch.randn(400, 4, generator=gen, dtype=torch.float64) + 0.3
    ours = divergence.energy_distance_1d(p, q)
    ref = [stats.energy_distance(p[:, i].numpy(), q[:, i].numpy()) for i in range(4)]
    assert np.allclose(ours.numpy(), ref, rtol=1e-9)
    vector = divergence.energy_distance(p[:300, :, None], q[:300, :, None])
    ref = [stats.energy_distance(p[:, i].numpy(), q[:300, i].numpy()) for i in range(4)]
    assert np.allclose(vector.numpy(), ref, rtol=1e-6)


def test_divergences_vanish_for_identical_samples_and_grow_with_difference() -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(2000, 3, generator=gen)
    assert torch.allclose(divergence.histogram_kl(p, p), torch.zeros(3), atol=1e-6)
    assert (divergence.histogram_kl(p, p + 0.5) > divergence.histogram_kl(p, p + 0.1)).all()
    probs = torch.softmax(torch.randn(50, 7, 10, generator=gen), -1)
    assert torch.allclose(
        divergence.mean_prob_kl(probs, probs), torch.zeros(7, dtype=torch.float64)
    )
    assert (divergence.mean_prob_kl(probs, probs.flip(-1)) > 0).all()
    assert torch.allclose(divergence.energy_distance(probs, probs), torch.zeros(7), atol=1e-3)


def test_regression_dataset_is_registered_and_deterministic() -> None:
    data = registry.default().get("dataset", "regression1d").load(None, 3)
    again = registry.default().get("dataset", "regression1d").load(None, 3)
    assert data.spec == DataSpec((1,), 1)
    assert data.train[0].shape == data.train[1].shape == (256, 1)
    assert torch.equal(data.train[1], again.train[1])
    assert data.ood["far"][0].min() >= 3.0


def _bias_only_posterior(net: nn.Sequential) -> Posterior:
    """Zero weights, unit-variance bias on the last layer: the outputs are the draws z."""
    tensors = {f"mu.{k}": torch.zeros_like(v) for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": torch.zeros_like(v) for k, v in net.named_parameters()}
    last = [k for k, _ in net.named_parameters()][-1]
    tensors[f"sigma.{last}"] = torch.ones_like(tensors[f"sigma.{last}"])
    return Posterior("svi", tensors)


@pytest.mark.parametrize("local_reparam", [False, True])
def test_svi_program_deploys_the_configured_family(local_reparam: bool) -> None:
    """method.family picks the deploy law; a non-Gaussian family never uses the LRT."""
    factory = lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3))  # noqa: E731
    post = _bias_only_posterior(factory())
    for family in ("bimodal", "empirical"):
        cfg = SVIConfig(samples=20_000, local_reparam=local_reparam, family=family)
        torch.manual_seed(0)
        out = SVI().program(post, factory, cfg)(torch.randn(2, 4))
        assert out.shape == (20_000, 2, 3)
        z = out[:, 0, 0].double().numpy()
        assert stats.kstest(z, families.get(family).cdf_np).pvalue > 0.01
        assert stats.kstest(z, families.get("gaussian").cdf_np).pvalue < 1e-6


def test_deploy_family_defaults_to_the_training_family() -> None:
    factory = lambda: nn.Sequential(nn.Linear(4, 3))  # noqa: E731
    post = _bias_only_posterior(factory())
    cfg = SVIConfig(samples=10, fit=SVIFit(family="laplace"))
    assert SVI().program(post, factory, cfg).family.name == "laplace"
    cfg = SVIConfig(samples=10, family="uniform", fit=SVIFit(family="laplace"))
    assert SVI().program(post, factory, cfg).family.name == "uniform"
    with pytest.raises(HarnessError, match="valid: gaussian"):
        SVI().program(post, factory, SVIConfig(family="student"))


def test_divergence_falls_with_width() -> None:
    """The seed's claim on a fixed seed: same (mu, sigma), bimodal vs Gaussian weight noise,
    1-D regression after a short ELBO fit. Width 1 is far from the Gaussian predictive;
    width 64 is within sampling noise of it."""
    bench = _benchmark()
    grid = torch.linspace(-2, 2, 16)[:, None]
    kl = {}
    for width in (1, 64):
        net, mu, sigma = bench.train_regression(width, 1, "gaussian", 300, 0, noise_std=0.1)
        sets = bench.predictive_sets(net, mu, sigma, grid, 2000, ("bimodal",))
        sets = {k: v[..., 0] for k, v in sets.items()}
        kl[width] = bench.compare(sets["bimodal"], sets["gaussian"], sets["floor"])
    assert kl[1]["hist_kl"] > 3 * kl[64]["hist_kl"]
    assert kl[1]["hist_kl"] > 3 * kl[1]["hist_kl_floor"]
    assert kl[64]["hist_kl"] < 1.5 * kl[64]["hist_kl_floor"]


@pytest.mark.slow
def test_svi_trains_with_a_non_gaussian_family(make_cfg) -> None:
    """A real (short) fit through the runner: the family is part of the cache key, the deploy
    family is not."""
    base = ["method.fit.family=bimodal", "model.hidden=[16]"]
    job = runner.prepare(make_cfg(*base), registry.default())
    post, cached = runner.fit_or_load(job, job.cfg.method)
    assert not cached
    sigma = torch.cat([v.flatten() for k, v in post.tensors.items() if k.startswith("sigma.")])
    assert torch.isfinite(sigma).all() and (sigma > 0).all()
    deploy = make_cfg(*base, "method.family=empirical")
    job2 = runner.prepare(deploy, registry.default())
    again, cached = runner.fit_or_load(job2, deploy.method)
    assert cached and torch.equal(again.tensors["mu.1.weight"], post.tensors["mu.1.weight"])
    gauss = make_cfg("model.hidden=[16]")
    assert not runner.fit_or_load(runner.prepare(gauss, registry.default()), gauss.method)[1]
    prog = runner.make_program(job2, again, deploy.method)
    assert prog.family.name == "empirical" and not prog.local_reparam
    assert prog(job2.data.test[0][:5]).shape == (deploy.method.samples, 5, 10)


def test_weight_shape_preset_composes(make_cfg) -> None:
    cfg = make_cfg("+experiment=weight_shape", "method.family=bimodal")
    assert cfg.method.fit.family == "gaussian" and cfg.method.family == "bimodal"
    assert cfg.method.fit.kl_weight == cfg.reference.method.fit.kl_weight == 1.0
    assert cfg.model.dropout == 0.0

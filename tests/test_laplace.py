"""Laplace on the embedded data, checked against laplace-torch itself.

The programs compute the GLM predictive from stored tensors in closed form; each test
here compares them with the fitted laplace-torch object, so a wrong Kronecker convention,
a dropped prior or a broken save/load shows up as a number that does not match.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from harness import metrics, registry, runner
from harness.api import DataBundle, HarnessError, Posterior
from harness.training import FitConfig, state_tensors
from plugins.datasets import DirtyDigits, DirtyDigitsConfig
from plugins.methods.deterministic import fit_map, load_net
from plugins.methods.laplace import (
    CHOICES,
    Covariance,
    LaplaceConfig,
    LaplaceMethod,
    check_options,
    fit_laplace,
)
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

COMBOS = [
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("last_layer", "full"),
    ("all", "kron"),
    ("all", "diag"),
]


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return DirtyDigits().load(DirtyDigitsConfig(), 0)


@pytest.fixture(scope="module")
def mlp(data: DataBundle):
    factory = MLP().factory(MLPConfig(hidden=[24, 16]), data.spec)
    torch.manual_seed(0)
    net = fit_map(factory, data, FitConfig(epochs=4))
    return factory, Posterior("deterministic", state_tensors("net", net))


_FITTED: dict = {}


def _fit(mlp, data, **options):
    """Each option set is fitted once per module (by the method and by laplace-torch)."""
    key = tuple(sorted(options.items()))
    if key not in _FITTED:
        factory, base = mlp
        cfg = LaplaceConfig(**options)
        post = LaplaceMethod().fit(factory, data, cfg, base)
        la = fit_laplace(load_net(base, factory), data, cfg)
        _FITTED[key] = factory, cfg, post, la
    return _FITTED[key]


@pytest.mark.parametrize(("subset", "hessian"), COMBOS)
def test_glm_moments_match_laplace_torch(mlp, data, subset: str, hessian: str) -> None:
    factory, cfg, post, la = _fit(mlp, data, subset=subset, hessian=hessian)
    x = data.test[0][:16]
    prog = LaplaceMethod().program(post, factory, cfg)
    assert prog.kind == "moments"
    with torch.no_grad():
        mean, var = prog(x)
    f_mu, f_var = la._glm_predictive_distribution(x)
    assert post.meta["prior_precision"] == pytest.approx(la.prior_precision.tolist())
    assert torch.allclose(mean, f_mu, atol=1e-5)
    assert torch.allclose(var, f_var.diagonal(dim1=1, dim2=2), rtol=1e-4, atol=1e-6)
    assert (var > 0).all()
    # the probit probabilities the harness computes are laplace-torch's predictive
    probs = metrics.predictive_from_moments(mean, var, samples=2).probs
    assert torch.allclose(probs, la(x, pred_type="glm", link_approx="probit"), atol=1e-5)


@pytest.mark.slow
def test_marglik_moves_the_prior_and_kron_all_has_conv_blocks(data) -> None:
    """LeNet: Kronecker factors of conv weights use laplace-torch's [out, in*kh*kw] layout."""
    factory = LeNet5().factory(LeNet5Config(), data.spec)
    torch.manual_seed(0)
    base = Posterior("deterministic", state_tensors("net", fit_map(factory, data, FitConfig(2))))
    cfg = LaplaceConfig(subset="all", hessian="kron")
    post = LaplaceMethod().fit(factory, data, cfg, base)
    la = fit_laplace(load_net(base, factory), data, cfg)
    assert post.meta["prior_precision"][0] != pytest.approx(cfg.prior_precision)
    assert post.tensors["kron.0.weight.q1"].shape == (25, 25)  # 1 channel x 5 x 5
    x = data.test[0][:6]
    with torch.no_grad():
        _, var = LaplaceMethod().program(post, factory, cfg)(x)
    f_var = la._glm_predictive_distribution(x)[1].diagonal(dim1=1, dim2=2)
    assert torch.allclose(var, f_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hessian", ["kron", "diag", "full"])
def test_mu_sigma_marginals_for_every_parameter(mlp, data, hessian: str) -> None:
    """The diagonal format PFP and linearisation read: sigma 0 outside the last layer."""
    factory, _, post, la = _fit(mlp, data, hessian=hessian)
    net = factory()
    for name, p in net.named_parameters():
        assert post.tensors[f"mu.{name}"].shape == p.shape
        assert post.tensors[f"sigma.{name}"].shape == p.shape
    head = [n for n, _ in net.named_parameters()][-2:]
    sigma = torch.cat([post.tensors[f"sigma.{n}"].flatten() for n in head])
    if hessian == "kron":
        expected = la.posterior_precision.diag(exponent=-1)
    elif hessian == "diag":
        expected = la.posterior_variance
    else:
        expected = la.posterior_covariance.diagonal()
    assert torch.allclose(sigma**2, expected, rtol=1e-5)
    assert post.tensors["sigma.1.weight"].abs().sum() == 0  # first layer: outside the subset
    assert torch.equal(post.tensors["mu.1.weight"], post.tensors["net.1.weight"])


@pytest.mark.parametrize(("subset", "hessian"), COMBOS)
def test_weight_draws_have_the_posterior_covariance(mlp, data, subset, hessian) -> None:
    _, _, post, la = _fit(mlp, data, subset=subset, hessian=hessian)
    params = dict(mlp[0]().named_parameters())
    cov = Covariance(post, {n: params[n].shape for n in post.meta["params"]})
    torch.manual_seed(1)
    draws = cov.sample(6000)
    flat = torch.cat([draws[n].flatten(1) for n in post.meta["params"]], 1)
    if hessian == "kron":
        expected = la.posterior_precision.diag(exponent=-1)
    elif hessian == "diag":
        expected = la.posterior_variance
    else:
        expected = la.posterior_covariance.diagonal()
    ratio = flat.var(0) / expected
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)
    assert ratio.min() > 0.85 and ratio.max() < 1.15  # 6000 draws: ~3% sd per entry


@pytest.mark.parametrize(("pred", "link"), [("glm", "mc"), ("nn", "mc"), ("nn", "probit")])
def test_sampling_programs(mlp, data, pred: str, link: str) -> None:
    """Sampled kinds agree with the closed-form moments for the (linear) last layer."""
    factory, cfg, post, _ = _fit(mlp, data)
    x = data.test[0][:8]
    with torch.no_grad():
        mean, var = LaplaceMethod().program(post, factory, cfg)(x)
        cfg_s = LaplaceConfig(pred=pred, link=link, samples=4000)
        prog = LaplaceMethod().program(post, factory, cfg_s)
        out = prog(x)
    assert prog.kind == "samples" and out.shape == (4000, 8, 10)
    tol = 5 * (var / 4000).sqrt() + 1e-4
    assert ((out.mean(0) - mean).abs() < tol).all()
    assert (out.var(0) / var).median() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(("pred", "link"), [("glm", "probit"), ("glm", "mc"), ("nn", "mc")])
def test_save_load_round_trip(mlp, data, tmp_path: Path, pred: str, link: str) -> None:
    factory, _, post, _ = _fit(mlp, data, subset="all", hessian="kron")
    post.save(tmp_path / "p")
    loaded = Posterior.load(tmp_path / "p")
    assert loaded.meta == post.meta
    cfg = LaplaceConfig(pred=pred, link=link, samples=7)
    x = data.test[0][:5]
    outs = []
    for p in (post, loaded):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(LaplaceMethod().program(p, factory, cfg)(x))
    if pred == "glm" and link == "probit":
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    else:
        assert torch.equal(*outs)


def test_full_refused_when_intractable(mlp, data) -> None:
    with pytest.raises(HarnessError, match=r"hessian=full needs a \d+ x \d+.*kron or diag"):
        _fit(mlp, data, subset="all", hessian="full", full_max_params=1000)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_option_lists_valid_values(key: str) -> None:
    with pytest.raises(HarnessError, match=f"valid values: {', '.join(CHOICES[key])}"):
        check_options(LaplaceConfig(**{key: "bogus"}))


def test_head_must_be_linear(data) -> None:
    factory = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU())  # noqa: E731
    base = Posterior("deterministic", state_tensors("net", factory()))
    with pytest.raises(HarnessError, match=r"ending in nn\.Linear"):
        LaplaceMethod().fit(factory, data, LaplaceConfig(), base)


def test_bad_option_fails_before_the_map_trains(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="valid values: kron, diag, full"):
        runner.run(make_cfg("method=laplace", "method.hessian=fullest"), registry.default())
    assert not (tmp_path / "cache").exists()


def test_runner_logs_to_mlflow_and_reuses_the_map(make_cfg, tmp_path: Path) -> None:
    runner.run(make_cfg("method=deterministic"), registry.default())
    results = runner.run(make_cfg("method=laplace"), registry.default())
    diag = runner.run(make_cfg("method=laplace", "method.hessian=diag"), registry.default())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"])
    lap = runs[runs["params.method.name"] == "laplace"]
    assert list(lap["status"]) == ["FINISHED", "FINISHED"]
    assert set(lap["params.method.hessian"]) == {"kron", "diag"}
    for key in ("cls/acc", "cal/nll", "cal/ece", "ood/auroc_entropy", "ood/auroc_mi"):
        assert math.isfinite(results[key]), key
    assert results["cal/nll"] != diag["cal/nll"]  # options are part of the cache key
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached.count("deterministic") == 1 and cached.count("laplace") == 2


@pytest.mark.slow
def test_against_its_map_on_the_embedded_data(make_cfg, tmp_path: Path) -> None:
    """What holds on dirty_digits, measured: Laplace adds an epistemic signal, keeps accuracy.

    The issue's hope, lower NLL or ECE than the MAP, does not hold here: the MAP is early
    stopped on validation NLL and already calibrated (ECE 0.021, NLL 0.128), and the
    marglik-tuned last-layer Laplace is underconfident (ECE 0.060, NLL 0.159). The bounds
    below pin that state, so a change in either direction shows up.
    """
    full = ["method.fit.epochs=60"]
    det = runner.run(make_cfg("method=deterministic", *full), registry.default())
    lap = runner.run(make_cfg("method=laplace", *full), registry.default())
    assert lap["fit/cached"] == 0.0
    assert lap["cls/acc"] >= det["cls/acc"] - 0.01
    assert lap["ood/auroc_mi"] > det["ood/auroc_mi"] + 0.1
    assert det["cal/nll"] <= lap["cal/nll"] <= det["cal/nll"] * 1.5

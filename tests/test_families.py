"""Variational families: standardisation, inverse-transform sampling, quadrature entropy/KL."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from harness.api import HarnessError
from plugins.methods import families

NAMES = families.FAMILIES


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _moments_by_quadrature(fam: families.Family) -> tuple[float, float]:
    lo, hi = fam.support()
    z = np.linspace(lo, hi, 2**13 + 1)
    p = np.exp(fam.log_pdf_np(z))
    return float(integrate.simpson(z * p, x=z)), float(integrate.simpson(z * z * p, x=z))


@pytest.mark.parametrize("name", NAMES)
def test_standardised_mean_zero_variance_one(name: str) -> None:
    fam = families.get(name)
    mean, second = _moments_by_quadrature(fam)
    assert mean == pytest.approx(0.0, abs=1e-6)
    assert second == pytest.approx(1.0, abs=1e-6)
    z = fam.sample((1_000_000,), _gen()).double()
    # 1e6 draws: standard errors ~1e-3 (mean) and ~2e-3 (variance, heavier for Laplace)
    assert z.mean().item() == pytest.approx(0.0, abs=5e-3)
    assert z.var().item() == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_transform_samples_match_cdf(name: str) -> None:
    fam = families.get(name)
    z = fam.sample((100_000,), _gen(1)).double().numpy()
    assert stats.kstest(z, fam.cdf_np).pvalue > 0.01


def test_ks_test_has_power_against_the_wrong_shape() -> None:
    """The KS check above is not vacuous: bimodal draws fail against the Gaussian CDF."""
    z = families.get("bimodal").sample((100_000,), _gen(1)).double().numpy()
    assert stats.kstest(z, families.get("gaussian").cdf_np).pvalue < 1e-6
    z = families.get("empirical").sample((100_000,), _gen(1)).double().numpy()
    assert stats.kstest(z, families.get("gaussian").cdf_np).pvalue < 1e-6


def test_entropy_quadrature_matches_closed_forms() -> None:
    assert families.get("gaussian").entropy == pytest.approx(0.5 * math.log(2 * math.pi * math.e))
    assert families.get("uniform").entropy == pytest.approx(math.log(2 * math.sqrt(3)))
    assert families.get("laplace").entropy == pytest.approx(1 + math.log(2 / math.sqrt(2)))
    # The Gaussian maximises entropy at unit variance: every other shape has less.
    for name in ("uniform", "laplace", "bimodal", "empirical"):
        assert families.get(name).entropy < families.get("gaussian").entropy


def test_gaussian_kl_closed_form_equals_the_general_formula() -> None:
    mu, sigma = torch.tensor([0.0, 0.7, -2.0]), torch.tensor([1.0, 0.1, 3.0])
    fam = families.get("gaussian")
    general = families.Family.kl_to_gaussian(fam, mu, sigma, 1.5)
    assert torch.allclose(fam.kl_to_gaussian(mu, sigma, 1.5), general, atol=1e-6)
    assert fam.kl_to_gaussian(torch.zeros(1), torch.ones(1), 1.0).item() == pytest.approx(0.0)


@pytest.mark.parametrize("name", NAMES)
def test_quadrature_kl_matches_monte_carlo(name: str) -> None:
    """KL(mu + sigma z || N(0, s^2)) from H[p0] vs a 10^6-draw estimate of E[log q - log p]."""
    fam = families.get(name)
    mu, sigma, prior = 0.4, 0.6, 1.3
    z = fam.sample((1_000_000,), _gen(2)).double()
    theta = mu + sigma * z
    log_q = fam.log_pdf(z) - math.log(sigma)
    log_p = -0.5 * (theta / prior) ** 2 - math.log(prior * math.sqrt(2 * math.pi))
    ratio = log_q - log_p
    mc, se = ratio.mean().item(), ratio.std().item() / 1000
    exact = fam.kl_to_gaussian(torch.tensor(mu), torch.tensor(sigma), prior).item()
    assert exact == pytest.approx(mc, abs=5 * se + 2e-4)


@pytest.mark.parametrize("name", ["bimodal", "empirical"])
def test_tabulated_log_density_matches_exact(name: str) -> None:
    fam = families.get(name)
    z = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    exact = torch.from_numpy(fam.log_pdf_np(z.numpy()))
    assert torch.allclose(fam.log_pdf(z), exact, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_quantile_is_finite_and_monotone_into_the_tails(name: str) -> None:
    fam = families.get(name)
    u = torch.tensor([0.0, 1e-300, 1e-30, 1e-12, 1e-6, 0.3, 0.5, 0.7, 1 - 1e-12, 1 - 2**-53])
    z = fam.ppf(u.double())
    assert torch.isfinite(z).all()
    assert (z.diff() >= 0).all()
    # F(ppf(u)) = u to 0.1 % relative, from the far lower tail to the middle (uniform: exact)
    lower = u[2:7].double().numpy()
    atol = 1e-15 if name == "uniform" else 0.0  # float64 spacing at the edge -sqrt(3)
    assert np.allclose(fam.cdf_np(z[2:7].numpy()), lower, rtol=1e-3, atol=atol)


def test_gaussian_sampler_is_torch_randn() -> None:
    """family=gaussian must reproduce SVI's earlier draws exactly."""
    torch.manual_seed(5)
    ours = families.get("gaussian").sample((3, 4))
    torch.manual_seed(5)
    assert torch.equal(ours, torch.randn(3, 4))


def test_empirical_from_user_csv_and_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sample = rng.exponential(size=500)  # right-skewed
    csv, npy = tmp_path / "noise.csv", tmp_path / "noise.npy"
    np.savetxt(csv, sample, delimiter=",")
    np.save(npy, sample)
    for path in (csv, npy):
        fam = families.get("empirical", str(path))
        mean, second = _moments_by_quadrature(fam)
        assert mean == pytest.approx(0.0, abs=1e-6) and second == pytest.approx(1.0, abs=1e-6)
        z = fam.sample((200_000,), _gen(3)).double().numpy()
        assert stats.skew(z) > 1.0  # keeps the sample's skew after standardisation


def test_bad_names_and_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="valid: gaussian, uniform, laplace, bimodal"):
        families.get("cauchy")
    with pytest.raises(HarnessError, match="does not exist"):
        families.get("empirical", str(tmp_path / "missing.csv"))
    constant = tmp_path / "constant.csv"
    np.savetxt(constant, np.ones(50))
    with pytest.raises(HarnessError, match="not all equal"):
        families.get("empirical", str(constant))
    text = tmp_path / "text.csv"
    text.write_text("a,b\nc,d\n")
    with pytest.raises(HarnessError, match="numeric"):
        families.get("empirical", str(text))

"""Standardised noise laws p0 for mean-field VI: theta = mu + sigma * z with z ~ p0.

Every family has mean 0 and variance 1, so a posterior's (mu, sigma) mean the same
first two moments whatever the shape; that is what lets a Gaussian-trained posterior be
deployed on "device" noise and compared like for like (arXiv 2501.05564).

KL(q || N(0, s^2)) needs the shape only through the entropy H[p0]:
    KL = -H[p0] - log sigma + 1/2 log(2 pi s^2) + (mu^2 + sigma^2) / (2 s^2),
so H[p0] is integrated once by composite Simpson on a fine grid (no Monte Carlo).
Sampling is by inverse transform. Families without a closed-form quantile tabulate
log F (lower half) and log(1 - F) (upper half) and interpolate x against them: the
logarithm keeps the tails resolved where F itself would round to 0 or 1 (the table
reaches F ~ 1e-33, twelve bandwidths past the outermost component), so extreme
uniforms still map to finite, correctly placed draws instead of +-inf.
"""

from __future__ import annotations

import math
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch
from scipy import integrate, special
from torch import Tensor

from harness.api import HarnessError

FAMILIES = ("gaussian", "uniform", "laplace", "bimodal", "empirical")
BIMODAL_STD = 0.2  # each mode's spread; the modes sit at +-sqrt(1 - BIMODAL_STD^2)
QUAD_INTERVALS = 2**14  # Simpson panels over the support, for the entropy
TABLE_POINTS = 2**13 + 1  # quantile table resolution
TAIL_SIGMAS = 12.0  # grid reach beyond the outermost mixture component (Phi(-12) ~ 2e-33)
MIN_SAMPLE = 10
SQRT3 = math.sqrt(3.0)
LAPLACE_B = 1.0 / math.sqrt(2.0)
_TINY = torch.finfo(torch.float64).tiny


class Family:
    """A standardised law: log-density, CDF, inverse-transform sampler and entropy."""

    name: str = ""

    def support(self) -> tuple[float, float]:
        raise NotImplementedError

    def log_pdf_np(self, z: np.ndarray) -> np.ndarray:
        """Exact log-density in float64 (quadrature, tests)."""
        raise NotImplementedError

    def cdf_np(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def ppf(self, u: Tensor) -> Tensor:
        """Quantile function on float64 uniforms in [0, 1) (0 is clamped to the tiniest)."""
        raise NotImplementedError

    def log_pdf(self, z: Tensor) -> Tensor:
        return torch.from_numpy(self.log_pdf_np(z.detach().double().cpu().numpy())).to(z)

    @cached_property
    def entropy(self) -> float:
        """H[p0] = -int p0 log p0, composite Simpson on QUAD_INTERVALS panels of the support.

        The grid is symmetric with 0 on a panel edge, so the Laplace kink and the uniform's
        edges fall on nodes and the rule keeps its high order.
        """
        lo, hi = self.support()
        half = max(-lo, hi)
        z = np.linspace(-half, half, QUAD_INTERVALS + 1)
        logp = self.log_pdf_np(z)
        p = np.exp(logp)
        with np.errstate(invalid="ignore"):
            integrand = np.where(p > 0, -p * logp, 0.0)
        return float(integrate.simpson(integrand, x=z))

    def sample(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return self.ppf(u).to(dtype)

    def kl_to_gaussian(self, mu: Tensor, sigma: Tensor, prior_std: float) -> Tensor:
        """Elementwise KL(mu + sigma z || N(0, prior_std^2)), z ~ this family."""
        p2 = prior_std**2
        return (
            -self.entropy
            - torch.log(sigma)
            + 0.5 * math.log(2 * math.pi * p2)
            + (mu**2 + sigma**2) / (2 * p2)
        )


class Gaussian(Family):
    """N(0, 1). Sampling and KL keep the exact expressions SVI always used, so choosing
    this family reproduces earlier results bit for bit."""

    name = "gaussian"

    def support(self) -> tuple[float, float]:
        return -40.0, 40.0

    def log_pdf_np(self, z: np.ndarray) -> np.ndarray:
        return -0.5 * z**2 - 0.5 * math.log(2 * math.pi)

    def cdf_np(self, z: np.ndarray) -> np.ndarray:
        return special.ndtr(z)

    def ppf(self, u: Tensor) -> Tensor:
        lower = u <= 0.5
        mag = torch.special.ndtri(torch.where(lower, u, 1 - u).clamp_min(_TINY))
        return torch.where(lower, mag, -mag)

    def sample(self, shape, generator=None, dtype=torch.float32) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    def kl_to_gaussian(self, mu: Tensor, sigma: Tensor, prior_std: float) -> Tensor:
        s2, p2 = sigma**2, prior_std**2
        return 0.5 * (s2 + mu**2) / p2 - torch.log(sigma) + math.log(prior_std) - 0.5


class Uniform(Family):
    """U[-sqrt 3, sqrt 3]."""

    name = "uniform"

    def support(self) -> tuple[float, float]:
        return -SQRT3, SQRT3

    def log_pdf_np(self, z: np.ndarray) -> np.ndarray:
        inside = np.abs(z) <= SQRT3
        return np.where(inside, -math.log(2 * SQRT3), -np.inf)

    def cdf_np(self, z: np.ndarray) -> np.ndarray:
        return np.clip((z + SQRT3) / (2 * SQRT3), 0.0, 1.0)

    def ppf(self, u: Tensor) -> Tensor:
        return SQRT3 * (2 * u - 1)


class Laplace(Family):
    """Laplace(0, 1/sqrt 2); the quantile uses log of the near tail, so it never hits log 0."""

    name = "laplace"

    def support(self) -> tuple[float, float]:
        return -60.0, 60.0

    def log_pdf_np(self, z: np.ndarray) -> np.ndarray:
        return -np.abs(z) / LAPLACE_B - math.log(2 * LAPLACE_B)

    def cdf_np(self, z: np.ndarray) -> np.ndarray:
        return np.where(z < 0, 0.5 * np.exp(z / LAPLACE_B), 1 - 0.5 * np.exp(-z / LAPLACE_B))

    def ppf(self, u: Tensor) -> Tensor:
        lower = u < 0.5
        tail = torch.where(lower, u, 1 - u).clamp_min(_TINY)
        mag = -LAPLACE_B * torch.log(2 * tail)
        return torch.where(lower, -mag, mag)


class GaussianMixture(Family):
    """Equal-weight mixture of N(c_i, h^2), standardised exactly; a tabulated quantile.

    Serves the bimodal family (two components) and the empirical one (a Gaussian KDE of a
    device-noise sample): mixture moments are closed-form, so the standardisation is exact
    rather than estimated.
    """

    def __init__(self, name: str, centres: np.ndarray, bandwidth: float):
        self.name = name
        centres = np.asarray(centres, dtype=np.float64)
        mean = centres.mean()
        scale = math.sqrt(centres.var() + bandwidth**2)
        self.centres = (centres - mean) / scale
        self.h = bandwidth / scale
        lo, hi = self.support()
        x = np.linspace(lo, hi, TABLE_POINTS)
        self._x = torch.from_numpy(x)
        self._log_cdf = torch.from_numpy(
            self._log_mix(special.log_ndtr((x[:, None] - self.centres) / self.h))
        )
        self._log_sf = torch.from_numpy(
            self._log_mix(special.log_ndtr((self.centres - x[:, None]) / self.h))
        )
        self._log_pdf_table = torch.from_numpy(self.log_pdf_np(x))

    def _log_mix(self, per_component: np.ndarray) -> np.ndarray:
        return special.logsumexp(per_component, axis=1) - math.log(len(self.centres))

    def support(self) -> tuple[float, float]:
        reach = TAIL_SIGMAS * self.h
        return float(self.centres.min() - reach), float(self.centres.max() + reach)

    def log_pdf_np(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        r = (z[..., None] - self.centres) / self.h
        comp = -0.5 * r**2 - math.log(self.h * math.sqrt(2 * math.pi))
        return special.logsumexp(comp, axis=-1) - math.log(len(self.centres))

    def cdf_np(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        return special.ndtr((z[..., None] - self.centres) / self.h).mean(-1)

    def log_pdf(self, z: Tensor) -> Tensor:
        """Linear interpolation of the tabulated log-density: exact enough, and O(1) per
        point where the exact mixture costs one term per component."""
        return _interp(z.detach().double(), self._x, self._log_pdf_table).to(z)

    def ppf(self, u: Tensor) -> Tensor:
        lower = u <= 0.5
        log_tail = torch.where(lower, u, 1 - u).clamp_min(_TINY).log()
        from_cdf = _interp(log_tail, self._log_cdf, self._x)
        from_sf = _interp(log_tail, self._log_sf.flip(0), self._x.flip(0))
        return torch.where(lower, from_cdf, from_sf)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """np.interp for tensors (xp increasing), clamped to the table's ends, vectorised."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x.reshape(-1)).clamp(1, len(xp) - 1).reshape(x.shape)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    t = torch.where(x1 > x0, (x - x0) / (x1 - x0), torch.zeros_like(x))
    return f0 + t * (f1 - f0)


def synthetic_device_noise(n: int = 600, seed: int = 2501) -> np.ndarray:
    """The shipped default for `empirical`: a skewed sample shaped like analog programming
    noise (a gamma-skewed main lobe plus a small cluster of under-programmed devices).

    Generated deterministically at load time rather than stored, so the repository
    carries no binary; `method.fit.family_path` replaces it with measured data.
    """
    rng = np.random.default_rng(seed)
    main = rng.gamma(shape=2.0, scale=1.0, size=n)
    stuck = rng.random(n) < 0.12
    return np.where(stuck, rng.normal(-1.0, 0.25, size=n), main)


def read_sample(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"family_path '{path}' does not exist")
    try:
        if path.suffix == ".npy":
            sample = np.load(path, allow_pickle=False)
        else:
            sample = np.loadtxt(path, delimiter=",", ndmin=1)
    except ValueError as exc:
        raise HarnessError(
            f"family_path '{path}': not a numeric .npy or CSV file ({exc})"
        ) from None
    sample = np.asarray(sample, dtype=np.float64).reshape(-1)
    if len(sample) < MIN_SAMPLE or not np.isfinite(sample).all() or sample.std() == 0:
        raise HarnessError(
            f"family_path '{path}': need at least {MIN_SAMPLE} finite values that are not all "
            f"equal, got {len(sample)}"
        )
    return sample


def kde_bandwidth(sample: np.ndarray) -> float:
    """Silverman's rule, robust to outliers through the IQR."""
    iqr = np.subtract(*np.percentile(sample, [75, 25]))
    spread = min(sample.std(ddof=1), iqr / 1.34) if iqr > 0 else sample.std(ddof=1)
    return 0.9 * spread * len(sample) ** (-0.2)


def empirical(sample: np.ndarray) -> GaussianMixture:
    return GaussianMixture("empirical", sample, kde_bandwidth(sample))


@cache
def get(name: str, path: str | None = None) -> Family:
    """The family called `name` (tables built once per process); `path` only for empirical."""
    if name == "gaussian":
        return Gaussian()
    if name == "uniform":
        return Uniform()
    if name == "laplace":
        return Laplace()
    if name == "bimodal":
        mode = math.sqrt(1 - BIMODAL_STD**2)
        return GaussianMixture("bimodal", np.array([-mode, mode]), BIMODAL_STD)
    if name == "empirical":
        return empirical(read_sample(path) if path else synthetic_device_noise())
    raise HarnessError(f"unknown variational family '{name}'; valid: {', '.join(FAMILIES)}")

"""Laplace approximation around the cached MAP network, fitted by laplace-torch.

laplace-torch computes the curvature, tunes the prior precision and is the reference for
the predictive; what it leaves behind is turned into plain tensors (MAP weights, the
posterior covariance as Kronecker eigendecompositions, a diagonal or a dense matrix), so a
fitted Laplace saves without pickles and its program rebuilds from tensors alone. The
programs evaluate the GLM (linearised) predictive in closed form from those tensors, which
the tests check against laplace-torch's own `_glm_predictive_distribution`.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
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

CHOICES = {
    "subset": ("last_layer", "all"),
    "hessian": ("kron", "diag", "full"),
    "pred": ("glm", "nn"),
    "link": ("probit", "mc"),
    "tune": ("marglik", "gridsearch", "none"),
    "curvature": ("auto", "curvlinops", "backpack"),
}


@dataclass
class LaplaceConfig:
    name: str = "laplace"
    subset: str = "last_layer"
    hessian: str = "kron"
    pred: str = "glm"  # glm: linearised predictive; nn: sample weights, run the network
    link: str = "probit"  # glm only. probit: Gaussian logits ("moments"); mc: sampled logits
    samples: int = 100  # S for pred=nn and link=mc
    # prior precision: marglik (marginal likelihood), gridsearch (validation NLL of the glm
    # probit predictive, 10^-2..10^4), none (keep prior_precision)
    tune: str = "marglik"
    prior_precision: float = 1.0  # the start of the marglik search, or the fixed value
    curvature: str = "auto"  # laplace-torch backend; auto: BackPACK for all-weights diag
    batch_size: int = 256  # of the curvature pass over the training set
    full_max_params: int = 5000  # hessian=full stores a P x P covariance
    fit: training.FitConfig = field(default_factory=training.FitConfig)  # the MAP's


def check_options(cfg: Any) -> None:
    for key, valid in CHOICES.items():
        value = getattr(cfg, key)
        if value not in valid:
            raise HarnessError(
                f"method.{key}={value!r} is not valid for laplace; valid values: "
                + ", ".join(valid)
            )
    for key in ("samples", "batch_size", "full_max_params"):
        if getattr(cfg, key) <= 0:
            raise HarnessError(f"method.{key} must be positive, got {getattr(cfg, key)}")
    if not cfg.prior_precision > 0:
        raise HarnessError(f"method.prior_precision must be positive, got {cfg.prior_precision}")


def head_name(net: nn.Module) -> str:
    """The last layer, which the closed-form programs require to be a Linear at the end."""
    if not isinstance(net, nn.Sequential) or not isinstance(net[-1], nn.Linear):
        raise HarnessError("laplace subset=last_layer needs an nn.Sequential ending in nn.Linear")
    return str(len(net) - 1)


def subset_names(net: nn.Module, subset: str) -> list[str]:
    if subset == "all":
        return [n for n, _ in net.named_parameters()]
    head = head_name(net)
    return [f"{head}.{n}" for n, _ in net[-1].named_parameters()]


def _curvature_backend(cfg: LaplaceConfig) -> Any:
    from laplace.curvature import BackPackGGN, CurvlinopsGGN

    # Curvlinops' exact diagonal GGN over all weights takes minutes on LeNet where BackPACK
    # takes seconds; for Kronecker factors and the last layer, curvlinops is as fast.
    auto = BackPackGGN if (cfg.hessian, cfg.subset) == ("diag", "all") else CurvlinopsGGN
    return {"auto": auto, "curvlinops": CurvlinopsGGN, "backpack": BackPackGGN}[cfg.curvature]


def fit_laplace(net: nn.Module, data: DataBundle, cfg: LaplaceConfig) -> Any:
    """The fitted laplace-torch object (also what the tests compare the programs with)."""
    from laplace import Laplace

    check_options(cfg)
    names = subset_names(net, cfg.subset)
    count = sum(dict(net.named_parameters())[n].numel() for n in names)
    if cfg.hessian == "full" and count > cfg.full_max_params:
        raise HarnessError(
            f"laplace hessian=full needs a {count} x {count} covariance ({count} parameters "
            f"in subset={cfg.subset}), over method.full_max_params={cfg.full_max_params}; "
            "use hessian=kron or diag, or subset=last_layer"
        )
    extra = {"last_layer_name": head_name(net)} if cfg.subset == "last_layer" else {}
    la = Laplace(
        net,
        "classification",
        subset_of_weights=cfg.subset,
        hessian_structure=cfg.hessian,
        prior_precision=float(cfg.prior_precision),
        backend=_curvature_backend(cfg),
        **extra,
    )
    loader = DataLoader(TensorDataset(*data.train), batch_size=cfg.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's hook and backward() notices
        la.fit(loader)
        if cfg.tune == "marglik":
            la.optimize_prior_precision(method="marglik", pred_type="glm")
        elif cfg.tune == "gridsearch":
            la.optimize_prior_precision(
                method="gridsearch",
                pred_type="glm",
                link_approx="probit",
                val_loader=DataLoader(TensorDataset(*data.val), batch_size=cfg.batch_size),
                log_prior_prec_min=-2,
                log_prior_prec_max=4,
                grid_size=31,
            )
    return la


def posterior_tensors(la: Any, net: nn.Module, names: list[str], hessian: str) -> dict:
    """Covariance of the subset as tensors, plus `mu.`/`sigma.` marginals of every parameter.

    kron: per parameter, the eigendecomposition of the posterior precision,
    (Q0 ⊗ Q1) diag(l0 ⊗ l1) (Q0 ⊗ Q1)^T + delta I (one factor for a bias), in laplace-torch's
    row-major layout of the weight reshaped to [out, rest]. diag: `var.<param>`. full: `cov`,
    the dense covariance over the subset in `names` order. Sigma is the marginal standard
    deviation (for kron and full the diagonal of the covariance, dropping correlations) and
    zero outside the subset, the format PFP and linearisation consume.
    """
    params = dict(net.named_parameters())
    out: dict[str, Tensor] = {}
    if hessian == "kron":
        prec = la.posterior_precision
        if getattr(prec, "damping", False):
            raise HarnessError("laplace: damped Kronecker factors are not supported")
        for name, qs, ls, delta in zip(
            names, prec.eigenvectors, prec.eigenvalues, prec.deltas, strict=True
        ):
            for i, (q, lam) in enumerate(zip(qs, ls, strict=True)):
                out[f"kron.{name}.q{i}"] = q.detach().contiguous().clone()
                out[f"kron.{name}.l{i}"] = lam.detach().contiguous().clone()
            out[f"kron.{name}.delta"] = delta.detach().reshape(1).clone()
        marginal = prec.diag(exponent=-1)
    elif hessian == "diag":
        marginal = la.posterior_variance
    else:
        out["cov"] = la.posterior_covariance.detach().contiguous().clone()
        marginal = out["cov"].diagonal()
    sizes = [params[n].numel() for n in names]
    variances = dict(zip(names, marginal.detach().split(sizes), strict=True))
    for n, p in params.items():
        var = variances[n].reshape(p.shape) if n in variances else torch.zeros_like(p)
        out[f"mu.{n}"] = p.detach().clone()
        out[f"sigma.{n}"] = var.clamp_min(0).sqrt()
        if hessian == "diag" and n in variances:
            out[f"var.{n}"] = var.clone()
    return out


class Covariance(nn.Module):
    """The posterior covariance of the subset, rebuilt from the Posterior's tensors.

    Two uses: `sample` draws zero-mean weight deviations; `output_cov` pushes Jacobians of
    the logits (per parameter, [B, C, *shape]) through it, J Σ J^T, as [B, C, C].
    """

    def __init__(self, posterior: Posterior, shapes: dict[str, torch.Size]):
        super().__init__()
        self.hessian, self.names = posterior.meta["hessian"], list(shapes)
        self.shapes = shapes
        t = posterior.tensors
        for i, n in enumerate(self.names):
            if self.hessian == "kron":
                inv = t[f"kron.{n}.l0"]
                if f"kron.{n}.l1" in t:
                    inv = torch.outer(inv, t[f"kron.{n}.l1"])
                    self.register_buffer(f"q1_{i}", t[f"kron.{n}.q1"])
                self.register_buffer(f"q0_{i}", t[f"kron.{n}.q0"])
                self.register_buffer(f"inv_{i}", 1.0 / (inv + t[f"kron.{n}.delta"]))
            elif self.hessian == "diag":
                self.register_buffer(f"var_{i}", t[f"var.{n}"].flatten())
        if self.hessian == "full":
            cov = t["cov"]
            self.register_buffer("cov", cov)
            self.register_buffer("chol", _cholesky(cov))
            index = _head_index(list(shapes.values()))
            self.register_buffer("cov_head", None if index is None else cov[index][:, index])

    def block(self, kind: str, i: int) -> Tensor | None:
        return getattr(self, f"{kind}_{i}", None)

    def sample(self, count: int) -> dict[str, Tensor]:
        if self.hessian == "full":
            z = self.chol @ torch.randn(self.chol.shape[0], count, dtype=self.chol.dtype)
            flat = z.T.split([s.numel() for s in self.shapes.values()], dim=1)
            return {
                n: f.reshape(count, *self.shapes[n]) for n, f in zip(self.names, flat, strict=True)
            }
        out = {}
        for i, (n, shape) in enumerate(self.shapes.items()):
            if self.hessian == "diag":
                dev = self.block("var", i).sqrt() * torch.randn(count, shape.numel())
            elif self.block("q1", i) is None:
                scale = self.block("inv", i).sqrt()
                dev = (scale * torch.randn(count, scale.shape[0])) @ self.block("q0", i).T
            else:
                scale = self.block("inv", i).sqrt()
                z = scale * torch.randn(count, *scale.shape)
                dev = self.block("q0", i) @ z @ self.block("q1", i).T
            out[n] = dev.reshape(count, *shape)
        return out

    def head_cov(self, phi: Tensor) -> Tensor:
        """J Σ J^T for a last layer (weight [C, D], optional bias [C]) from its features.

        The head's Jacobian is e_c ⊗ phi (and e_c for the bias), so the quadratic form
        needs no Jacobian: e.g. for Kronecker factors, with psi = phi Q1,
        cov[n, c, k] = sum_a Q0[c, a] Q0[k, a] sum_b psi[n, b]^2 / (l0[a] l1[b] + delta).
        """
        n, d = phi.shape
        if self.hessian == "full":
            c = self.shapes[self.names[0]][0]
            if len(self.names) > 1:
                phi = torch.cat([phi, torch.ones(n, 1, dtype=phi.dtype)], 1)
            sig = self.cov_head.reshape(c, phi.shape[1], c, -1)
            return torch.einsum("ni,cikj,nj->nck", phi, sig, phi)
        if self.hessian == "diag":
            var_w = self.block("var", 0).reshape(-1, d)
            diag = (phi * phi) @ var_w.T
            if len(self.names) > 1:
                diag = diag + self.block("var", 1)
            return torch.diag_embed(diag)
        q0, q1 = self.block("q0", 0), self.block("q1", 0)
        m = ((phi @ q1) ** 2) @ self.block("inv", 0).T
        cov = torch.einsum("ca,na,ka->nck", q0, m, q0)
        if len(self.names) > 1:
            qb = self.block("q0", 1)
            cov = cov + (qb * self.block("inv", 1)) @ qb.T
        return cov

    def output_cov(self, jac: dict[str, Tensor]) -> Tensor:
        flat = [jac[n].flatten(2) for n in self.names]
        if self.hessian == "full":
            j = torch.cat(flat, dim=2)
            return j @ self.cov @ j.transpose(1, 2)
        total = torch.zeros(())
        for i, j in enumerate(flat):
            if self.hessian == "diag":
                total = total + torch.einsum("ncp,p,nkp->nck", j, self.block("var", i), j)
            elif self.block("q1", i) is None:
                jq = j @ self.block("q0", i)
                total = total + torch.einsum("nca,a,nka->nck", jq, self.block("inv", i), jq)
            else:
                q0, q1 = self.block("q0", i), self.block("q1", i)
                jr = j.reshape(*j.shape[:2], q0.shape[0], q1.shape[0])
                jq = torch.einsum("oa,ncoi,ib->ncab", q0, jr, q1)
                total = total + torch.einsum("ncab,ab,nkab->nck", jq, self.block("inv", i), jq)
        return total


def _head_index(shapes: list[torch.Size]) -> Tensor | None:
    """Reorders a head's (weight row-major, then bias) vector to (class, [features, bias])."""
    if len(shapes) > 2 or len(shapes[0]) != 2:
        return None  # not a last layer
    c, d = shapes[0]
    if len(shapes) == 1:
        return torch.arange(c * d)
    rows = torch.arange(c * d).reshape(c, d)
    return torch.cat([rows, c * d + torch.arange(c)[:, None]], 1).flatten()


def _cholesky(cov: Tensor) -> Tensor:
    """Cholesky factor with growing jitter: a tuned posterior covariance can be near-singular."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    scale = cov.diagonal().mean().clamp_min(torch.finfo(cov.dtype).tiny)
    for jitter in (0.0, 1e-7, 1e-6, 1e-5, 1e-4):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if info == 0:
            return chol
    raise HarnessError("laplace: the full posterior covariance is not positive definite")


class LaplaceProgram(InferenceProgram):
    """MAP network plus covariance; the output kind follows pred and link.

    glm + probit: moments, the MAP logits and the diagonal of J Σ J^T (the probit
    approximation then needs no sampling). glm + mc: S logit draws from N(f, J Σ J^T)
    with its full output covariance. nn: S weight draws, the network run on each, vmapped.
    For the last layer the Jacobian is the features, so J Σ J^T has a closed form; for all
    weights the Jacobian is computed with torch.func inside the program.
    """

    def __init__(self, net: nn.Sequential, posterior: Posterior, cfg: Any):
        super().__init__()
        self.net = net.eval()
        self.names = list(posterior.meta["params"])
        params = dict(net.named_parameters())
        self.cov = Covariance(posterior, {n: params[n].shape for n in self.names})
        self.last_layer = posterior.meta["subset"] == "last_layer"
        self.pred, self.link, self.samples = cfg.pred, cfg.link, int(cfg.samples)
        self.kind = "moments" if (self.pred, self.link) == ("glm", "probit") else "samples"

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.pred == "nn":
            return self._weight_samples(x)
        mean, cov = self._glm(x)
        if self.link == "probit":
            return mean, cov.diagonal(dim1=1, dim2=2).clamp_min(0)
        chol = _batched_cholesky(cov)
        z = torch.randn(self.samples, *mean.shape, 1, dtype=mean.dtype)
        return mean + (chol @ z).squeeze(-1)

    def _glm(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.last_layer:
            phi = self.net[:-1](x)
            return self.net[-1](phi), self.cov.head_cov(phi)
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        subset = {n: params[n] for n in self.names}

        def logits(p: dict[str, Tensor], row: Tensor) -> Tensor:
            return functional_call(self.net, params | p, (row.unsqueeze(0),)).squeeze(0)

        jac = torch.vmap(jacrev(logits), in_dims=(None, 0))(subset, x)
        mean = self.net(x)
        return mean, self.cov.output_cov(jac)

    def _weight_samples(self, x: Tensor) -> Tensor:
        draws = self.cov.sample(self.samples)
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        theta = {n: params[n] + draws[n] for n in self.names}
        if self.last_layer:
            phi = self.net[:-1](x)
            w = theta[self.names[0]]
            bias = theta.get(self.names[1]) if len(self.names) > 1 else None
            out = torch.einsum("nd,scd->snc", phi, w)
            return out if bias is None else out + bias.unsqueeze(1)
        return over_draws(self.net, lambda p: functional_call(self.net, params | p, (x,)), theta)


# Relative jitters (times the mean of each matrix's diagonal) tried in turn by the batched
# Cholesky of the output covariance: the first is needed anyway (see `_batched_cholesky`),
# each next one is ten times larger, and past the last the matrix is not a covariance.
OUTPUT_JITTER = (1e-5, 1e-4, 1e-3, 1e-2)


def _batched_cholesky(cov: Tensor) -> Tensor:
    """Cholesky of each [C, C] output covariance, with a documented jitter retry.

    The logits' covariance is singular along directions the softmax ignores (e.g. a shift
    of all logits under a last-layer posterior), so `OUTPUT_JITTER[0]` times the mean
    diagonal is always added; a matrix whose factorisation still fails is retried with the
    next, ten times larger, jitter, and one that fails them all is a `HarnessError`, never
    a factor with zeros in it. Compiled graphs (torch.compile, torch.export) cannot raise
    on data, so there every level is computed and chosen per matrix with `where`; a matrix
    that fails all of them yields NaN samples: visibly wrong, not plausible numbers.
    """
    scale = cov.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    if torch.compiler.is_compiling():
        chol = torch.full_like(cov, torch.nan)
        for jitter in reversed(OUTPUT_JITTER):
            retry, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
            chol = torch.where((info == 0)[:, None, None], retry, chol)
        return chol
    chol, info = torch.linalg.cholesky_ex(cov + OUTPUT_JITTER[0] * scale * eye)
    for jitter in OUTPUT_JITTER[1:]:
        bad = info != 0
        if not bool(bad.any()):
            return chol
        chol, info = chol.clone(), info.clone()
        chol[bad], info[bad] = torch.linalg.cholesky_ex(cov[bad] + jitter * scale[bad] * eye)
    if bool((info != 0).any()):
        raise HarnessError(
            f"laplace: {int((info != 0).sum())} output covariance(s) are not positive "
            f"definite even with a jitter of {OUTPUT_JITTER[-1]:g} x their mean diagonal; "
            "the posterior is broken (refit it, or use method.link=probit)"
        )
    return chol


class LaplaceMethod(MethodBase):
    name = "laplace"
    base = "deterministic"
    fit_options = (
        "subset",
        "hessian",
        "tune",
        "prior_precision",
        "curvature",
        "batch_size",
    )

    def check(self, cfg: Any) -> None:
        """Before the MAP network trains: the options, and laplace-torch being installed."""
        check_options(cfg)
        if importlib.util.find_spec("laplace") is None:
            raise HarnessError(
                "method=laplace needs laplace-torch: pip install 'bnn-harness[laplace]'"
            )

    def base_config(self, cfg: Any) -> tuple[str, Any]:
        return self.base_with_fit(cfg)

    def fit(
        self,
        net_factory: NetFactory,
        data: DataBundle,
        cfg: LaplaceConfig,
        base: Posterior | None = None,
    ) -> Posterior:
        if base is None:
            raise HarnessError("laplace needs the deterministic posterior as its base")
        net = load_net(base, net_factory)
        la = fit_laplace(net, data, cfg)
        names = subset_names(net, cfg.subset)
        tensors = training.state_tensors("net", net)
        tensors |= posterior_tensors(la, net, names, cfg.hessian)
        meta = {
            "subset": cfg.subset,
            "hessian": cfg.hessian,
            "params": names,
            "prior_precision": [float(v) for v in la.prior_precision.flatten()],
            "log_marglik": float(la.log_marginal_likelihood()),
        }
        return Posterior(self.name, tensors, meta)

    def program(self, posterior: Posterior, net_factory: NetFactory, cfg: Any) -> InferenceProgram:
        check_options(cfg)
        net = load_net(posterior, net_factory)
        return LaplaceProgram(net, posterior, cfg).eval()


@hookimpl
def bnn_harness_methods() -> list:
    return [LaplaceMethod()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("method", "laplace_schema", LaplaceConfig)]

"""Scores computed from a `Predictive`, the one structure every method reduces to.

Raw program outputs differ by kind (logit samples or Gaussian moments); converting them here
first means every metric below is written once and compares methods on equal terms.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import Tensor

from harness.api import HarnessError, Predictive

KINDS = ("samples", "moments")
ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
_HAS_TORCHMETRICS = importlib.util.find_spec("torchmetrics") is not None


def _plogp_sum(p: Tensor, logp: Tensor) -> Tensor:
    """Negative entropy over the last axis; 0 * log 0 is taken as 0 rather than NaN."""
    return torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _entropy(probs: Tensor) -> Tensor:
    """Entropy of probabilities that may contain exact zeros (e.g. after averaging)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def predictive_from_samples(logits: Tensor) -> Predictive:
    """Entropy split of an ensemble of logits [S, B, C].

    Per-sample entropies use log_softmax so saturated logits give finite values, not log(0).
    """
    # A NaN logit (e.g. a compiled graph whose Cholesky failed) would become NaN metrics,
    # which read as a result; it is an error. -inf is a legitimate (saturated) logit.
    if torch.isnan(logits).any():
        raise HarnessError("the program's sampled logits contain NaN")
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    probs = p.mean(0)
    total = _entropy(probs)
    aleatoric = -_plogp_sum(p, log_p).mean(0)
    return Predictive(probs, total, aleatoric, (total - aleatoric).clamp(min=0))


def predictive_from_moments(
    mean: Tensor,
    var: Tensor,
    samples: int = 100,
    generator: torch.Generator | None = None,
) -> Predictive:
    """Entropy split of Gaussian logits N(mean, var), both [B, C].

    The probit approximation gives the probabilities without sampling noise; the expected
    entropy has no closed form, so it is estimated from `samples` draws.
    """
    if not torch.isfinite(mean).all() or torch.isnan(var).any():
        raise ValueError("moments contain NaN (or an infinite mean)")
    # Infinite variance is clamped to the largest finite value so the draws stay finite.
    var = var.clamp(min=0, max=torch.finfo(var.dtype).max)
    probs = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
    total = _entropy(probs)
    eps = torch.randn(
        (samples, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device
    )
    log_p = torch.log_softmax(mean + var.sqrt() * eps, dim=-1)
    aleatoric = -_plogp_sum(log_p.exp(), log_p).mean(0)
    epistemic = (total - aleatoric).clamp(min=0)
    return Predictive(probs, total, aleatoric, epistemic, variance=var.mean(-1))


def to_predictive(raw: Tensor | tuple[Tensor, Tensor], kind: str, samples: int = 100) -> Predictive:
    """Dispatch on the program's declared output kind, failing loudly on a typo."""
    if kind == "samples":
        return predictive_from_samples(raw)  # type: ignore[arg-type]
    if kind == "moments":
        mean, var = raw
        return predictive_from_moments(mean, var, samples=samples)
    raise ValueError(f"unknown output kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _ece_manual(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE binned exactly as torchmetrics does, so the score does not depend on what is installed.

    Bins are [lower, upper); a confidence of exactly 1.0 falls in its own extra bin.
    """
    conf, pred = probs.float().max(-1)
    acc = pred.eq(labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = torch.bucketize(conf, edges, right=True) - 1
    gap = torch.zeros(n_bins + 1, dtype=conf.dtype, device=conf.device)
    gap.scatter_add_(0, idx, acc - conf)
    return float(gap.abs().sum() / conf.numel())


def _ece(probs: Tensor, labels: Tensor) -> float:
    if not _HAS_TORCHMETRICS:
        return _ece_manual(probs, labels)
    from torchmetrics.functional.classification import multiclass_calibration_error

    ece = multiclass_calibration_error(
        probs.float(), labels, num_classes=probs.shape[-1], n_bins=ECE_BINS, norm="l1"
    )
    return float(ece)


def classification_scores(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy and proper scores; probabilities are clamped so a confident miss has finite NLL."""
    labels = labels.long()
    picked = probs.gather(-1, labels[:, None]).squeeze(-1)
    nll = -picked.clamp(min=torch.finfo(probs.dtype).tiny).log().mean()
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    brier = (probs - onehot).pow(2).sum(-1).mean()
    return {
        "cls/acc": float(probs.argmax(-1).eq(labels).float().mean()),
        "cal/nll": float(nll),
        "cal/brier": float(brier),
        "cal/ece": _ece(probs, labels),
    }


def reliability_diagram(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Per-bin confidence and accuracy for plotting; empty bins keep their slot as NaN.

    A confidence of exactly 1.0 is put in the last bin so there are exactly `bins` bars.
    """
    conf, pred = probs.double().max(-1)
    acc = pred.eq(labels.long()).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1].to(conf.device), right=True)
    count = torch.zeros(bins, dtype=torch.float64, device=conf.device)
    count.scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros_like(count).scatter_add_(0, idx, acc)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": (conf_sum / count).tolist(),
        "accuracy": (acc_sum / count).tolist(),
        "count": [int(c) for c in count.tolist()],
    }


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().reshape(-1).numpy()


def ood_scores(in_score: Tensor, out_score: Tensor, prefix: str) -> dict[str, float]:
    """Detection scores with OOD as the positive class, so higher score must mean more OOD."""
    score = np.concatenate([_np(in_score), _np(out_score)])
    y = np.concatenate([np.zeros(in_score.numel()), np.ones(out_score.numel())])
    fpr, tpr, _ = roc_curve(y, score)
    return {
        f"ood/auroc_{prefix}": float(roc_auc_score(y, score)),
        f"ood/aupr_{prefix}": float(average_precision_score(y, score)),
        f"ood/fpr95_{prefix}": float(fpr[tpr >= 0.95].min()),
    }


def uncertainty_means(pred: Predictive, split: str) -> dict[str, float]:
    """Split-level averages, to compare how methods attribute uncertainty across splits."""
    return {
        f"unc/{split}_total": float(pred.total.mean()),
        f"unc/{split}_aleatoric": float(pred.aleatoric.mean()),
        f"unc/{split}_epistemic": float(pred.epistemic.mean()),
    }


def concat(*preds: Predictive) -> Predictive:
    """Predictives joined along the batch; an optional field survives only if all carry it."""
    joined = {}
    for f in Predictive.__dataclass_fields__:
        parts = [getattr(p, f) for p in preds]
        joined[f] = None if any(v is None for v in parts) else torch.cat(parts)
    return Predictive(**joined)


def _counts(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """How often each of `size` items is drawn in each of `n` resamples with replacement."""
    draws = rng.integers(0, size, (n, size)) + size * np.arange(n)[:, None]
    return np.bincount(draws.ravel(), minlength=n * size).reshape(n, size)


def bootstrap_auroc(
    in_score: Tensor | np.ndarray,
    out_score: Tensor | np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
    block: int = 100,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling each class on its own.

    Resampling in- and out-of-distribution scores separately keeps both counts fixed, as
    they are by the protocol. A resample is a vector of draw counts, so its AUROC (the
    Mann-Whitney statistic, ties counting one half) is a weighted sum over one sort of the
    original scores: `block` resamples at a time, no sort and no Python loop per resample.
    """
    a = np.sort(np.asarray(in_score, dtype=np.float64).reshape(-1))
    b = np.asarray(out_score, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_auroc needs scores of both classes")
    below = np.searchsorted(a, b, side="left")  # in-scores strictly below each out-score
    upto = np.searchsorted(a, b, side="right")
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, block):
        n = min(block, resamples - start)
        cum = np.zeros((n, a.size + 1))
        np.cumsum(_counts(rng, a.size, n), axis=1, out=cum[:, 1:])
        wins = cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below])
        values.append((wins * _counts(rng, b.size, n)).sum(1) / (a.size * b.size))
    auroc = np.concatenate(values)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(auroc, [tail, 100 - tail])
    return float(lo), float(hi)


def _ood_block(in_dist: Predictive, ood: Predictive) -> dict[str, tuple[Tensor, Tensor]]:
    """OOD scores by name: entropy, mutual information and, for moment programs, the mean
    logit variance the seed code ranks by."""
    scores = {
        "entropy": (in_dist.total, ood.total),
        "mi": (in_dist.epistemic, ood.epistemic),
    }
    if in_dist.variance is not None and ood.variance is not None:
        scores["var"] = (in_dist.variance, ood.variance)
    return scores


def score_all(
    preds: dict[str, Predictive],
    labels: dict[str, Tensor],
    ood_names: list[str],
    bootstrap_seed: int = 0,
) -> dict[str, float]:
    """Every scalar for one run, under flat keys so runs tabulate side by side.

    The ambiguous split counts as in-distribution for OOD detection: ambiguity is aleatoric,
    and a good method should not flag it as OOD. The first OOD set gives the headline keys,
    each AUROC with a 95 % bootstrap interval (`_lo`, `_hi`): one run's AUROC alone says
    nothing about how far another test set or seed could move it.
    """
    if "test" not in preds:
        raise ValueError("score_all needs a 'test' split")
    out: dict[str, Any] = dict(classification_scores(preds["test"].probs, labels["test"]))
    in_dist = preds["test"]
    if "ambiguous" in preds:
        in_dist = concat(preds["test"], preds["ambiguous"])
        amb = classification_scores(preds["ambiguous"].probs, labels["ambiguous"])
        out.update({"amb/acc": amb["cls/acc"], "amb/nll": amb["cal/nll"]})
    for split, pred in preds.items():
        out.update(uncertainty_means(pred, split))
    for i, name in enumerate(ood_names):
        key = f"ood_{name}"
        if key not in preds:
            raise ValueError(f"OOD set {name!r} has no predictions under {key!r}")
        scores: dict[str, float] = {}
        for score, (inside, outside) in _ood_block(in_dist, preds[key]).items():
            scores |= ood_scores(inside, outside, score)
        if i == 0:
            out.update(scores)
            for score, (inside, outside) in _ood_block(in_dist, preds[key]).items():
                lo, hi = bootstrap_auroc(_np(inside), _np(outside), seed=bootstrap_seed)
                out |= {f"ood/auroc_{score}_lo": lo, f"ood/auroc_{score}_hi": hi}
        out.update({k.replace("ood/", f"ood/{name}/", 1): v for k, v in scores.items()})
    return out

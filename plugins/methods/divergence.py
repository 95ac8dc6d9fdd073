"""Distances between two sampled predictive distributions, vectorised over inputs.

The weight-shape study compares the predictive of a posterior under family X with the
Gaussian one at the same (mu, sigma). All estimators are from finite samples, so each
has a positive floor even for identical laws; callers measure that floor with two
independent Gaussian draws and report divergences against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

HIST_BINS = 30
_EPS = 1e-12


def histogram_kl(p: Tensor, q: Tensor, bins: int = HIST_BINS, pseudo: float = 0.5) -> Tensor:
    """KL(hist p || hist q) per input, for scalar outputs p, q of shape [S, P].

    Both histograms share `bins` equal-width bins spanning the pooled range of that input;
    `pseudo` counts per bin (Jeffreys) keep empty bins from giving infinite KL.
    """
    lo = torch.minimum(p.amin(0), q.amin(0))
    hi = torch.maximum(p.amax(0), q.amax(0))
    width = (hi - lo).clamp_min(_EPS)

    def counts(s: Tensor) -> Tensor:
        idx = ((s - lo) / width * bins).long().clamp(0, bins - 1)  # [S, P]
        out = torch.zeros(bins, s.shape[1], dtype=s.dtype)
        return out.scatter_add_(0, idx, torch.ones_like(s)) + pseudo

    cp, cq = counts(p), counts(q)
    hp, hq = cp / cp.sum(0), cq / cq.sum(0)
    return (hp * (hp.log() - hq.log())).sum(0)


def energy_distance_1d(p: Tensor, q: Tensor) -> Tensor:
    """Energy distance per input for scalar samples [S, P], via (2 int (F_p - F_q)^2)^(1/2).

    Same definition as scipy.stats.energy_distance; O(S log S) by one merged sort.
    """
    values, order = torch.cat([p, q]).sort(0)
    from_p = (order < len(p)).to(p.dtype)
    f_p = from_p.cumsum(0) / len(p)
    f_q = (1 - from_p).cumsum(0) / len(q)
    gaps = values.diff(dim=0)
    return (2 * ((f_p[:-1] - f_q[:-1]) ** 2 * gaps).sum(0)).clamp_min(0).sqrt()


def energy_distance(p: Tensor, q: Tensor) -> Tensor:
    """Energy distance per input for vector samples [S, B, C] (e.g. class probabilities).

    V-statistic (2 E|X-Y| - E|X-X'| - E|Y-Y'|)^(1/2), batched over B with cdist.
    """
    pb, qb = p.transpose(0, 1), q.transpose(0, 1)  # [B, S, C]
    cross = torch.cdist(pb, qb).mean((1, 2))
    within = torch.cdist(pb, pb).mean((1, 2)) + torch.cdist(qb, qb).mean((1, 2))
    return (2 * cross - within).clamp_min(0).sqrt()


def mean_prob_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(E p || E q) per input, between the sample-mean predictive probabilities [S, B, C]."""
    mp, mq = p.double().mean(0).clamp_min(_EPS), q.double().mean(0).clamp_min(_EPS)
    return (mp * (mp.log() - mq.log())).sum(-1)

"""Metrics against small cases worked out by hand, and ECE against a plain reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import metrics
from harness.api import Predictive
from harness.metrics import (
    classification_scores,
    ood_scores,
    predictive_from_moments,
    predictive_from_samples,
    reliability_diagram,
    score_all,
    to_predictive,
    uncertainty_means,
)

LN2 = math.log(2)

# Four samples, two classes; confidences 0.9, 0.62, 0.7, 0.85 sit in distinct ECE bins,
# away from bin edges. Predictions 0, 0, 1, 0 against labels 0, 1, 1, 0: three correct.
PROBS = torch.tensor([[0.9, 0.1], [0.62, 0.38], [0.3, 0.7], [0.85, 0.15]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0])


def h2(p: float) -> float:
    """Binary entropy in nats."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def ece_reference(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    conf, pred = probs.max(-1)
    correct = pred.eq(labels)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = [i for i in range(len(conf)) if lo < float(conf[i]) <= hi]
        if in_bin:
            acc = sum(float(correct[i]) for i in in_bin) / len(in_bin)
            avg_conf = sum(float(conf[i]) for i in in_bin) / len(in_bin)
            total += len(in_bin) / len(conf) * abs(acc - avg_conf)
    return total


# --- entropy split from samples ---------------------------------------------------------


def test_samples_hand_case() -> None:
    # Sample 1 gives p = (0.75, 0.25), sample 2 the mirror image: the mean is uniform.
    a = math.log(3)
    logits = torch.tensor([[[a, 0.0]], [[0.0, a]]], dtype=torch.float64)
    pred = predictive_from_samples(logits)
    assert pred.probs[0].tolist() == pytest.approx([0.5, 0.5])
    assert pred.total.item() == pytest.approx(LN2)
    assert pred.aleatoric.item() == pytest.approx(h2(0.75))
    assert pred.epistemic.item() == pytest.approx(LN2 - h2(0.75))


def test_samples_identical_have_no_epistemic() -> None:
    logits = torch.randn(1, 6, 3).expand(5, 6, 3)
    pred = predictive_from_samples(logits)
    assert torch.allclose(pred.epistemic, torch.zeros(6), atol=1e-6)
    assert torch.allclose(pred.total, pred.aleatoric, atol=1e-6)
    assert torch.allclose(pred.probs, torch.softmax(logits[0], -1), atol=1e-6)


def test_samples_disagreeing_one_hot_is_log2() -> None:
    logits = torch.tensor([[[20.0, -20.0]], [[-20.0, 20.0]]])
    pred = predictive_from_samples(logits)
    assert pred.epistemic.item() == pytest.approx(LN2, abs=1e-5)
    assert pred.aleatoric.item() == pytest.approx(0.0, abs=1e-5)


def test_samples_saturated_logits_are_finite() -> None:
    logits = torch.tensor([[[1e4, -1e4, 0.0]], [[-1e4, 1e4, 0.0]], [[0.0, -math.inf, 0.0]]])
    pred = predictive_from_samples(logits)
    for t in (pred.probs, pred.total, pred.aleatoric, pred.epistemic):
        assert torch.isfinite(t).all()


# --- entropy split from moments ---------------------------------------------------------


def test_moments_zero_var_is_softmax() -> None:
    mean = torch.randn(4, 3)
    pred = predictive_from_moments(mean, torch.zeros(4, 3))
    assert torch.allclose(pred.probs, torch.softmax(mean, -1))
    assert torch.allclose(pred.epistemic, torch.zeros(4), atol=1e-6)
    assert torch.allclose(pred.total, pred.aleatoric, atol=1e-6)


def test_moments_negative_var_is_clamped() -> None:
    mean = torch.randn(4, 3)
    pred = predictive_from_moments(mean, -torch.ones(4, 3))
    assert torch.allclose(pred.probs, torch.softmax(mean, -1))


def test_moments_probit_hand_case() -> None:
    # var = 8/pi makes the probit scale 1/sqrt(2); two classes reduce to a sigmoid.
    mean = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    var = torch.full((1, 2), 8 / math.pi, dtype=torch.float64)
    pred = predictive_from_moments(mean, var)
    p = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    assert pred.probs[0].tolist() == pytest.approx([p, 1 - p])
    assert pred.total.item() == pytest.approx(h2(p))


def test_moments_huge_var_is_finite_and_epistemic() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = predictive_from_moments(torch.zeros(3, 2), torch.full((3, 2), 1e12), generator=gen)
    for t in (pred.probs, pred.total, pred.aleatoric, pred.epistemic):
        assert torch.isfinite(t).all()
    # Draws are one-hot but disagree: all the uncertainty is epistemic.
    assert torch.allclose(pred.total, torch.full((3,), LN2))
    assert torch.allclose(pred.epistemic, torch.full((3,), LN2), atol=1e-3)
    inf = predictive_from_moments(torch.zeros(3, 2), torch.full((3, 2), math.inf))
    assert torch.isfinite(inf.aleatoric).all()


def test_moments_generator_is_reproducible() -> None:
    mean, var = torch.randn(5, 3), torch.rand(5, 3) * 4
    a = predictive_from_moments(mean, var, generator=torch.Generator().manual_seed(1))
    b = predictive_from_moments(mean, var, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.aleatoric, b.aleatoric)


@pytest.mark.parametrize("which", ["mean", "var"])
def test_moments_reject_nan(which: str) -> None:
    mean, var = torch.zeros(2, 3), torch.ones(2, 3)
    (mean if which == "mean" else var)[0, 1] = math.nan
    with pytest.raises(ValueError):
        predictive_from_moments(mean, var)


# --- dispatch ---------------------------------------------------------------------------


def test_to_predictive_dispatch() -> None:
    logits = torch.randn(3, 4, 2)
    assert torch.equal(
        to_predictive(logits, "samples").probs, predictive_from_samples(logits).probs
    )
    mean = torch.randn(4, 2)
    moments = to_predictive((mean, torch.zeros(4, 2)), "moments")
    assert torch.allclose(moments.probs, torch.softmax(mean, -1))


def test_to_predictive_unknown_kind_lists_valid() -> None:
    with pytest.raises(ValueError, match="samples") as err:
        to_predictive(torch.zeros(1, 1, 2), "logits")
    assert "moments" in str(err.value)


# --- classification ---------------------------------------------------------------------


def test_classification_hand_case() -> None:
    scores = classification_scores(PROBS, LABELS)
    assert scores["cls/acc"] == pytest.approx(0.75)
    nll = -(math.log(0.9) + math.log(0.38) + math.log(0.7) + math.log(0.85)) / 4
    assert scores["cal/nll"] == pytest.approx(nll)
    brier = (2 * 0.1**2 + 2 * 0.62**2 + 2 * 0.3**2 + 2 * 0.15**2) / 4
    assert scores["cal/brier"] == pytest.approx(brier)
    ece = (abs(1 - 0.9) + abs(0 - 0.62) + abs(1 - 0.7) + abs(1 - 0.85)) / 4
    assert scores["cal/ece"] == pytest.approx(ece, abs=1e-6)


def test_nll_of_confident_miss_is_finite() -> None:
    scores = classification_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(scores["cal/nll"])


def test_ece_matches_reference_on_random_data() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=gen), -1)
    labels = torch.randint(0, 4, (500,), generator=gen)
    expected = ece_reference(probs, labels)
    assert classification_scores(probs, labels)["cal/ece"] == pytest.approx(expected, abs=1e-5)
    assert metrics._ece_manual(probs, labels) == pytest.approx(expected, abs=1e-5)


def test_ece_fallback_matches_torchmetrics_when_saturated() -> None:
    pytest.importorskip("torchmetrics")
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(40 * torch.randn(300, 3, generator=gen), -1)  # many confidences == 1.0
    labels = torch.randint(0, 3, (300,), generator=gen)
    assert (probs.max(-1).values == 1).any()
    assert metrics._ece_manual(probs, labels) == pytest.approx(
        metrics._ece(probs, labels), abs=1e-6
    )


def test_ece_without_torchmetrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_HAS_TORCHMETRICS", False)
    ece = (0.1 + 0.62 + 0.3 + 0.15) / 4
    assert classification_scores(PROBS, LABELS)["cal/ece"] == pytest.approx(ece, abs=1e-6)


def test_reliability_diagram_hand_case() -> None:
    diagram = reliability_diagram(PROBS, LABELS, bins=5)
    assert diagram["bin_lower"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert diagram["bin_upper"] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert diagram["count"] == [0, 0, 0, 2, 2]
    assert all(math.isnan(v) for v in diagram["confidence"][:3] + diagram["accuracy"][:3])
    assert diagram["confidence"][3:] == pytest.approx([(0.62 + 0.7) / 2, (0.9 + 0.85) / 2])
    assert diagram["accuracy"][3:] == pytest.approx([0.5, 1.0])


def test_reliability_diagram_puts_certainty_in_last_bin() -> None:
    diagram = reliability_diagram(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bins=15)
    assert len(diagram["count"]) == 15
    assert diagram["count"][-1] == 1


# --- OOD and uncertainty summaries ------------------------------------------------------


def test_ood_tiny_case() -> None:
    in_score = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out_score = torch.tensor([0.35, 0.5, 0.6, 0.7])
    scores = ood_scores(in_score, out_score, "x")
    assert scores["ood/auroc_x"] == pytest.approx(15 / 16)  # only 0.35 < 0.4 is misordered
    assert scores["ood/aupr_x"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)
    # Catching 0.35 needs threshold <= 0.35, which also flags 0.4: FPR 1/4.
    assert scores["ood/fpr95_x"] == pytest.approx(0.25)


def test_ood_perfect_and_constant() -> None:
    perfect = ood_scores(torch.zeros(5), torch.ones(5), "p")
    assert perfect == {"ood/auroc_p": 1.0, "ood/aupr_p": 1.0, "ood/fpr95_p": 0.0}
    constant = ood_scores(torch.zeros(5), torch.zeros(5), "c")
    assert constant["ood/auroc_c"] == pytest.approx(0.5)


def test_uncertainty_means() -> None:
    pred = Predictive(
        probs=torch.full((2, 2), 0.5),
        total=torch.tensor([1.0, 3.0]),
        aleatoric=torch.tensor([0.5, 0.5]),
        epistemic=torch.tensor([0.5, 2.5]),
    )
    assert uncertainty_means(pred, "test") == {
        "unc/test_total": 2.0,
        "unc/test_aleatoric": 0.5,
        "unc/test_epistemic": 1.5,
    }


def _deterministic(probs: torch.Tensor) -> Predictive:
    return predictive_from_samples(probs.log()[None])


def test_score_all() -> None:
    test = _deterministic(PROBS)
    amb = _deterministic(torch.tensor([[0.55, 0.45], [0.5, 0.5]], dtype=torch.float64))
    far = _deterministic(torch.tensor([[0.5, 0.5], [0.52, 0.48]], dtype=torch.float64))
    near = _deterministic(torch.tensor([[0.95, 0.05], [0.6, 0.4]], dtype=torch.float64))
    preds = {"test": test, "ambiguous": amb, "ood_far": far, "ood_near": near}
    labels = {"test": LABELS, "ambiguous": torch.tensor([1, 0])}
    out = score_all(preds, labels, ["far", "near"])

    assert out["cls/acc"] == pytest.approx(0.75)
    assert out["amb/acc"] == pytest.approx(1 / 2)  # the ambiguous split alone
    for split in preds:
        assert f"unc/{split}_total" in out
    for stat in ("auroc", "aupr", "fpr95"):
        for score in ("entropy", "mi"):
            assert out[f"ood/{stat}_{score}"] == out[f"ood/far/{stat}_{score}"]
            assert f"ood/near/{stat}_{score}" in out
    assert out["ood/auroc_mi"] == pytest.approx(0.5)  # deterministic: MI is all zeros
    assert all(isinstance(v, float) for v in out.values())


def test_score_all_missing_ood_set() -> None:
    with pytest.raises(ValueError, match="far"):
        score_all({"test": _deterministic(PROBS)}, {"test": LABELS}, ["far"])


def _moments(mean: list[list[float]], var: list[list[float]]) -> Predictive:
    return to_predictive(
        (torch.tensor(mean, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)),
        "moments",
    )


def test_moment_programs_get_the_variance_score() -> None:
    """The seed code's OOD score: mean logit variance. Here the OOD inputs have larger
    variances but far larger mean margins, so entropy calls them in-distribution and only
    `var` ranks them right."""
    test = _moments([[1.0, 0.0]] * 3, [[0.1, 0.1], [0.2, 0.2], [0.3, 0.1]])
    ood = _moments([[4.0, 0.0]] * 3, [[0.5, 0.7], [0.9, 0.9], [0.8, 0.6]])
    assert torch.allclose(test.variance, torch.tensor([0.1, 0.2, 0.2], dtype=torch.float64))
    out = score_all({"test": test, "ood_x": ood}, {"test": torch.zeros(3).long()}, ["x"])
    assert out["ood/auroc_var"] == 1.0 and out["ood/x/auroc_var"] == 1.0
    assert out["ood/fpr95_var"] == 0.0 and out["ood/aupr_var"] == 1.0
    assert out["ood/auroc_var_lo"] == out["ood/auroc_var_hi"] == 1.0
    assert out["ood/auroc_entropy"] == 0.0


def test_sample_programs_have_no_variance_score() -> None:
    test, ood = _deterministic(PROBS), _deterministic(PROBS.flip(-1))
    assert test.variance is None
    out = score_all({"test": test, "ood_x": ood}, {"test": LABELS}, ["x"])
    assert not any("_var" in k for k in out)
    # One split without the field drops it from the join: a mixed concat scores nothing.
    assert metrics.concat(test, _moments([[1.0, 0.0]], [[1.0, 1.0]])).variance is None


def test_bootstrap_interval_covers_the_true_auroc() -> None:
    """Coverage sanity on synthetic scores with a known AUROC: N(0,1) against N(d,1) has
    AUROC Phi(d / sqrt 2). Over 40 draws of the data, a 90 % interval should hold the true
    value in roughly 36; accept 30-40 (binomial spread), and the interval must shrink with n."""
    from scipy.stats import norm

    d = 1.0
    truth = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for trial in range(40):
        a, b = rng.normal(0, 1, 150), rng.normal(d, 1, 150)
        lo, hi = metrics.bootstrap_auroc(a, b, resamples=400, level=0.9, seed=trial)
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    assert 30 <= hits <= 40
    lo, hi = metrics.bootstrap_auroc(rng.normal(0, 1, 2400), rng.normal(d, 1, 2400), seed=1)
    assert hi - lo < np.mean(widths) / 2  # 16x the data: about a quarter of the width


def test_bootstrap_is_seeded_and_matches_the_point_estimate_on_ties() -> None:
    a, b = np.array([0.0, 1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])
    assert metrics.bootstrap_auroc(a, b, seed=3) == metrics.bootstrap_auroc(a, b, seed=3)
    # A huge level on a degenerate case: every resample of constant scores is 0.5.
    assert metrics.bootstrap_auroc(np.zeros(5), np.zeros(7), resamples=50) == (0.5, 0.5)
    lo, hi = metrics.bootstrap_auroc(a, b)
    point = ood_scores(torch.tensor(a), torch.tensor(b), "x")["ood/auroc_x"]
    assert lo <= point <= hi
    with pytest.raises(ValueError, match="both classes"):
        metrics.bootstrap_auroc(np.zeros(0), b)

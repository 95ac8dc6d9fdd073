"""SWAG against its definition (Maddox et al. 2019) and torch's own batch-norm refresh."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from harness import registry, runner
from harness.api import DataBundle, DataSpec, HarnessError, Posterior
from harness.training import FitConfig, state_tensors
from plugins.datasets import DirtyDigits, DirtyDigitsConfig
from plugins.methods.deterministic import fit_map, load_net
from plugins.methods.swag import (
    SWAG,
    SWAGConfig,
    SWAGProgram,
    check_options,
    collect,
    moments,
    refresh_batchnorm,
)
from plugins.models import MLP, MLPConfig

SMALL = {"snapshots": 4, "rank": 3, "lr": 0.05}
SPEC = DataSpec((1, 8, 8), 10)


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return DirtyDigits().load(DirtyDigitsConfig(), 0)


def _bn_factory():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)
    )


def test_moments_follow_the_definition_on_hand_made_snapshots() -> None:
    snaps = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.5], [2.0, 0.0, 0.5], [6.0, -5.0, 0.5]])
    mean, var, dev = moments(snaps, rank=3)
    rows = snaps.tolist()
    k = len(rows)
    for j in range(3):
        column = [r[j] for r in rows]
        avg = sum(column) / k
        assert mean[j].item() == pytest.approx(avg)
        assert var[j].item() == pytest.approx(sum(v * v for v in column) / k - avg * avg)
        # deviation i: snapshot i minus the average of snapshots 1..i; the last `rank` kept
        for row, i in enumerate(range(k - 3, k)):
            running = sum(column[: i + 1]) / (i + 1)
            assert dev[row, j].item() == pytest.approx(column[i] - running)
    assert var[2] == 0.0 and (var >= 0).all()  # constant weight: clamped, not -1e-8


def test_variance_is_clamped_where_float_cancellation_would_go_negative() -> None:
    snaps = torch.full((5, 4), 1e4) + torch.tensor([0.0, 1e-3, 0.0, 0.0])
    _, var, _ = moments(snaps, rank=2, var_clamp=1e-30)
    assert (var >= 1e-30).all()


def _posterior(net: nn.Module, rank: int, scale_var: float = 1e-2) -> Posterior:
    torch.manual_seed(0)
    tensors = state_tensors("net", net)
    for n, p in net.named_parameters():
        tensors[f"var.{n}"] = torch.rand_like(p) * scale_var
        tensors[f"dev.{n}"] = torch.randn(rank, *p.shape) * 0.1
    return Posterior("swag", tensors, {"snapshots": rank, "rank": rank})


def test_sample_mean_is_the_swa_average_and_covariance_the_swag_one() -> None:
    factory = MLP().factory(MLPConfig(hidden=[8]), SPEC)
    net = factory()
    post = _posterior(net, rank=5)
    prog = SWAGProgram(net, post, samples=1, scale=0.5)
    torch.manual_seed(1)
    draws = prog.sample(40_000)
    for n, p in net.named_parameters():
        var = post.tensors[f"var.{n}"]
        low_rank = (post.tensors[f"dev.{n}"] ** 2).sum(0) / (5 - 1)
        expected = 0.5 * (var + low_rank)
        tol = 6 * (expected / 40_000).sqrt() + 1e-6
        assert ((draws[n].mean(0) - p.detach()).abs() < tol).all(), n
        assert torch.allclose(draws[n].var(0), expected, rtol=0.06, atol=1e-7), n


def test_fit_mean_is_the_average_of_the_collected_snapshots(data) -> None:
    factory = MLP().factory(MLPConfig(hidden=[16]), data.spec)
    torch.manual_seed(0)
    base = Posterior("deterministic", state_tensors("net", fit_map(factory, data, FitConfig(2))))
    cfg = SWAGConfig(**SMALL)
    torch.manual_seed(5)
    post = SWAG().fit(factory, data, cfg, base)
    torch.manual_seed(5)
    snaps = collect(load_net(base, factory), data, cfg)
    swa = torch.cat([post.tensors[f"net.{n}"].flatten() for n, _ in factory().named_parameters()])
    assert torch.allclose(swa, snaps.mean(0), atol=1e-6)
    assert not torch.allclose(snaps[0], snaps[-1])  # SGD moved between snapshots
    first = next(n for n, _ in factory().named_parameters())
    assert post.tensors[f"dev.{first}"].shape[0] == cfg.rank
    out = SWAG().program(post, factory, SWAGConfig(samples=6)).eval()(data.test[0][:5])
    assert out.shape == (6, 5, 10) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_batchnorm_refresh_matches_torch_update_bn() -> None:
    torch.manual_seed(0)
    net = _bn_factory().eval()
    post = _posterior(net, rank=3)
    x_bn = torch.randn(64, 1, 8, 8) * 2 + 0.5
    post.tensors["bn.x"] = x_bn
    prog = SWAGProgram(net, post, samples=3, scale=0.5)
    torch.manual_seed(2)
    theta = prog.sample(3)
    stats = refresh_batchnorm(net, theta, x_bn)
    x = torch.randn(5, 1, 8, 8)
    torch.manual_seed(2)
    out = prog(x)
    for s in range(3):
        ref = copy.deepcopy(net)
        ref.load_state_dict({k: v[s] for k, v in theta.items()}, strict=False)
        update_bn(DataLoader(TensorDataset(x_bn), batch_size=len(x_bn)), ref)
        assert torch.allclose(stats["2.running_mean"][s], ref[2].running_mean, atol=1e-5)
        assert torch.allclose(stats["2.running_var"][s], ref[2].running_var, rtol=1e-4)
        assert torch.allclose(out[s], ref.eval()(x), atol=1e-4)
    assert not torch.allclose(stats["2.running_mean"][0], stats["2.running_mean"][1])


def test_batchnorm_model_end_to_end(data) -> None:
    torch.manual_seed(0)
    base = Posterior(
        "deterministic", state_tensors("net", fit_map(_bn_factory, data, FitConfig(2)))
    )
    post = SWAG().fit(_bn_factory, data, SWAGConfig(**SMALL, bn_rows=100), base)
    assert post.tensors["bn.x"].shape == (100, 1, 8, 8)
    out = SWAG().program(post, _bn_factory, SWAGConfig(samples=4))(data.test[0][:7])
    assert out.shape == (4, 7, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "linear"}, "valid values: constant, cyclic"),
        ({"rank": 1}, r"rank must be in 2\.\.snapshots"),
        ({"rank": 30, "snapshots": 20}, r"rank must be in 2\.\.snapshots \(20\)"),
        ({"samples": 0}, "samples must be positive"),
        ({"lr": -1.0}, "lr must be >= 0"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        check_options(SWAGConfig(**options))


def test_runner_logs_to_mlflow_and_reuses_the_map(make_cfg, tmp_path: Path) -> None:
    small = [f"method.{k}={v}" for k, v in SMALL.items()]
    runner.run(make_cfg("method=deterministic"), registry.default())
    results = runner.run(make_cfg("method=swag", *small, "method.samples=8"), registry.default())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"])
    swag = runs[runs["params.method.name"] == "swag"]
    assert list(swag["status"]) == ["FINISHED"]
    assert swag["params.method.snapshots"].iloc[0] == "4"
    for key in ("cls/acc", "cal/nll", "cal/ece", "ood/auroc_entropy", "ood/auroc_mi"):
        assert math.isfinite(results[key]), key
    assert results["cls/acc"] > 0.5
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached.count("deterministic") == 1 and cached.count("swag") == 1
    with pytest.raises(HarnessError, match="valid values: constant, cyclic"):
        runner.run(make_cfg("method=swag", "method.schedule=step"), registry.default())

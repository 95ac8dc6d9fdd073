"""Local linearisation: exact where the network is linear, PFP-like where ReLUs are far from
their kink, and end to end on SVI and Laplace-diag posteriors."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import CONF, FAST, store_overrides
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from harness import moments as gops
from harness import registry, runner
from harness.api import DataSpec, HarnessError, Posterior
from plugins.methods import linearised as lin
from plugins.methods.linearised import Linearised, LinearisedConfig
from plugins.methods.pfp import make_program
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

SPEC = DataSpec((1, 8, 8), 10)


def posterior(net: nn.Module, sigma: float) -> Posterior:
    tensors = {f"mu.{k}": v.detach().clone() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": torch.full_like(v, sigma) for k, v in net.named_parameters()}
    return Posterior("svi", tensors)


def program(post: Posterior, net: nn.Module):
    return Linearised().program(post, lambda: net, LinearisedConfig())


@pytest.mark.parametrize(
    "factory",
    [MLP().factory(MLPConfig(), SPEC), LeNet5().factory(LeNet5Config(), SPEC)],
    ids=["mlp", "lenet5"],
)
def test_zero_variance_is_the_deterministic_network(factory) -> None:
    torch.manual_seed(0)
    net = factory().eval()
    x = torch.randn(5, 1, 8, 8)
    prog = program(posterior(net, 0.0), net)
    mean, var = prog(x)
    assert prog.kind == "moments" and prog.moment_ops() is None
    assert torch.allclose(mean, net(x), atol=1e-6) and torch.equal(var, torch.zeros_like(var))
    mean, var = program(posterior(net, 0.05), net)(x)
    assert torch.allclose(mean, net(x), atol=1e-6), "linearisation keeps the mean network"
    assert (var > 0).all()


def test_linear_network_is_exact_and_equal_to_pfp() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(27, 8), nn.Linear(8, 4)
    ).eval()
    post, x = posterior(net, 0.1), torch.randn(4, 1, 8, 8)
    for a, b in zip(program(post, net)(x), make_program(post, lambda: net)(x), strict=True):
        assert torch.equal(a, b)


def test_relu_linearisation_against_exact_moments() -> None:
    m = torch.tensor([-4.0, -0.5, 0.0, 0.5, 4.0])
    v = torch.ones(5)
    mean, var = lin.relu(m, v)
    assert torch.equal(mean, m.clamp_min(0)) and torch.equal(var, torch.tensor([0, 0, 0, 1, 1.0]))
    exact_mean, exact_var = gops.relu(m, v)
    far = torch.tensor([True, False, False, False, True])  # 4 std from the kink
    assert torch.allclose(mean[far], exact_mean[far], atol=1e-4)
    assert torch.allclose(var[far], exact_var[far], atol=1e-3)
    # At the kink linearisation misses E[relu] = s phi(0) and half the variance.
    assert exact_mean[2] == pytest.approx(0.3989, abs=1e-4) and mean[2] == 0


def test_maxpool_takes_the_variance_of_the_largest_mean() -> None:
    m = torch.tensor([[[[1.0, 5.0], [2.0, -1.0]]]])
    v = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    mean, var = lin.maxpool2d(m, v, 2, 2)
    assert mean.item() == 5.0 and var.item() == pytest.approx(0.2)


def compose_cfg(root: Path, *overrides: str) -> DictConfig:
    """conftest's fast settings, with the training ones moved onto the base node."""
    fast = [o for o in FAST if not o.startswith("method.fit.")] + ["method.base.fit.epochs=3"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*fast, *store_overrides(root), *overrides])


def test_base_node_composes_svi_and_laplace(make_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, "method=linearised")
    name, node = runner.base_of(Linearised(), cfg.method)
    svi = make_cfg("method=svi")
    job = runner.Job(cfg, registry.default(), None, None)  # type: ignore[arg-type]
    assert name == "svi"
    assert runner.training_key(job, node, name) == runner.training_key(job, svi.method, "svi")
    cfg = compose_cfg(
        tmp_path, "method=linearised", "method@method.base=laplace", "method.base.hessian=diag"
    )
    assert runner.base_of(Linearised(), cfg.method)[0] == "laplace"
    assert cfg.method.base.hessian == "diag"


def test_fit_without_base_is_a_clear_error() -> None:
    with pytest.raises(HarnessError, match=r"method\.base"):
        Linearised().fit(lambda: nn.Linear(1, 1), None, LinearisedConfig())  # type: ignore[arg-type]


def test_run_on_svi_logs_like_every_method(tmp_path: Path) -> None:
    results = runner.run(compose_cfg(tmp_path, "method=linearised"), registry.default())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"])
    assert list(runs["status"]) == ["FINISHED"]
    assert runs.loc[0, "tags.mlflow.runName"] == "linearised-torch"
    assert runs.loc[0, "params.method.base.name"] == "svi"
    assert runs.loc[0, "metrics.cal/nll"] == pytest.approx(results["cal/nll"])
    assert results["cls/acc"] > 0.5 and results["unc/test_epistemic"] > 0


@pytest.mark.slow
def test_run_on_laplace_diag(tmp_path: Path) -> None:
    cfg = compose_cfg(
        tmp_path, "method=linearised", "method@method.base=laplace", "method.base.hessian=diag"
    )
    results = runner.run(cfg, registry.default())
    assert results["cls/acc"] > 0.5 and results["unc/test_epistemic"] > 0
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert {"deterministic", "laplace", "linearised"} <= set(cached)

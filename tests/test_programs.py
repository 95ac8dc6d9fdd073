"""The InferenceProgram contract on the torch backend, for both output kinds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from harness import metrics
from harness.api import DataSpec, InferenceProgram, Posterior
from plugins.backends import TorchBackend, TorchConfig
from plugins.methods.ensemble import Ensemble, EnsembleConfig
from plugins.methods.mc_dropout import MCDropout, MCDropoutConfig
from plugins.methods.svi import SVI, SVIConfig, lrt_forward
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

SPEC = DataSpec((1, 8, 8), 10)


class GaussianLogits(InferenceProgram):
    """A minimal moments program: a linear map with known output variance."""

    kind = "moments"

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.lin(x.flatten(1))
        return mean, torch.full_like(mean, 0.5)


def test_moments_program_through_torch_backend() -> None:
    exe = TorchBackend().compile(GaussianLogits(), torch.zeros(1, 1, 8, 8), TorchConfig())
    mean, var = exe(torch.randn(5, 1, 8, 8))
    assert mean.shape == var.shape == (5, 10)
    pred = metrics.to_predictive((mean, var), "moments", samples=50)
    expected = torch.softmax(mean / math.sqrt(1 + math.pi / 8 * 0.5), -1)
    assert torch.allclose(pred.probs, expected)
    assert exe.describe()["target"] == "cpu"


def _svi_posterior(factory, sigma: float) -> Posterior:
    net = factory()
    tensors = {f"mu.{k}": v.detach() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": torch.full_like(v, sigma) for k, v in net.named_parameters()}
    return Posterior("svi", tensors)


@pytest.mark.parametrize("model", [MLP(), LeNet5()])
@pytest.mark.parametrize("local_reparam", [False, True])
def test_svi_program_shapes_and_zero_variance(model, local_reparam: bool) -> None:
    cfg = MLPConfig() if model.name == "mlp" else LeNet5Config()
    factory = model.factory(cfg, SPEC)
    x = torch.randn(3, 1, 8, 8)
    post = _svi_posterior(factory, 0.0)
    prog = SVI().program(post, factory, SVIConfig(samples=7, local_reparam=local_reparam))
    out = TorchBackend().compile(prog, x[:1], TorchConfig())(x)
    assert out.shape == (7, 3, 10)
    # sigma = 0: every sample is the mean network
    net = factory().eval()
    net.load_state_dict({k[3:]: v for k, v in post.tensors.items() if k.startswith("mu.")})
    assert torch.allclose(out, net(x).expand(7, 3, 10), atol=1e-5)


def test_lrt_matches_weight_sampling_moments() -> None:
    """Local reparameterisation samples the same pre-activation distribution (one layer)."""
    layer = nn.Sequential(nn.Linear(5, 2))
    mu = {"0.weight": torch.randn(2, 5), "0.bias": torch.randn(2)}
    var = {"0.weight": torch.rand(2, 5), "0.bias": torch.rand(2)}
    x = torch.randn(1, 5).expand(200_000, 5)
    torch.manual_seed(0)
    out = lrt_forward(layer, mu, var, x)
    expected_var = x[0] ** 2 @ var["0.weight"].T + var["0.bias"]
    assert torch.allclose(out.mean(0), x[0] @ mu["0.weight"].T + mu["0.bias"], atol=0.02)
    assert torch.allclose(out.var(0), expected_var, rtol=0.02)


def test_mc_dropout_samples_differ_and_ensemble_stacks() -> None:
    factory = MLP().factory(MLPConfig(dropout=0.5), SPEC)
    net = factory()
    post = Posterior("deterministic", {f"net.{k}": v for k, v in net.state_dict().items()})
    x = torch.randn(4, 1, 8, 8)
    drop = MCDropout().program(post, factory, MCDropoutConfig(samples=6)).eval()
    out = drop(x)
    assert out.shape == (6, 4, 10)
    assert not torch.allclose(out[0], out[1])

    nets = [factory() for _ in range(3)]
    tensors = {f"member{i}.{k}": v for i, n in enumerate(nets) for k, v in n.state_dict().items()}
    prog = Ensemble().program(
        Posterior("ensemble", tensors, {"members": 3}), factory, EnsembleConfig()
    )
    out = prog(x)
    for i, n in enumerate(nets):
        assert torch.allclose(out[i], n.eval()(x), atol=1e-6)


def test_over_draws_loop_and_vmap_agree_and_compile_sees_vmap() -> None:
    """Eager conv nets loop over draws (faster than vmap's grouped conv); the result must be
    what vmap gives, and a traced call must still see one batched graph (no unrolled loop)."""
    from torch.func import functional_call

    from harness.api import over_draws

    net = LeNet5().factory(LeNet5Config(), SPEC)().eval()
    draws = {k: v.detach() + 0.1 * torch.randn(7, *v.shape) for k, v in net.named_parameters()}
    x = torch.randn(3, 1, 8, 8)

    def one(p: dict[str, Tensor]) -> Tensor:
        return functional_call(net, p, (x,))

    looped = over_draws(net, one, draws)
    assert looped.shape == (7, 3, 10)
    torch.testing.assert_close(looped, torch.vmap(one)(draws), rtol=1e-5, atol=1e-5)

    class Sampled(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return over_draws(net, lambda p: functional_call(net, p, (x,)), draws)

    graph = torch.export.export(Sampled(), (x,)).graph
    convs = [n for n in graph.nodes if "conv" in str(n.target)]
    assert 0 < len(convs) <= 2  # LeNet's two convs once each, batched over the 7 draws

"""Moment propagation on a residual network traced by torch.fx: the `resnet` model plugin.

Per layer against Monte Carlo: every op of the program is fed Gaussian inputs with the
moments PFP gives it (independent units, independent branches at an add: the mean-field
assumption), weights are sampled, the exact op is run, and PFP's output moments must lie
within 4 MC standard errors (20k draws). The resnet uses average pooling, so every op in
it is exact under that assumption and the bound is MC error alone. Then the same program
on TVM against PyTorch, and the refusals: an unsupported op is named with its graph node.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from harness import moments as gops
from harness.api import MOMENT_INPUT, DataSpec, HarnessError, MomentOp, Posterior
from plugins.methods.linearised import LinearisedProgram
from plugins.methods.pfp import make_program
from plugins.methods.svi import MeanField, SampledWeights, lrt_forward
from plugins.models import ResNet, ResNetConfig

MNIST = DataSpec((1, 28, 28), 10)
DRAWS, CHUNK, SIGMAS = 20_000, 1_000, 4.0


def resnet(width: int = 4, blocks: int = 2, spec: DataSpec = MNIST, seed: int = 0) -> tuple:
    """A resnet with batch-norm statistics set, and a posterior with stds of ~10% of |mu|."""
    torch.manual_seed(seed)
    factory = ResNet().factory(ResNetConfig(width=width, blocks=blocks), spec)
    net = factory().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    params = dict(net.named_parameters())
    tensors = {f"mu.{k}": v.detach().clone() for k, v in params.items()}
    tensors |= {f"sigma.{k}": 0.1 * v.detach().abs() + 0.02 for k, v in params.items()}
    tensors |= {f"buffer.{k}": v.clone() for k, v in net.named_buffers()}
    return net, factory, Posterior("svi", tensors)


def layer_moments(ops: list[MomentOp], x: Tensor) -> dict[str, gops.Moments]:
    """Every op's output moments, by op name, as the PFP program computes them."""
    out: dict[str, gops.Moments] = {}

    def step(i: int, op: MomentOp, args: list[gops.Moments]) -> gops.Moments:
        out[op.name] = gops.apply(op, *[t for pair in args for t in pair])
        return out[op.name]

    gops.run_graph(ops, x, step)
    return out


def sample_op(op: MomentOp, inputs: list[gops.Moments], n: int, gen: torch.Generator) -> Tensor:
    """n exact evaluations of one op on independent Gaussian inputs (and sampled weights)."""
    xs = [
        m.expand(n, *m.shape)
        if v is None
        else m + v.sqrt() * torch.randn(n, *m.shape, generator=gen, dtype=m.dtype)
        for m, v in inputs
    ]
    t, a = op.tensors, op.attrs
    if op.op in ("dense", "conv2d"):
        w = t["mean_w"] + t["var_w"].sqrt() * torch.randn(n, *t["mean_w"].shape, generator=gen)
        b = t["mean_b"] + t["var_b"].sqrt() * torch.randn(n, *t["mean_b"].shape, generator=gen)
        if op.op == "dense":
            return torch.einsum("nbi,noi->nbo", xs[0], w) + b[:, None, :]
        conv = lambda x, w, b: F.conv2d(x, w, b, a["stride"], a["padding"])  # noqa: E731
        return torch.vmap(conv)(xs[0], w, b)
    if op.op == "relu":
        return torch.relu(xs[0])
    if op.op == "avgpool2d":
        return F.avg_pool2d(xs[0].flatten(0, 1), a["kernel"], a["stride"]).unflatten(0, (n, -1))
    if op.op == "batchnorm":
        shape = (-1,) + (1,) * (xs[0].dim() - 3)
        return xs[0] * t["scale"].reshape(shape) + t["shift"].reshape(shape)
    if op.op == "add":
        return xs[0] + xs[1]
    if op.op == "flatten":
        return xs[0].flatten(2)
    raise AssertionError(f"no sampler for {op.op}")


def mc_check(op: MomentOp, inputs: list[gops.Moments], pfp: gops.Moments, seed: int) -> None:
    """PFP's (mean, var) of one op against DRAWS samples: SIGMAS standard errors on 64 units
    picked in advance, and on every unit the Bonferroni bound for the layer's unit count
    (so that a layer of thousands of units fails by chance with probability 1e-3 at most)."""
    gen = torch.Generator().manual_seed(seed)
    sums = [0.0] * 5
    for _ in range(DRAWS // CHUNK):
        y = sample_op(op, inputs, CHUNK, gen).double()
        sums = [s + y.pow(k).sum(0) for k, s in enumerate(sums)]
    n = DRAWS
    raw = [s / n for s in sums]
    mean = raw[1]
    var = raw[2] - mean.square()
    m4 = raw[4] - 4 * mean * raw[3] + 6 * mean.square() * raw[2] - 3 * mean.pow(4)
    # Standard errors under the hypothesis (PFP's variance, a Gaussian's kurtosis at least),
    # with a floor from the layer's average variance (1e-3 of its std for means, 1e-2 of it
    # for variances): a ReLU unit far below zero has a handful of nonzero draws, or none,
    # and an MC error estimate from them is itself unreliable. A typical unit's standard
    # error (0.7% of its std, 1-2% of its variance at 20k draws) is at or above the floor.
    p_mean, p_var = pfp[0].double(), pfp[1].double()
    level = p_var.mean()
    se_mean = (torch.maximum(var, p_var).clamp_min(0) / n).sqrt() + 1e-3 * level.sqrt()
    se_var = (torch.maximum(m4 - var.square(), 2 * p_var.square()).clamp_min(0) / n).sqrt()
    z_mean = ((p_mean - mean).abs() / se_mean).flatten()
    z_var = ((p_var - var).abs() / (se_var + 1e-2 * level)).flatten()
    picked = torch.randperm(len(z_mean), generator=gen)[:64]
    bound = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - 5e-4 / len(z_mean)))
    for name, z in (("mean", z_mean), ("var", z_var)):
        assert z[picked].max() < SIGMAS, f"{op.name}: {name} off by {z[picked].max():.2f} SE"
        assert z.max() < max(bound, SIGMAS), f"{op.name}: {name} off by {z.max():.2f} SE"


@pytest.mark.slow
def test_every_layer_within_monte_carlo_error() -> None:
    _, factory, post = resnet()
    prog = make_program(post, factory)
    x = torch.randn(2, *MNIST.input_shape, generator=torch.Generator().manual_seed(1))
    moments = layer_moments(prog.ops, x)
    env = {MOMENT_INPUT: (x, None)} | moments
    last = MOMENT_INPUT
    kinds = set()
    for i, op in enumerate(prog.ops):
        inputs = [env[n] for n in op.inputs] if op.inputs else [env[last]]
        if all(v is None for _, v in inputs) and op.op not in ("dense", "conv2d"):
            last = op.name
            continue  # deterministic in and out: nothing to sample
        mc_check(op, inputs, moments[op.name], seed=100 + i)
        kinds.add(op.op)
        last = op.name
    assert kinds == {"conv2d", "batchnorm", "relu", "add", "avgpool2d", "flatten", "dense"}


def test_graph_program_is_the_network_at_zero_variance() -> None:
    net, factory, post = resnet()
    zero = {
        k: torch.zeros_like(v) if k.startswith("sigma.") else v for k, v in post.tensors.items()
    }
    x = torch.randn(3, *MNIST.input_shape)
    prog = make_program(Posterior("svi", zero), factory)
    adds = [op for op in prog.ops if op.op == "add"]
    assert len(adds) == 2 and all(len(op.inputs) == 2 for op in adds)
    mean, var = prog(x)
    torch.testing.assert_close(mean, net(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(var, torch.zeros_like(var))
    lin_mean, _ = LinearisedProgram(prog.ops)(x)
    torch.testing.assert_close(lin_mean, net(x), rtol=1e-5, atol=1e-5)


def test_buffers_from_the_posterior_are_used() -> None:
    """Running statistics come from `buffer.` tensors, not the freshly built network."""
    _, factory, post = resnet()
    x = torch.randn(2, *MNIST.input_shape)
    without = {k: v for k, v in post.tensors.items() if not k.startswith("buffer.")}
    with_stats, _ = make_program(post, factory)(x)
    fresh, _ = make_program(Posterior("svi", without), factory)(x)
    assert not torch.allclose(with_stats, fresh)


def test_local_reparameterisation_and_sampling_on_the_traced_net() -> None:
    """SVI's local reparameterisation walks the fx graph: at zero variance it is the net,
    with variance its logit moments agree with PFP's to within the approximations
    (loose bound: both are mean-field, only the Gaussian assumption of ReLU differs)."""
    net, factory, post = resnet(width=3, blocks=1, spec=DataSpec((1, 8, 8), 10))
    mu = {k[3:]: v for k, v in post.tensors.items() if k.startswith("mu.")}
    var = {k[6:]: v.square() for k, v in post.tensors.items() if k.startswith("sigma.")}
    x = torch.randn(2, 1, 8, 8)
    zero = {k: torch.zeros_like(v) for k, v in var.items()}
    torch.testing.assert_close(lrt_forward(net, mu, zero, x), net(x), rtol=1e-5, atol=1e-5)
    rows = x.repeat(4000, 1, 1, 1)
    out = lrt_forward(net, mu, var, rows).reshape(4000, 2, -1)
    mean, pvar = make_program(post, lambda: net)(x)
    assert ((out.mean(0) - mean).abs() / pvar.sqrt()).max() < 0.2
    samples = SampledWeights(factory(), post, 8, local_reparam=True)(x)
    assert samples.shape == (8, 2, 10) and torch.isfinite(samples).all()
    q = MeanField(factory(), 1e-3)
    assert q(x, local_reparam=True).shape == (2, 10)


class Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x)) + 1.0


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def _moments(net: nn.Module) -> tuple[dict, dict]:
    mu = {k: v.detach() for k, v in net.named_parameters()}
    return mu, {k: torch.zeros_like(v) for k, v in mu.items()}


def test_unsupported_op_is_refused_by_name_with_its_node() -> None:
    net = Tanh()
    with pytest.raises(HarnessError, match=r"tanh \(graph node 'tanh'\)"):
        gops.build_ops(net, *_moments(net))
    with pytest.raises(HarnessError, match=r"cannot trace Branchy with torch\.fx"):
        gops.build_ops(Branchy(), *_moments(Branchy()))
    seq = nn.Sequential(nn.Linear(4, 3), nn.GELU())
    with pytest.raises(HarnessError, match=r"layer 1 \(GELU\)"):
        gops.build_ops(seq, *_moments(seq))


def test_model_plugin_rejects_bad_shapes() -> None:
    with pytest.raises(HarnessError, match="square inputs"):
        ResNet().factory(ResNetConfig(blocks=4), DataSpec((1, 8, 8), 10))
    with pytest.raises(HarnessError, match=r"model\.width"):
        ResNet().check(ResNetConfig(width=0))


@pytest.mark.slow
def test_tvm_matches_torch_on_the_resnet() -> None:
    pytest.importorskip("tvm")
    from plugins.backends.tvm import TVMConfig
    from plugins.backends.tvm.backend import TVMBackend

    _, factory, post = resnet(width=4, blocks=2)
    program = make_program(post, factory)
    x = torch.randn(3, *MNIST.input_shape, generator=torch.Generator().manual_seed(2))
    exe = TVMBackend().compile(program, x, TVMConfig(tune="none"))
    assert exe.describe()["path"] == "gaussian"
    mean, var = exe(x)
    with torch.no_grad():
        ref_mean, ref_var = program(x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(var.sum()))

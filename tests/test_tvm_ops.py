"""The TVM Gaussian operator library against the PyTorch PFP, operator by operator and whole nets.

Every case is compiled for real (LLVM, this CPU) twice: with TVM's default lowering and
with the hand schedules, whose tiling, local accumulators and vectorisation are where
index bugs would hide.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.api import DataSpec, HarnessError, MomentOp, Posterior
from harness.moments import build_ops, diagonal_moments
from plugins.backends.tvm import TVMConfig
from plugins.backends.tvm.backend import TVMBackend
from plugins.methods.pfp.program import PFPProgram
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig

RTOL, ATOL = 1e-4, 1e-5


def _affine(shape: tuple[int, ...], gen: torch.Generator, spread: float = 0.05) -> dict:
    fan_in = math.prod(shape[1:])
    return {
        "mean_w": torch.randn(*shape, generator=gen) / math.sqrt(fan_in),
        "var_w": (spread * torch.rand(*shape, generator=gen)) ** 2,
        "mean_b": 0.1 * torch.randn(shape[0], generator=gen),
        "var_b": (spread * torch.rand(shape[0], generator=gen)) ** 2,
    }


def _cases() -> dict[str, tuple[list[MomentOp], tuple[int, ...]]]:
    """Each op after a first layer that gives it a non-zero variance; `*_first`: the shortcut."""
    g = torch.Generator().manual_seed(0)
    conv_in = MomentOp("conv2d", _affine((4, 2, 3, 3), g), {"first": True, "padding": 1})
    img = (3, 2, 8, 8)
    return {
        "dense_first": ([MomentOp("dense", _affine((12, 20), g), {"first": True})], (5, 20)),
        "dense": (
            [
                MomentOp("dense", _affine((24, 20), g), {"first": True}),
                MomentOp("dense", _affine((12, 24), g, spread=0.3)),
            ],
            (5, 20),
        ),
        "conv2d_first": (
            [MomentOp("conv2d", _affine((6, 2, 5, 5), g), {"first": True, "padding": 2})],
            img,
        ),
        "conv2d_stride": (
            [conv_in, MomentOp("conv2d", _affine((5, 4, 3, 3), g), {"stride": 2, "padding": 0})],
            img,
        ),
        "relu": ([conv_in, MomentOp("relu")], img),
        "maxpool2d": ([conv_in, MomentOp("maxpool2d", attrs={"kernel": 2, "stride": 2})], img),
        "maxpool2d_3x3": ([conv_in, MomentOp("maxpool2d", attrs={"kernel": 3, "stride": 2})], img),
        "maxpool2d_deterministic": (
            [
                MomentOp("maxpool2d", attrs={"kernel": 2, "stride": 2}),
                MomentOp("flatten"),
                MomentOp("dense", _affine((7, 32), g), {"first": True}),
            ],
            img,
        ),
        "avgpool2d": ([conv_in, MomentOp("avgpool2d", attrs={"kernel": 2, "stride": 2})], img),
        "batchnorm": (
            [
                conv_in,
                MomentOp(
                    "batchnorm",
                    {"scale": torch.randn(4, generator=g), "shift": torch.randn(4, generator=g)},
                ),
            ],
            img,
        ),
        "flatten": ([conv_in, MomentOp("flatten")], img),
    }


CASES = _cases()


def _compare(ops: list[MomentOp], shape: tuple[int, ...], tune: str, seed: int = 1) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    program = PFPProgram(ops)
    exe = TVMBackend().compile(program, x, TVMConfig(tune=tune))
    assert exe.describe()["path"] == "gaussian"
    mean, var = exe(x)
    with torch.no_grad():
        ref_mean, ref_var = program(x)
    assert mean.shape == ref_mean.shape and var.shape == ref_var.shape
    torch.testing.assert_close(mean, ref_mean, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(var, ref_var, rtol=RTOL, atol=ATOL)
    assert (var >= 0).all()


@pytest.mark.parametrize("tune", ["none", "default"])
@pytest.mark.parametrize("case", list(CASES))
def test_operator_matches_pytorch(case: str, tune: str) -> None:
    _compare(*CASES[case], tune)


def test_saturated_and_degenerate_inputs_stay_finite() -> None:
    """Zero variance (ReLU/max reduce to the deterministic op) and huge means: no NaN."""
    g = torch.Generator().manual_seed(3)
    ops = [
        MomentOp("conv2d", _affine((4, 2, 3, 3), g, spread=0.0), {"first": True, "padding": 1}),
        MomentOp("relu"),
        MomentOp("maxpool2d", attrs={"kernel": 2, "stride": 2}),
    ]
    x = torch.randn(2, 2, 8, 8, generator=g) * 1e4
    program = PFPProgram(ops)
    mean, var = TVMBackend().compile(program, x, TVMConfig()).__call__(x)
    ref_mean, ref_var = program(x)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    torch.testing.assert_close(mean, ref_mean, rtol=RTOL, atol=1e-2)
    torch.testing.assert_close(var, ref_var, rtol=RTOL, atol=ATOL)


def _random_posterior(net: torch.nn.Module, seed: int) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in net.named_parameters():
        tensors[f"mu.{name}"] = p.detach().clone()
        tensors[f"sigma.{name}"] = 0.05 * torch.rand(p.shape, generator=g)
    return Posterior("svi", tensors)


@pytest.mark.parametrize(
    ("model", "cfg", "shape"),
    [
        (MLP(), MLPConfig(hidden=[100, 100]), (1, 28, 28)),
        (LeNet5(), LeNet5Config(), (1, 28, 28)),
        (LeNet5(), LeNet5Config(), (1, 8, 8)),
    ],
    ids=["mlp-784-100-100-10", "lenet5-28x28", "lenet5-8x8"],
)
def test_whole_network_matches_pytorch_pfp(model, cfg, shape) -> None:
    torch.manual_seed(0)
    net = model.factory(cfg, DataSpec(shape, 10))().eval()
    mu, var = diagonal_moments(_random_posterior(net, 1), net)
    _compare(build_ops(net, mu, var), (7, *shape), "default", seed=2)


def test_batch_sizes_are_built_once_each() -> None:
    ops, shape = CASES["relu"]
    program = PFPProgram(ops)
    exe = TVMBackend().compile(program, torch.randn(*shape), TVMConfig())
    for b in (1, 4, 1, 4, 2):
        x = torch.randn(b, *shape[1:])
        mean, _ = exe(x)
        torch.testing.assert_close(mean, program(x)[0], rtol=RTOL, atol=ATOL)
    assert exe.describe()["batch_sizes_built"] == [1, 2, 3, 4]


def test_inconsistent_first_flag_is_an_error() -> None:
    g = torch.Generator().manual_seed(0)
    ops = [
        MomentOp("dense", _affine((4, 6), g), {"first": True}),
        MomentOp("dense", _affine((3, 4), g), {"first": True}),
    ]
    with pytest.raises(HarnessError, match="first=True"):
        TVMBackend().compile(PFPProgram(ops), torch.randn(2, 6), TVMConfig())

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


def _tail_program(kind: str, mean: torch.Tensor, sd: float) -> PFPProgram:
    """A first layer that passes `mean` through with variance sd^2, then ReLU or a max pool."""
    if kind == "relu":
        n = mean.shape[-1]
        first = {"mean_w": torch.eye(n), "var_w": torch.zeros(n, n)}
        first |= {"mean_b": torch.zeros(n), "var_b": torch.full((n,), sd * sd)}
        return PFPProgram([MomentOp("dense", first, {"first": True}), MomentOp("relu")])
    c = mean.shape[1]
    first = {"mean_w": torch.eye(c).reshape(c, c, 1, 1), "var_w": torch.zeros(c, c, 1, 1)}
    first |= {"mean_b": torch.zeros(c), "var_b": torch.full((c,), sd * sd)}
    pool = MomentOp("maxpool2d", attrs={"kernel": 2, "stride": 2})
    return PFPProgram([MomentOp("conv2d", first, {"first": True}), pool])


def _relu_truth(z: float, sd: float) -> tuple[float, float]:
    """ReLU moments of N(z sd, sd^2) in 60-digit arithmetic (mpmath comes with torch's sympy)."""
    import mpmath

    with mpmath.workdps(60):
        z = mpmath.mpf(z)
        cdf, pdf = mpmath.ncdf(z), mpmath.npdf(z)
        g = z * cdf + pdf
        return float(sd * g), float(sd * sd * (cdf + g * (z - g)))


def test_relu_lower_tail_is_accurate_relative_to_its_size() -> None:
    """Means 0 to 11 standard deviations below 0, where ReLU's moments shrink to 1e-30 of
    the scale. Phi from 0.5 (1 + erf) was 0 or noise below about -5.5 sd (the mean off by
    a factor 30 or more); from erfc on its own stage it keeps the relative error small.
    float32 PyTorch's PFP (harness.moments, torch.special.ndtr) is checked beside it: TVM
    must be at least as accurate wherever that is accurate, and accurate beyond it."""
    from harness import moments

    sd = 0.5
    z = -torch.linspace(0.0, 11.0, 45)
    x = (z * sd).reshape(1, -1)
    exe = TVMBackend().compile(_tail_program("relu", x, sd), x, TVMConfig())
    mean, var = exe(x)
    eager_mean, eager_var = moments.relu(x, torch.full_like(x, sd * sd))
    truth = torch.tensor([_relu_truth(float(zi), sd) for zi in x[0] / sd], dtype=torch.float64)

    def rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return ((a[0].double() - ref) / ref).abs()

    for got, eager, ref, tol in (
        (mean, eager_mean, truth[:, 0], 1e-3),
        (var, eager_var, truth[:, 1], 0.05),
    ):
        err, eager_err = rel(got, ref), rel(eager, ref)
        worst = int(err.argmax())
        assert err.max() < tol, f"relative error {err.max():.2e} at z={z[worst]:.2f}"
        good = eager_err < 1e-5  # where float32 PyTorch is accurate (near the centre)
        assert good[:4].all()
        assert (err[good] < 1e-5).all()


def test_max_pool_far_apart_inputs_are_as_accurate_as_float32_pytorch() -> None:
    """Clark's max of window elements 3 to 11 sd apart, in both orders."""
    from harness import moments

    sd = 0.5
    gap = torch.linspace(3.0, 11.0, 16) * sd * math.sqrt(2)
    x = torch.zeros(1, 2, 4, 8)
    x[0, 0, 0, 1::2] = gap[:4]
    x[0, 0, 1, 0::2] = gap[4:8]
    x[0, 1, 2, 0::2] = -gap[8:12]
    x[0, 1, 3, 1::2] = -gap[12:]
    x = x + 1.0
    exe = TVMBackend().compile(_tail_program("pool", x, sd), x, TVMConfig())
    mean, var = exe(x)
    ref_mean, ref_var = moments.maxpool2d(x.double(), torch.full_like(x, sd * sd).double(), 2, 2)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)


def test_elementwise_vectors_stay_inside_the_trailing_axes() -> None:
    """A moment stage on [N, C, H, W] with rows narrower than a vector runs its vector over
    the last two axes (H x W whole vectors), not over all axes fused: then each lane's
    index nested three divisions deep, the simplifier could not fold them into one
    contiguous load and every lane was gathered (LeNet's first ReLU at batch 100: 2.6 ms
    instead of 0.57). Values are checked above; this checks the loop structure."""
    import re

    from tvm import tirx

    from plugins.backends.tvm import lowering, schedules

    ops, shape = CASES["relu"]  # [3, 4, 8, 8]: 8-wide rows, 64 = whole vectors of 8 or 16
    mod = schedules.schedule_module(lowering.to_relax(ops, shape), 16)
    func = next(f for gv, f in mod.functions.items() if gv.name_hint == "relu")
    assert isinstance(func, tirx.PrimFunc)
    script = func.script()
    lanes = re.findall(r"for (\w+) in T\.vectorized", script)
    assert lanes
    for lane in lanes:
        leading = re.findall(rf"v_i[01] = T\.axis\.spatial\([^\n]*\b{lane}\b", script)
        assert not leading, leading


@pytest.mark.parametrize("shape", [(30, 17610), (1, 100003), (100003,)], ids=str)
def test_rows_of_no_whole_vectors_run_as_whole_vectors_then_a_short_one(shape) -> None:
    """An elementwise block whose rows are no multiple of the lanes (SWAG's weight draw,
    30 x 17,610): each row as whole 16-lane vectors and one short vector, no per-lane
    division by the row width; rows in parallel, or a single row's vectors. Values
    checked against numpy."""
    import numpy as np
    import tvm
    from tvm import s_tir, te

    from plugins.backends.tvm import schedules
    from plugins.backends.tvm.backend import host_target

    a = te.placeholder(shape, "float32", name="a")
    b = te.compute(shape, lambda *i: a(*i) * 2.0 + 1.0, name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    schedules._elementwise(sch, sch.get_sblock("b"), 16)
    script = sch.mod["main"].script()
    assert "T.vectorized(T.int64(16))" in script or "T.vectorized(16)" in script, script
    assert "T.parallel" in script and "//" not in script and "%" not in script, script
    lib = tvm.compile(sch.mod, target=host_target())
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    out = tvm.runtime.tensor(np.zeros(shape, "float32"))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), x * 2 + 1, rtol=1e-6)

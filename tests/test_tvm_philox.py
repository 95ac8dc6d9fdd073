"""backend.noise=philox: the draw kernels against Philox itself (Random123's known answers,
then a numpy Philox), their distributions, and the state a runner feeds."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from scipy import stats

from harness.api import Draw, HarnessError
from tests.philox_reference import KNOWN_ANSWERS, kernel_numbers, normals, philox, words

pytest.importorskip("tvm")

STATE = torch.tensor([0x12345678, -5, 7, 1], dtype=torch.int32)


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_the_reference_is_philox_4x32_10(counter, key, expected) -> None:
    assert [int(w) for w in philox(counter, key)[:, 0]] == list(expected)


# (1,): a tail only; (3, 5): a tail of three; (2, 8200): 4100 counters, two parallel
# chunks; (0, 5): nothing to draw
SHAPES = [(1,), (4,), (3, 5), (2, 8200), (0, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_uniform_and_bernoulli_draws_are_the_philox_words(shape) -> None:
    n = int(np.prod(shape))
    draws = [Draw("u", shape, "uniform"), Draw("b", shape, "bernoulli(0.7)")]
    # the stream is the draw's index: here 1 and 2
    u, b = kernel_numbers([draws[0], draws[0], draws[1]], STATE)[1:]
    w = words(n, 1, STATE.numpy()) >> 8
    assert np.array_equal(u.numpy().reshape(-1), w.astype(np.float32) * 2.0**-24)
    w_b = words(n, 2, STATE.numpy()) >> 8
    assert np.array_equal(b.numpy().reshape(-1), (w_b < np.ceil(0.7 * 2**24)).astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normal_draws_are_box_muller_to_float32_accuracy(shape) -> None:
    """Polynomial log, sin and cos: within a few float32 ulps of float64 Box-Muller."""
    (z,) = kernel_numbers([Draw("z", shape, "normal")], STATE)
    ref = normals(int(np.prod(shape)), 0, STATE.numpy())
    np.testing.assert_allclose(z.numpy().reshape(-1), ref, rtol=0, atol=1e-6)


def test_draws_are_distributed_as_declared() -> None:
    """Fixed state: deterministic numbers, so the thresholds cannot flake."""
    z, u, b = kernel_numbers(
        [
            Draw("z", (200_003,), "normal"),
            Draw("u", (200_003,), "uniform"),
            Draw("b", (200_003,), "bernoulli(0.3)"),
        ],
        STATE,
    )
    assert stats.kstest(z.numpy(), "norm").pvalue > 0.01
    assert stats.kstest(u.numpy(), "uniform").pvalue > 0.01
    assert abs(float(b.mean()) - 0.3) < 4 * (0.3 * 0.7 / 200_003) ** 0.5
    assert set(np.unique(b.numpy())) == {0.0, 1.0}
    # draws (streams) are independent of each other
    assert abs(np.corrcoef(z.numpy(), u.numpy())[0, 1]) < 0.01


def test_the_state_follows_torchs_seed_and_is_fresh_per_call() -> None:
    """Same seed, same state, however many calls a feed made before (building an
    executable times its calls): a board's module and this host's draw the same numbers."""
    from plugins.backends.tvm.philox import State

    a, b = State(), State()
    for _ in range(3):
        b()
    torch.manual_seed(4)
    first = a()[0]
    kept = first.clone()
    second = a()[0]
    assert torch.equal(first, kept), "a state handed out never changes under its holder"
    torch.manual_seed(4)
    assert torch.equal(b()[0], first)
    assert not torch.equal(first, second)


def test_a_module_with_draws_inside_takes_one_state() -> None:
    """main(x, *noise) becomes main(x, state), each draw a scheduled kernel of its own."""
    from tvm import tirx

    from harness.api import DataSpec
    from plugins.backends.tvm import generic, philox
    from plugins.methods.mc_dropout import DropoutSampler
    from plugins.models import MLP, MLPConfig

    net = MLP().factory(MLPConfig(hidden=[16], dropout=0.2), DataSpec((1, 6, 6), 4))()
    x = torch.randn(3, 1, 6, 6)
    mod, draws = generic.to_relax(DropoutSampler(net.eval(), 5).eval(), x)
    assert len(mod["main"].params) == 1 + len(draws)
    inside = philox.in_graph(mod, draws)
    assert [p.name for p in inside["main"].params] == ["x", "state"]
    kernels = [f for f in inside.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == len(draws) and all(f.attrs["tirx.is_scheduled"] for f in kernels)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86 assembly")
def test_draw_kernels_are_vectorised() -> None:
    """TVM 0.27's vectoriser keeps one lane of a bound variable, so the loops are left to
    LLVM's: the 64-bit products must come out as vector multiplies, and log, sin and cos
    as polynomials (no scalar libm calls)."""
    import re

    import tvm

    from plugins.backends.tvm import philox
    from plugins.backends.tvm.backend import host_target

    for dist in ("normal", "uniform"):
        kernel = philox.kernel(Draw("z", (4, 1000), dist), 0)
        lib = tvm.compile(tvm.IRModule({"main": kernel}), target=host_target())
        mod = lib.mod.imports[0] if lib.mod.imports else lib.mod
        asm = mod.inspect_source("asm")
        assert re.search(r"vpmuludq\s+.*%[yz]mm", asm), f"{dist}: Philox rounds left scalar"
        assert not re.search(r"call\w*\s+(logf|sinf|cosf|sincosf)", asm), dist


def test_noise_option_is_checked() -> None:
    from plugins.backends.tvm import TVMConfig
    from plugins.backends.tvm.backend import TVMBackend

    with pytest.raises(HarnessError, match=r"backend\.noise must be one of philox, torch"):
        TVMBackend().check(TVMConfig(noise="numpy"))

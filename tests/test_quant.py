"""Quantizers (VPQ, SPQ, JQ): grids, error bounds, memory account, programs, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn
from torch.func import functional_call

from harness import registry, runner
from harness.api import HarnessError, Posterior, QuantSpec, check_bits, fake_quant, log_quant
from plugins.methods.svi import QuantReLU, SampledWeights
from plugins.quantizers.qbnn import JQ, SPQ, VPQ, JQConfig, SPQConfig, VPQConfig, pow2_quant


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _posterior(seed: int = 0) -> Posterior:
    torch.manual_seed(seed)
    tensors = {}
    for name, p in _net().named_parameters():
        tensors[f"mu.{name}"] = p.detach().clone()
        # sigmas over four orders of magnitude, as trained SVI posteriors have them
        tensors[f"sigma.{name}"] = 10 ** torch.empty_like(p).uniform_(-5, -1)
    return Posterior("svi", tensors, {"prior_std": 1.0})


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_round_trip_within_half_a_step(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(7, 9)
    q = fake_quant(x, bits)
    step = x.abs().max() / (2 ** (bits - 1) - 1)
    assert (q - x).abs().max() <= step / 2 * (1 + 1e-5)
    assert q.unique().numel() <= 2**bits
    # per channel: each row has its own step
    qc = fake_quant(x, bits, dim=0)
    row_step = x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((qc - x).abs() <= row_step / 2 * (1 + 1e-5)).all()
    # non-negative (post-ReLU) tensors get the unsigned grid: twice as fine, b bits of codes
    r = x.relu()
    qr = fake_quant(r, bits)
    assert (qr - r).abs().max() <= r.max() / (2**bits - 1) / 2 * (1 + 1e-5)
    assert (qr >= 0).all() and qr.unique().numel() <= 2**bits
    # quantizing a quantized tensor again changes nothing
    torch.testing.assert_close(fake_quant(q, bits), q)


def test_fake_quant_edge_cases_and_straight_through_gradient() -> None:
    assert (fake_quant(torch.zeros(4), 4) == 0).all()
    assert fake_quant(torch.tensor(0.37), 3).item() == pytest.approx(0.37)
    x = torch.randn(5, requires_grad=True)
    fake_quant(x, 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5))
    # one scale per sample under vmap, as the SVI program uses it
    draws = torch.randn(4, 3, 5) * torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(4, 1, 1)
    q = fake_quant(draws, 4, dim=0)
    for s in range(4):
        torch.testing.assert_close(q[s], fake_quant(draws[s], 4))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_log_quantizer_relative_error_bounded_across_magnitudes(bits: int) -> None:
    x = torch.logspace(-8, 2, 2001)
    q = log_quant(x, bits)
    step = math.log2(1e10) / (2**bits - 2)
    rel = (q - x).abs() / x
    bound = 2 ** (step / 2) - 1
    assert rel.max() <= bound * (1 + 1e-4)
    # the bound holds in every decade, smallest values included (not just on average)
    per_decade = rel.view(-1)[:2000].view(10, 200).amax(1)
    assert (per_decade <= bound * (1 + 1e-4)).all()
    assert (q > 0).all() and q.unique().numel() <= 2**bits - 1
    if bits == 8:
        assert bound < 0.05
        # a uniform grid at the same width loses every sigma below max/255: error 100 %
        assert ((fake_quant(x, bits) - x).abs() / x)[:1000].max() == pytest.approx(1.0)


def test_log_and_pow2_keep_zeros_and_scale() -> None:
    x = torch.tensor([0.0, 1e-6, 3e-4, 0.02, 0.0, 1.0])
    for q in (log_quant(x, 3), pow2_quant(x, 3)):
        assert (q[x == 0] == 0).all() and (q[x > 0] > 0).all()
    assert (log_quant(torch.zeros(3), 4) == 0).all()
    torch.testing.assert_close(log_quant(torch.full((3,), 0.25), 2), torch.full((3,), 0.25))
    # powers of two exactly; below the 2^b - 1 code window values clamp to its bottom
    torch.testing.assert_close(
        pow2_quant(torch.tensor([1.0, 0.5, 0.3]), 4).log2().frac(), torch.zeros(3)
    )
    assert pow2_quant(torch.tensor([1.0, 1e-6]), 2)[1] == 2.0**-2


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 32, 4.0, True, "4"])
def test_bits_outside_2_to_8_are_a_clear_error(bits) -> None:
    with pytest.raises(HarnessError, match=r"quant.bits must be an integer in 2\.\.8"):
        check_bits(bits)
    with pytest.raises(HarnessError, match=r"2\.\.8"):
        VPQ().apply(_posterior(), VPQConfig(bits=bits))
    with pytest.raises(HarnessError, match=r"2\.\.8"):
        SPQ().apply(_posterior(), SPQConfig(bits=bits))
    with pytest.raises(HarnessError, match=r"2\.\.8"):
        QuantSpec.from_meta({"quant": {"bits": bits, "weights": True}})


def test_float_widths_point_to_quant_none_and_bad_scheme_lists_valid() -> None:
    with pytest.raises(HarnessError, match="quant=none"):
        check_bits(32)
    with pytest.raises(HarnessError, match="log, pow2, uniform"):
        VPQ().apply(_posterior(), VPQConfig(sigma_scheme="linear"))
    bad = _posterior()
    bad.tensors["sigma.1.bias"][0] = -1.0
    with pytest.raises(HarnessError, match="negative"):
        JQ().apply(bad, JQConfig())


def test_memory_account_exact_for_known_tensors() -> None:
    post = Posterior(
        "svi",
        {
            "mu.w": torch.randn(3, 4),
            "mu.b": torch.randn(3),
            "sigma.w": torch.rand(3, 4) + 0.1,
            "sigma.b": torch.rand(3) + 0.1,
            "steps": torch.tensor([7], dtype=torch.int64),
        },
    )
    _, acc = VPQ().apply(post, VPQConfig(bits=4, per_channel=True))
    # mu.w: 48 bits + 3 channel scales; mu.b: 12 bits -> 2 bytes + 1 scale;
    # sigma (log): codes + offset and step; int64 counter as is
    assert acc.bytes_before == 30 * 4 + 8
    assert acc.bytes_after == (6 + 12) + (2 + 4) + (6 + 8) + (2 + 8) + 8
    _, acc3 = VPQ().apply(post, VPQConfig(bits=3, per_channel=False, sigma_scheme="pow2"))
    assert acc3.bytes_after == (5 + 4) + (2 + 4) + (5 + 4) + (2 + 4) + 8  # 36 bits -> 5 bytes
    _, spq = SPQ().apply(post, SPQConfig(bits=3))
    assert spq.bytes_after == spq.bytes_before == 128


def test_vpq_grids_and_no_mutation_of_the_input() -> None:
    post = _posterior()
    original = {k: v.clone() for k, v in post.tensors.items()}
    quantized, acc = VPQ().apply(post, VPQConfig(bits=3))
    for k, v in original.items():
        assert torch.equal(post.tensors[k], v), k
    assert "quant" not in quantized.meta  # VPQ changes storage only; programs run in float
    w = quantized.tensors["mu.1.weight"]
    assert all(row.unique().numel() <= 8 for row in w)  # one 3-bit grid per output channel
    sig, ref = quantized.tensors["sigma.1.weight"], original["sigma.1.weight"]
    assert ((sig - ref).abs() / ref).max() < 2 ** (math.log2(1e4) / 6 / 2) - 1  # 4 decades, 3 bits
    assert acc.bytes_before / acc.bytes_after > 3  # tiny net: scales are a large share


def test_point_estimate_posteriors_are_quantized_uniformly() -> None:
    state = {f"net.{k}": v.detach().clone() for k, v in _net().state_dict().items()}
    post = Posterior("deterministic", state)
    vpq, acc = VPQ().apply(post, VPQConfig(bits=2, per_channel=False))
    spq, spq_acc = SPQ().apply(post, SPQConfig(bits=2))
    for k in state:
        assert vpq.tensors[k].unique().numel() <= 4, k
        torch.testing.assert_close(spq.tensors[k], vpq.tensors[k])
    assert acc.bytes_after < acc.bytes_before == spq_acc.bytes_after


def test_spq_and_jq_set_the_runtime_spec() -> None:
    post = _posterior()
    spq, _ = SPQ().apply(post, SPQConfig(bits=5))
    jq, _ = JQ().apply(post, JQConfig(bits=6))
    assert QuantSpec.from_meta(spq.meta) == QuantSpec(5, weights=True, activations=False)
    assert QuantSpec.from_meta(jq.meta) == QuantSpec(6, weights=True, activations=True)
    assert all(torch.equal(spq.tensors[k], v) for k, v in post.tensors.items())
    assert "quant" not in post.meta and spq.meta["prior_std"] == 1.0


def test_svi_program_quantizes_each_sampled_weight_per_sample() -> None:
    post, _ = SPQ().apply(_posterior(), SPQConfig(bits=3))
    x = torch.randn(4, 6)
    program, net = SampledWeights(_net(), post, 8, local_reparam=False), _net().eval()
    torch.manual_seed(1)
    out = program(x)
    torch.manual_seed(1)
    mu = {k[3:]: v for k, v in post.tensors.items() if k.startswith("mu.")}
    sig = {k[6:]: v for k, v in post.tensors.items() if k.startswith("sigma.")}
    draws = {k: mu[k] + sig[k] * torch.randn(8, *mu[k].shape) for k in mu}
    draws = {k: torch.stack([fake_quant(d, 3) for d in v]) for k, v in draws.items()}
    expected = torch.vmap(lambda p: functional_call(net, p, (x,)))(draws)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("local_reparam", [False, True])
def test_jq_program_quantizes_relu_outputs_per_row(local_reparam: bool) -> None:
    post, _ = JQ().apply(_posterior(), JQConfig(bits=2))
    program = SampledWeights(_net(), post, 5, local_reparam=local_reparam)
    relu = program.skeleton[0][2]
    assert isinstance(relu, QuantReLU)
    seen: list[torch.Tensor] = []
    relu.register_forward_hook(lambda _m, _i, out: seen.append(out))
    out = program(torch.randn(3, 6))
    assert out.shape == (5, 3, 3) and torch.isfinite(out).all()
    if local_reparam:  # no vmap: the hook sees real rows, one per (sample, input)
        [h] = seen
        assert h.shape == (15, 5) and (h >= 0).all()
        assert all(row.unique().numel() <= 4 for row in h)


def _runs(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return mlflow.search_runs(experiment_names=["bnn-harness"])


@pytest.mark.slow
def test_jq_8bit_close_to_float_end_to_end(make_cfg, tmp_path: Path) -> None:
    reg = registry.default()
    base = runner.run(make_cfg("method=svi"), reg)  # the reference's posterior: one training
    jq = runner.run(make_cfg("method=svi", "quant=jq", "quant.bits=8"), reg)
    assert jq["fit/cached"] == 1.0  # one posterior, quantized after the cache
    assert abs(jq["cls/acc"] - base["cls/acc"]) <= 0.02
    assert abs(jq["cal/nll"] - base["cal/nll"]) <= 0.05
    assert abs(jq["ood/auroc_entropy"] - base["ood/auroc_entropy"]) <= 0.03
    assert abs(jq["unc/ambiguous_aleatoric"] - base["unc/ambiguous_aleatoric"]) <= 0.05
    assert base["mem/reduction_vs_fp32"] == 1.0
    assert 3.5 < jq["mem/reduction_vs_fp32"] < 4.0  # 8 of 32 bits, plus scales
    runs = _runs(tmp_path).set_index("tags.mlflow.runName")
    assert runs.loc["svi-torch-jq8", "params.quant.bits"] == "8"
    assert runs.loc["svi-torch-jq8", "metrics.mem/param_bytes"] == jq["mem/param_bytes"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("quant=vpq", "quant.bits=16"), r"2\.\.8, got 16 \(float16/float32 is quant=none\)"),
        (("quant=jq", "quant.bits=1"), r"2\.\.8, got 1"),
        (("quant=vpq", "quant.sigma_scheme=linear"), "log, pow2, uniform"),
    ],
)
def test_bad_options_fail_before_anything_trains(make_cfg, tmp_path: Path, overrides, message):
    with pytest.raises(HarnessError, match=message):
        runner.run(make_cfg(*overrides), registry.default())
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_quantized_pfp_end_to_end(make_cfg, tmp_path: Path) -> None:
    """Moments programs honour the same spec: JQ at 8 bits ~ float, SPQ at 2 bits is not."""
    reg = registry.default()
    base = runner.run(make_cfg("method=pfp"), reg)
    jq8 = runner.run(make_cfg("method=pfp", "quant=jq", "quant.bits=8"), reg)
    spq2 = runner.run(make_cfg("method=pfp", "quant=spq", "quant.bits=2"), reg)
    assert abs(jq8["cls/acc"] - base["cls/acc"]) <= 0.02
    assert abs(jq8["ood/auroc_entropy"] - base["ood/auroc_entropy"]) <= 0.03
    assert 3.5 < jq8["mem/reduction_vs_fp32"] < 4.0 and spq2["mem/reduction_vs_fp32"] == 1.0
    assert spq2["cal/nll"] != base["cal/nll"]
    names = set(_runs(tmp_path)["tags.mlflow.runName"])
    assert {"pfp-torch", "pfp-torch-jq8", "pfp-torch-spq2"} <= names


@pytest.mark.slow
def test_quantization_aware_fine_tuning_recovers_low_bit_accuracy(make_cfg, tmp_path: Path) -> None:
    reg = registry.default()
    common = ("quant=jq", "quant.bits=2", "method.fit.epochs=3")
    plain = runner.run(make_cfg("method=svi", *common), reg)
    qat = runner.run(make_cfg("method=svi_qat", "method.base.fit.epochs=3", *common), reg)
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["svi", "svi_qat"]  # the base is plain SVI's cache entry
    assert qat["cls/acc"] > plain["cls/acc"] + 0.05
    assert qat["cal/nll"] < plain["cal/nll"]
    assert qat["mem/param_bytes"] == plain["mem/param_bytes"]


def test_qat_config_follows_the_quantizer(make_cfg) -> None:
    cfg = make_cfg("method=svi_qat", "quant=jq", "quant.bits=3", "quant.per_channel=false")
    assert (cfg.method.fit.bits, cfg.method.fit.per_channel, cfg.method.fit.activations) == (
        3,
        False,
        True,
    )
    assert cfg.method.base.name == "svi"
    with pytest.raises(HarnessError, match="svi_qat fine-tunes for a quantizer: use quant=vpq"):
        runner.run(make_cfg("method=svi_qat", "method.base.fit.epochs=1"), registry.default())

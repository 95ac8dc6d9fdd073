"""backend=tvm beyond the operator library: the generic path for every sampling method, the
random draws fed as inputs, errors, and a whole run through the runner into MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from harness import registry, runner
from harness.api import DataSpec, DrawsAsInputs, HarnessError, InferenceProgram, Posterior
from plugins.backends.tvm import TVMConfig
from plugins.backends.tvm.backend import TVMBackend
from plugins.methods.deterministic import SinglePass
from plugins.methods.ensemble import StackedEnsemble
from plugins.methods.mc_dropout import DropoutSampler
from plugins.methods.svi import SampledWeights
from plugins.models import MLP, MLPConfig

SPEC = DataSpec((1, 6, 6), 4)


def _factory():
    return MLP().factory(MLPConfig(hidden=[16], dropout=0.2), SPEC)


def _posterior(net: torch.nn.Module) -> Posterior:
    tensors = {f"mu.{k}": v.detach().clone() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": torch.full_like(v, 0.1) for k, v in net.named_parameters()}
    return Posterior("svi", tensors)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, *SPEC.input_shape, generator=torch.Generator().manual_seed(0))


def test_deterministic_and_ensemble_match_eager(x) -> None:
    torch.manual_seed(0)
    fac = _factory()
    for program in (SinglePass(fac().eval()), StackedEnsemble([fac().eval() for _ in range(3)])):
        exe = TVMBackend().compile(program, x, TVMConfig(tune="none"))
        assert exe.describe()["path"] == "generic"
        with torch.no_grad():
            torch.testing.assert_close(exe(x), program(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local_reparam", [False, True], ids=["weights", "lrt"])
def test_svi_draws_are_inputs_sampled_per_call(x, local_reparam: bool) -> None:
    """Same seed, same draws in the same order: TVM's samples equal eager PyTorch's."""
    torch.manual_seed(0)
    fac = _factory()
    program = SampledWeights(fac(), _posterior(fac()), 5, local_reparam).eval()
    exe = TVMBackend().compile(program, x, TVMConfig(tune="default"))
    torch.manual_seed(7)
    out = exe(x)
    torch.manual_seed(7)
    with torch.no_grad():
        ref = program(x)
    assert out.shape == (5, 3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exe(x), out), "the draws must change from call to call"
    assert out.std(0).mean() > 1e-3, "the samples must differ from each other"


def test_mc_dropout_masks_are_inputs_not_dropped(x) -> None:
    """TVM's frontend turns dropout into the identity; here the masks are fed in."""
    torch.manual_seed(0)
    program = DropoutSampler(_factory()().eval(), 6).eval()
    exe = TVMBackend().compile(program, x, TVMConfig(tune="none"))
    draws = program.draws(x)
    assert [d.dist for d in draws] == ["bernoulli(0.8)"] and draws[0].shape == (18, 16)
    torch.manual_seed(3)
    out = exe(x)
    torch.manual_seed(3)
    with torch.no_grad(), DrawsAsInputs([d.sample() for d in draws]):
        ref = program(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.std(0).mean() > 1e-3


class _Bad(InferenceProgram):
    kind = "samples"

    def forward(self, x):
        return torch.linalg.svd(x.flatten(1))[0].unsqueeze(0)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (TVMConfig(tune="fast"), "backend.tune must be one of none, default, metaschedule"),
        (TVMConfig(path="magic"), "backend.path must be one of auto, gaussian, generic"),
        (TVMConfig(path="gaussian"), "needs a moment program"),
        (TVMConfig(mcpu="not-a-cpu"), "not a CPU this LLVM knows"),
    ],
)
def test_config_errors(x, cfg: TVMConfig, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        TVMBackend().compile(SinglePass(_factory()().eval()), x, cfg)


def test_unsupported_program_is_a_clear_error(x) -> None:
    with pytest.raises(HarnessError, match="frontend cannot import"):
        TVMBackend().compile(_Bad(), x, TVMConfig(tune="none"))


@pytest.mark.slow
def test_pfp_run_on_tvm_logs_to_mlflow(make_cfg, tmp_path: Path) -> None:
    results = runner.run(make_cfg("method=pfp", "backend=tvm"), registry.default())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"])
    assert list(runs["status"]) == ["FINISHED"]
    assert runs.loc[0, "tags.backend"] == "tvm"
    assert runs.loc[0, "params.backend.tune"] == "default"
    assert runs.loc[0, "metrics.cls/acc"] == pytest.approx(results["cls/acc"])
    assert results["cls/acc"] > 0.5 and results["lat/b1_ms"] > 0
    client = mlflow.MlflowClient()
    info = Path(client.download_artifacts(runs.loc[0, "run_id"], "results.json", str(tmp_path)))
    backend = json.loads(info.read_text())["backend"]
    assert backend["path"] == "gaussian" and "mcpu" in backend["target"]
    assert backend["tuning"] == "default" and 1 in backend["batch_sizes_built"]

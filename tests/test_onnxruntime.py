"""backend=onnxruntime: every method's program exported to ONNX gives eager PyTorch's outputs
under the same random draws, the draws are inputs sampled per call, options are checked
before anything trains, and a whole job runs through the CLI into MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from torch import Tensor, nn

from harness import registry, runner
from harness.api import DataSpec, DrawsAsInputs, HarnessError, InferenceProgram, Posterior
from harness.training import FitConfig, state_tensors
from plugins.backends.onnxruntime import (
    OnnxRuntimeBackend,
    OnnxRuntimeConfig,
    OnnxRuntimeExecutable,
)
from plugins.datasets import DirtyDigits, DirtyDigitsConfig
from plugins.methods.deterministic import SinglePass, fit_map
from plugins.methods.ensemble import StackedEnsemble
from plugins.methods.laplace import LaplaceConfig, LaplaceMethod
from plugins.methods.linearised import Linearised, LinearisedConfig
from plugins.methods.mc_dropout import DropoutSampler
from plugins.methods.pfp import make_program
from plugins.methods.svi import SampledWeights
from plugins.methods.swag import SWAGProgram
from plugins.models import MLP, LeNet5, LeNet5Config, MLPConfig
from tests.conftest import BIN, FAST, cli_env, store_overrides

SPEC = DataSpec((1, 8, 8), 10)
BATCHES = (1, 3, 7)  # 1: the example's size; 3 and 7: sizes the export never saw


def _mlp():
    return MLP().factory(MLPConfig(hidden=[16], dropout=0.2), SPEC)


def _svi_posterior(net: nn.Module) -> Posterior:
    tensors = {f"mu.{k}": v.detach().clone() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": torch.full_like(v, 0.1) for k, v in net.named_parameters()}
    return Posterior("svi", tensors)


def _swag_posterior(net: nn.Module, rank: int = 3) -> Posterior:
    tensors = state_tensors("net", net)
    for n, p in net.named_parameters():
        tensors[f"var.{n}"] = torch.rand_like(p) * 1e-2
        tensors[f"dev.{n}"] = torch.randn(rank, *p.shape) * 0.1
    return Posterior("swag", tensors, {"snapshots": rank, "rank": rank})


def _program(name: str, factory=None) -> InferenceProgram:
    torch.manual_seed(0)
    fac = factory or _mlp()
    build = {
        "deterministic": lambda: SinglePass(fac().eval()),
        "ensemble": lambda: StackedEnsemble([fac().eval() for _ in range(3)]),
        "mc_dropout": lambda: DropoutSampler(fac().eval(), 4),
        "svi": lambda: SampledWeights(fac(), _svi_posterior(fac()), 4, False),
        "svi_lrt": lambda: SampledWeights(fac(), _svi_posterior(fac()), 4, True),
        "pfp": lambda: make_program(_svi_posterior(fac()), fac),
        "linearised": lambda: Linearised().program(_svi_posterior(fac()), fac, LinearisedConfig()),
        "swag": lambda: SWAGProgram(fac(), _swag_posterior(fac()), 4, 0.5),
    }[name]
    return build().eval()


def _outputs(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _assert_matches_eager(program: InferenceProgram, exe, shape: tuple[int, ...]) -> None:
    """The executable against the eager program fed the same draws, seed for seed."""
    for b in BATCHES:
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
        draws = program.draws(x)
        torch.manual_seed(b)
        got = _outputs(exe(x))
        torch.manual_seed(b)  # sample_draws draws in declaration order from the global RNG
        with torch.no_grad(), DrawsAsInputs([d.sample() for d in draws]):
            want = _outputs(program(x))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert isinstance(g, Tensor) and g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


PROGRAMS = [
    "deterministic",
    "ensemble",
    "mc_dropout",
    "svi",
    "svi_lrt",
    "pfp",
    "linearised",
    "swag",
]
_COMPILED: dict[str, tuple[InferenceProgram, OnnxRuntimeExecutable]] = {}


def _compiled(name: str) -> tuple[InferenceProgram, OnnxRuntimeExecutable]:
    """Each program exported once per session (an export takes seconds)."""
    if name not in _COMPILED:
        program = _program(name)
        exe = OnnxRuntimeBackend().compile(program, torch.zeros(1, *SPEC.input_shape), _cfg())
        _COMPILED[name] = program, exe
    return _COMPILED[name]


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_matches_eager_with_one_dynamic_session(name: str) -> None:
    program, exe = _compiled(name)
    _assert_matches_eager(program, exe, SPEC.input_shape)
    info = exe.describe()
    assert info["batch_axis"] == "dynamic" and info["batch_sizes_built"] == []
    sampled = name not in ("deterministic", "ensemble", "pfp", "linearised")
    assert (info["noise"] != "none") == sampled
    assert "CPUExecutionProvider" in info["target"]


@pytest.mark.parametrize("local_reparam", [False, True], ids=["weights", "lrt"])
def test_svi_draws_are_inputs_sampled_per_call(local_reparam: bool) -> None:
    _, exe = _compiled("svi_lrt" if local_reparam else "svi")
    x = torch.randn(5, *SPEC.input_shape)
    first, second = exe(x), exe(x)
    assert first.shape == (4, 5, 10)
    assert not torch.allclose(first, second), "the draws must change from call to call"
    assert first.std(0).mean() > 1e-3, "the samples must differ from each other"


def test_mc_dropout_masks_are_fed_not_dropped() -> None:
    """Exporters turn dropout into the identity; the keep masks must be graph inputs."""
    program, exe = _compiled("mc_dropout")
    x = torch.randn(3, *SPEC.input_shape)
    out = exe(x)
    assert out.std(0).mean() > 1e-3
    with torch.no_grad(), DrawsAsInputs([torch.ones(12, 16)]):
        no_dropout = program(x)
    assert not torch.allclose(out, no_dropout)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ensemble", "svi", "swag"])
def test_lenet_vmap_programs_fall_back_to_one_session_per_batch_size(name: str) -> None:
    """vmap over convolutions pins the batch in the export: static sessions, built lazily."""
    spec = DataSpec((1, 12, 12), 10)
    program = _program(name, LeNet5().factory(LeNet5Config(), spec))
    exe = OnnxRuntimeBackend().compile(program, torch.zeros(1, *spec.input_shape), _cfg())
    _assert_matches_eager(program, exe, spec.input_shape)
    info = exe.describe()
    assert info["batch_axis"] == "static"
    assert set(BATCHES) <= set(info["batch_sizes_built"])


def test_batch_axis_static_builds_per_batch_size() -> None:
    program = _program("svi_lrt")
    cfg = _cfg(batch_axis="static")
    exe = OnnxRuntimeBackend().compile(program, torch.zeros(1, *SPEC.input_shape), cfg)
    _assert_matches_eager(program, exe, SPEC.input_shape)
    assert exe.describe()["batch_axis"] == "static"
    assert exe.describe()["batch_sizes_built"] == sorted(BATCHES)


@pytest.fixture(scope="module")
def map_net():
    data = DirtyDigits().load(DirtyDigitsConfig(), 0)
    factory = MLP().factory(MLPConfig(hidden=[24, 16]), data.spec)
    torch.manual_seed(0)
    net = fit_map(factory, data, FitConfig(epochs=2))
    return data, factory, Posterior("deterministic", state_tensors("net", net))


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{}, {"pred": "nn", "samples": 5}],
    ids=["glm-probit", "nn"],
)
def test_laplace_programs_match_eager(map_net, options: dict) -> None:
    data, factory, base = map_net
    cfg = LaplaceConfig(tune="none", **options)
    program = LaplaceMethod().program(LaplaceMethod().fit(factory, data, cfg, base), factory, cfg)
    exe = OnnxRuntimeBackend().compile(program, data.test[0][:1], _cfg())
    _assert_matches_eager(program, exe, data.spec.input_shape)


@pytest.mark.slow
def test_laplace_mc_link_is_a_clear_error(map_net) -> None:
    """ONNX has no Cholesky: the exporter's own reason, in one line, from compile."""
    data, factory, base = map_net
    cfg = LaplaceConfig(tune="none", link="mc", samples=5)
    program = LaplaceMethod().program(LaplaceMethod().fit(factory, data, cfg, base), factory, cfg)
    with pytest.raises(HarnessError, match=r"ONNX exporter cannot convert.*cholesky") as err:
        OnnxRuntimeBackend().compile(program, data.test[0][:1], _cfg())
    assert "\n" not in str(err.value)


def _cfg(**options) -> OnnxRuntimeConfig:
    return OnnxRuntimeConfig(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"intra_op_threads": -1}, "backend.intra_op_threads must be >= 0"),
        ({"inter_op_threads": -3}, "backend.inter_op_threads must be >= 0"),
        ({"graph_optimization_level": "max"}, "must be one of disable, basic, extended, all"),
        ({"execution_mode": "async"}, "backend.execution_mode must be one of sequential"),
        ({"batch_axis": "dynamic"}, "backend.batch_axis must be one of auto, static"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        OnnxRuntimeBackend().compile(_program("pfp"), torch.zeros(1, 1, 8, 8), _cfg(**options))


def test_thread_settings_reach_the_session() -> None:
    cfg = _cfg(intra_op_threads=1, execution_mode="parallel", inter_op_threads=2)
    opts = OnnxRuntimeBackend()._options(cfg)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 2)
    assert str(opts.execution_mode).endswith("ORT_PARALLEL")
    exe = OnnxRuntimeBackend().compile(_program("pfp"), torch.zeros(1, 1, 8, 8), cfg)
    assert exe.describe()["threads"] == {"intra_op": 1, "inter_op": 2}


def _nothing_written(root: Path) -> None:
    cache = root / "cache"
    assert not cache.exists() or not any(cache.iterdir()), "a posterior was trained and cached"
    assert not (root / "mlflow.db").exists(), "an MLflow store (and run) was created"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backend.graph_optimization_level=max"], "must be one of disable, basic, extended"),
        (["backend.intra_op_threads=-1"], "backend.intra_op_threads must be >= 0"),
    ],
)
def test_bad_option_fails_before_training(
    make_cfg, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(HarnessError, match=message):
        runner.run(make_cfg("method=pfp", "backend=onnxruntime", *overrides), registry.default())
    _nothing_written(tmp_path)


def test_missing_onnxruntime_is_one_line_with_the_install(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # a venv without the extra
    with pytest.raises(HarnessError, match=r"needs onnxruntime: pip install 'bnn-harness\[onnx\]'"):
        runner.run(make_cfg("backend=onnxruntime"), registry.default())
    _nothing_written(tmp_path)


def test_registered_through_entry_points_with_a_schema(make_cfg) -> None:
    found = registry.build().plugins("backend")
    assert "onnxruntime" in found and "bnn-harness" in found["onnxruntime"][1]
    cfg = make_cfg("backend=onnxruntime", "backend.intra_op_threads=1")
    assert cfg.backend.name == "onnxruntime" and cfg.backend.intra_op_threads == 1
    with pytest.raises(Exception, match="intra_op_thread"):
        make_cfg("backend=onnxruntime", "backend.intra_op_thread=1")  # a typo: Hydra's error


@pytest.mark.slow
def test_pfp_job_through_the_cli_logs_to_mlflow(tmp_path: Path) -> None:
    args = [
        "run", "method=pfp", "backend=onnxruntime", "dataset=dirty_digits",
        "backend.intra_op_threads=1", *FAST, *store_overrides(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(
        [str(BIN / "bnn-harness"), *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"])
    assert list(runs["status"]) == ["FINISHED"]
    run = runs.iloc[0]
    assert run["tags.backend"] == "onnxruntime"
    assert run["params.backend.intra_op_threads"] == "1"
    assert run["metrics.cls/acc"] > 0.5 and run["metrics.lat/b1_ms"] > 0
    assert run["metrics.speedup/b4"] > 0
    client = mlflow.MlflowClient()
    info = Path(client.download_artifacts(run["run_id"], "results.json", str(tmp_path)))
    backend = json.loads(info.read_text())["backend"]
    assert backend["batch_axis"] == "dynamic" and backend["noise"] == "none"
    assert backend["threads"]["intra_op"] == 1

"""backend=tvm beyond the operator library: the generic path for every sampling method, the
random draws fed as inputs or drawn inside (Philox), errors, and a whole run through the
runner into MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from harness import registry, runner
from harness.api import (
    DataSpec,
    DrawsAsInputs,
    HarnessError,
    InferenceProgram,
    Posterior,
    sample_draws,
)
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


def _on_tvm_and_eager(program: InferenceProgram, x: torch.Tensor, seed: int, noise="torch"):
    """The compiled executable, and one call of it and of eager PyTorch with the same
    draws. noise="torch": both after the same seed. noise="philox": the module's call at a
    state from the seed, and eager fed the numbers each draw's kernel, built alone, makes
    at that state (tests/philox_reference.py checks those kernels against Philox itself)."""
    exe = TVMBackend().compile(program, x, TVMConfig(tune="default", noise=noise))
    torch.manual_seed(seed)
    if noise == "torch":
        out = exe(x)
        torch.manual_seed(seed)
        with torch.no_grad():
            ref = program(x)
        return exe, out, ref
    import tvm
    from tvm import relax

    from plugins.backends.tvm.backend import host_target
    from tests.philox_reference import kernel_numbers

    cfg = TVMConfig(noise=noise)
    built, _, got = TVMBackend().build_module(program, x, "generic", host_target(), cfg)
    assert got.in_graph and got.draws == program.draws(x)
    state = torch.randint(-(2**31), 2**31, (4,), dtype=torch.int32)
    vm = relax.VirtualMachine(built, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(state.numpy())]
    out = torch.from_dlpack(vm["main"](*args))
    with torch.no_grad(), DrawsAsInputs(kernel_numbers(got.draws, state)):
        ref = program(x)
    return exe, out, ref


def test_deterministic_and_ensemble_match_eager(x) -> None:
    torch.manual_seed(0)
    fac = _factory()
    for program in (SinglePass(fac().eval()), StackedEnsemble([fac().eval() for _ in range(3)])):
        exe = TVMBackend().compile(program, x, TVMConfig(tune="none"))
        assert exe.describe()["path"] == "generic"
        with torch.no_grad():
            torch.testing.assert_close(exe(x), program(x), rtol=1e-5, atol=1e-5)


def _lenet():
    from plugins.models import LeNet5, LeNet5Config

    return LeNet5().factory(LeNet5Config(), DataSpec((1, 12, 12), 4))


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_generic_kernels_get_the_register_tiled_schedule(model: str) -> None:
    """Every matmul/conv kernel of the generic path is ours (vector tile, row block or a
    conv's channel tile, the epilogue in the tile), none left to DLight's
    one-dot-product-per-output rule, and the numbers still match eager PyTorch:
    deterministic, and a vmapped ensemble (batched matmul with per-member weights)."""
    import tvm
    from tvm import tirx

    from plugins.backends.tvm import generic, tuning
    from plugins.backends.tvm.backend import host_target, lanes

    torch.manual_seed(0)
    fac = _factory() if model == "mlp" else _lenet()
    shape = (5, *SPEC.input_shape) if model == "mlp" else (5, 1, 12, 12)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    programs = [SinglePass(fac().eval()), StackedEnsemble([fac().eval() for _ in range(3)])]
    target = host_target()
    for program in programs:
        exe = TVMBackend().compile(program, x, TVMConfig(tune="default"))
        with torch.no_grad():
            torch.testing.assert_close(exe(x), program(x), rtol=1e-5, atol=1e-5)
        mod, _ = generic.to_relax(program, x)
        fused = tuning.dlight(mod, target, lambda m: generic.schedule_fused(m, lanes(target)))
        heavy = {
            gv.name_hint: f
            for gv, f in fused.functions.items()
            if isinstance(f, tirx.PrimFunc) and ("matmul" in gv.name_hint or "conv" in gv.name_hint)
        }
        assert len(heavy) >= 2
        if model == "lenet":  # 16 output channels: channel-vector tiles, weights repacked
            assert any("_global" in f.script() for f in heavy.values())
        for name, func in heavy.items():
            script = func.script()
            assert "T.vectorized" in script and "T.parallel" in script, name
            assert 'scope="local"' in script, f"{name}: no register accumulator tile"
        assert tvm.compile(fused, target=target) is not None


def test_layer_widths_are_padded_to_whole_vectors() -> None:
    """A 20-wide hidden layer runs as matmuls whose outputs are whole vectors (zero weight
    columns, zero rows in the next layer), and the numbers still equal eager PyTorch's:
    deterministic, a vmapped ensemble (padding carried through broadcasts) and MC dropout
    (a mask input the padding cannot reach, so the slice comes first)."""
    from tvm import relax

    from plugins.backends.tvm import generic
    from plugins.backends.tvm.backend import host_target, lanes

    width = lanes(host_target())
    torch.manual_seed(0)
    fac = MLP().factory(MLPConfig(hidden=[20, 20], dropout=0.2), SPEC)
    x = torch.randn(5, *SPEC.input_shape, generator=torch.Generator().manual_seed(1))
    programs = [
        SinglePass(fac().eval()),
        StackedEnsemble([fac().eval() for _ in range(3)]),
        DropoutSampler(fac().eval(), 4),
    ]
    for program in programs:
        mod, _ = generic.to_relax(program, x)
        padded = generic.pad_widths(mod, width)
        widths = [
            int(b.value.ty.shape[-1])
            for block in padded["main"].body.blocks
            for b in block.bindings
            if isinstance(b.value, relax.Call) and b.value.op.name == "relax.matmul"
        ]
        assert widths and widths[0] % width == 0 and widths[0] > 20, widths
        exe = TVMBackend().compile(program.eval(), x, TVMConfig(tune="default", noise="torch"))
        draws = program.draws(x)
        torch.manual_seed(9)
        out = exe(x)
        torch.manual_seed(9)
        with torch.no_grad(), DrawsAsInputs(sample_draws(draws)):
            ref = program(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _swag(fac) -> InferenceProgram:
    from plugins.methods.swag import SWAGProgram

    net = fac().eval()
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for n, p in net.named_parameters():
        tensors[f"var.{n}"] = 1e-2 * torch.rand(p.shape, generator=g)
        tensors[f"dev.{n}"] = 0.1 * torch.randn(3, *p.shape, generator=g)
    return SWAGProgram(net, Posterior("swag", tensors, {"rank": 3}), 4, 0.5)


def _linearised(fac) -> InferenceProgram:
    from harness.moments import build_ops, diagonal_moments
    from plugins.methods.linearised import LinearisedProgram

    net = fac().eval()
    mu, var = diagonal_moments(_posterior(net), net)
    return LinearisedProgram(build_ops(net, mu, var))


@pytest.mark.parametrize(
    ("make", "noise"),
    [(_swag, "torch"), (_swag, "philox"), (_linearised, "torch")],
    ids=["swag", "swag-philox", "linearised"],
)
def test_epilogues_beside_the_matmul_match_eager(x, make, noise: str) -> None:
    """SWAG's weight draw (a low-rank matmul whose epilogue reads sqrt(var) * z, computed
    beside it) and the linearised ReLU (a mask from another input in the epilogue) are
    scheduled kernels too, and their numbers match eager PyTorch with the same draws."""
    torch.manual_seed(0)
    program = make(_factory()).eval()
    _, out, ref = _on_tvm_and_eager(program, x, seed=5, noise=noise)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_linearised_lenet_imports_and_matches_eager() -> None:
    """The linearised max-pool gathers the variance at torch's argmax indices; TVM's own
    converter gave float zeros for them and the import failed (GatherElements)."""
    torch.manual_seed(0)
    program = _linearised(_lenet()).eval()
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    exe = TVMBackend().compile(program, x, TVMConfig(tune="default"))
    with torch.no_grad():
        ref = program(x)
    torch.testing.assert_close(exe(x), ref, rtol=1e-4, atol=1e-6)


class _Pool(InferenceProgram):
    kind = "samples"

    def __init__(self, kernel: int, stride: int, padding: int, ceil: bool):
        super().__init__()
        self.args = (kernel, stride, padding, 1, ceil)

    def forward(self, x):
        out, idx = torch.nn.functional.max_pool2d(x, *self.args, return_indices=True)
        return out, idx.float()


@pytest.mark.parametrize(
    "args", [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 0, True), (2, 1, 1, True)]
)
def test_max_pool_indices_are_torchs(args) -> None:
    """Indices flat per channel, the first maximum of a window winning ties (the input
    takes 3 values, so most windows tie), with padding and ceil mode."""
    x = torch.randint(0, 3, (2, 3, 7, 9), generator=torch.Generator().manual_seed(0)).float()
    program = _Pool(*args).eval()
    exe = TVMBackend().compile(program, x, TVMConfig(tune="none"))
    out, idx = exe(x)
    ref_out, ref_idx = program(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)


@pytest.mark.parametrize("noise", ["torch", "philox"])
@pytest.mark.parametrize("local_reparam", [False, True], ids=["weights", "lrt"])
def test_svi_draws_are_sampled_per_call(x, local_reparam: bool, noise: str) -> None:
    """Same draws in the same order: TVM's samples equal eager PyTorch's, whether torch
    draws them (same seed) or the module does (eager fed the same Philox numbers)."""
    torch.manual_seed(0)
    fac = _factory()
    program = SampledWeights(fac(), _posterior(fac()), 5, local_reparam).eval()
    exe, out, ref = _on_tvm_and_eager(program, x, seed=7, noise=noise)
    assert out.shape == (5, 3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exe(x), exe(x)), "the draws must change from call to call"
    assert out.std(0).mean() > 1e-3, "the samples must differ from each other"


def test_sampled_first_layer_is_one_gemm_and_every_kernel_is_scheduled(x) -> None:
    """The same x against S sampled weight matrices becomes one GEMM, W [S*N, K] @ x.T
    (no per-sample copy of x, no S narrow matmuls, no transposed copy of the weights),
    and the weight sampling kernels are tiled and vectorised instead of left as serial
    loops; values as eager."""
    from tvm import relax, tirx

    from plugins.backends.tvm import generic, tuning
    from plugins.backends.tvm.backend import host_target, lanes

    torch.manual_seed(0)
    fac = _factory()
    program = SampledWeights(fac(), _posterior(fac()), 5, False).eval()
    mod, _ = generic.to_relax(program, x)
    mod = generic.shared_input_matmuls(mod, 16)
    shapes = [
        [int(d) for d in b.value.ty.shape]
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.matmul"
    ]
    # the sampled weights as drawn ([S*N, K] rows) against x.T: 5 draws of a 16-wide
    # layer, batch 3
    assert shapes[0] == [5 * 16, 3], shapes
    target = host_target()
    fused = tuning.dlight(mod, target, lambda m: generic.schedule_fused(m, lanes(target)))
    for gv, func in fused.functions.items():
        if isinstance(func, tirx.PrimFunc):
            assert "T.parallel" in func.script(), f"{gv.name_hint} left unscheduled"
    _, out, ref = _on_tvm_and_eager(program, x, seed=3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_jq_program_imports_and_matches_eager(x) -> None:
    """JQ quantizes each sampled weight and activation with a per-slice max (torch.amax),
    which TVM's frontend cannot convert by itself."""
    fac = _factory()
    posterior = _posterior(fac())
    posterior.meta["quant"] = {"bits": 4, "weights": True, "activations": True}
    program = SampledWeights(fac(), posterior, 5, False).eval()
    _, out, ref = _on_tvm_and_eager(program, x, seed=3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_mc_dropout_masks_are_inputs_not_dropped(x) -> None:
    """TVM's frontend turns dropout into the identity; here the masks are fed in."""
    torch.manual_seed(0)
    program = DropoutSampler(_factory()().eval(), 6).eval()
    exe = TVMBackend().compile(program, x, TVMConfig(tune="none", noise="torch"))
    draws = program.draws(x)
    assert [d.dist for d in draws] == ["bernoulli(0.8)"] and draws[0].shape == (18, 16)
    torch.manual_seed(3)
    out = exe(x)
    torch.manual_seed(3)
    with torch.no_grad(), DrawsAsInputs([d.sample() for d in draws]):
        ref = program(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.std(0).mean() > 1e-3


def test_mc_dropout_masks_drawn_inside_match_eager(x) -> None:
    """With the masks drawn inside (noise=philox): eager fed the same masks agrees, the
    masks keep units at the configured rate, and they change from call to call."""
    torch.manual_seed(0)
    program = DropoutSampler(_factory()().eval(), 6).eval()
    exe, out, ref = _on_tvm_and_eager(program, x, seed=3, noise="philox")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.std(0).mean() > 1e-3
    assert not torch.allclose(exe(x), exe(x))
    assert exe.describe()["noise"].startswith("Philox")


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


# Jobs of a sweep in one process, as Hydra's basic launcher runs them: a first job that
# imports the backend (and may run TVM), then a TVM job. It prints the share of a parallel
# kernel's CPU time spent off the main thread, which is 0 when TVM runs it serially.
_SWEEP = """
import os, time
import numpy as np
import tvm
from tvm import te
from harness.isolation import job_state

cores = len(os.sched_getaffinity(0))
shape = (cores * 64, 1 << 14)
a = te.placeholder(shape, name="a")
b = te.compute(a.shape, lambda i, j: te.exp(te.sin(a[i, j]) * 0.5 + te.cos(a[i, j])), name="b")
sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
kernel = tvm.compile(sch.mod, target="llvm")["main"]
x = tvm.runtime.tensor(np.random.rand(*shape).astype("float32"))
y = tvm.runtime.tensor(np.empty(shape, "float32"))

def job(run_tvm):
    with job_state():
        import plugins.backends.tvm.backend as backend
        if run_tvm:
            backend.use_threads(cores)
            kernel(x, y)

def off_main_share():
    main, proc = time.thread_time(), time.process_time()
    for _ in range(20):
        kernel(x, y)
    main, proc = time.thread_time() - main, time.process_time() - proc
    return 1 - main / proc

job({first})
import plugins.backends.tvm.backend as backend
backend.use_threads(cores)  # the next TVM job
print(cores, off_main_share(), len(os.sched_getaffinity(0)))
"""


@pytest.mark.parametrize(
    "first_runs_tvm", [False, True], ids=["after-another-backend", "after-tvm"]
)
def test_a_tvm_job_later_in_a_sweep_gets_every_core(first_runs_tvm: bool) -> None:
    """TVM decides at each parallel launch whether to run serially, from TVM_NUM_THREADS
    (else OMP_NUM_THREADS, else half the logical CPUs) as the environment is then, and
    sizes its pool once from the same. The runner restores each job's environment, so a
    TVM job after another backend's got a pool of one thread, and every TVM job after the
    first ran serially (PFP at batch 1000 in a two-job sweep: 1.68 ms, 1.04 as the first
    job); TVM also bound the main thread to one core for the rest of the sweep."""
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to see a kernel run on more than one")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = "1"  # as `make test` runs; TVM falls back to it
    code = _SWEEP.replace("{first}", str(first_runs_tvm))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cores, share, after = done.stdout.split()
    assert after == cores, done.stdout  # the main thread still has every core
    # Two threads each doing half the work: about 0.5 off the main thread; serially, 0.
    assert float(share) > 0.25, done.stdout


def test_one_thread_is_chosen_only_where_it_measured_faster() -> None:
    import time

    from plugins.backends.tvm.backend import faster_alone

    calls = {"alone": 0}
    x = torch.zeros(1, 4)

    def sleeper(seconds: float, key: str | None = None):
        def run(_x):
            if key:
                calls[key] += 1
            time.sleep(seconds)

        return run

    assert faster_alone(sleeper(0), sleeper(0.002), x, pool_above_s=1.0)
    assert not faster_alone(sleeper(0.002), sleeper(0), x, pool_above_s=1.0)
    # a call of more than 5 ms (here 20) is the pool's without measuring the single thread
    assert not faster_alone(sleeper(0, "alone"), sleeper(0.02), x)
    assert calls["alone"] == 0


def test_threads_by_batch_says_what_each_batch_size_runs_on(x) -> None:
    import os

    program = SinglePass(_factory()().eval())
    cores = len(os.sched_getaffinity(0))
    auto = TVMBackend().compile(program, x, TVMConfig(tune="none"))
    auto(x[:1])
    chosen = auto.describe()["threads_by_batch"]
    assert sorted(chosen) == sorted({x.shape[0], 1})
    assert set(chosen.values()) <= {1, cores}
    fixed = TVMBackend().compile(program, x, TVMConfig(tune="none", threads=2))
    assert fixed.describe()["threads_by_batch"] == {x.shape[0]: 2}  # as asked, not measured

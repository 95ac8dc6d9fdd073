"""The plugin contract as the core applies it: options checked before anything trains,
compile timed by the runner, random draws declared through the API, train/eval modes
fixed by the program, and plugins that import nothing of the core but `harness.api`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import mlflow
import pluggy
import pytest
import torch
from torch import Tensor

from harness import registry, runner
from harness.api import (
    BackendBase,
    DataSpec,
    Draw,
    HarnessError,
    InferenceProgram,
    Posterior,
    WithDraws,
    sample_draws,
    with_draws,
)
from plugins.backends import TorchBackend, TorchConfig
from plugins.methods.deterministic import SinglePass
from plugins.methods.mc_dropout import DropoutSampler
from plugins.methods.svi import SampledWeights
from plugins.models import MLP, MLPConfig

ROOT = Path(__file__).resolve().parent.parent
SPEC = DataSpec((1, 6, 6), 4)


def _net() -> torch.nn.Module:
    return MLP().factory(MLPConfig(hidden=[16], dropout=0.3), SPEC)()


def _svi(samples: int = 5, local_reparam: bool = False) -> SampledWeights:
    net = _net()
    tensors = {f"mu.{k}": v.detach().clone() for k, v in net.named_parameters()}
    tensors |= {f"sigma.{k}": torch.full_like(v, 0.1) for k, v in net.named_parameters()}
    return SampledWeights(_net(), Posterior("svi", tensors), samples, local_reparam)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(3, *SPEC.input_shape, generator=torch.Generator().manual_seed(0))


# -- options are checked before anything trains ---------------------------------------------


def _nothing_written(root: Path) -> None:
    cache = root / "cache"
    assert not cache.exists() or not any(cache.iterdir()), "a posterior was trained and cached"
    assert not (root / "mlflow.db").exists(), "an MLflow store (and run) was created"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=mc_dropout", "method.samples=0"], "method.samples must be positive"),
        (["reference.method.samples=-1"], "method.samples must be positive"),
        (["timing.rounds=0"], "timing needs rounds >= 1"),
        (["method=swag", "method.schedule=step"], "not valid for swag"),
        (["method=pfp", "method.train=true", "method.fit.objective=bogus"], "not valid for pfp"),
        (["method=ensemble", "method.members=0"], "method.members must be positive"),
        (["backend=tvm", "backend.tune=fast"], "backend.tune must be one of"),
        (["backend=tvm", "backend.path=magic"], "backend.path must be one of"),
        (["backend=torch_compile", "backend.mode=fastest"], "backend.mode must be one of"),
        (["backend.threads=-2"], "backend.threads must be >= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_option_fails_before_any_training_or_run(
    make_cfg, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(HarnessError, match=message):
        runner.run(make_cfg(*overrides), registry.default())
    _nothing_written(tmp_path)


def test_missing_laplace_torch_is_one_line_before_training(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)  # what a venv without the extra has
    with pytest.raises(HarnessError, match=r"pip install 'bnn-harness\[laplace\]'"):
        runner.run(make_cfg("method=laplace"), registry.default())
    _nothing_written(tmp_path)


# -- compile is timed by the runner ---------------------------------------------------------


class _Quiet:
    """An executable that reports nothing about its compile time."""

    def __init__(self, program: InferenceProgram):
        self.program = program

    def __call__(self, x: Tensor) -> Any:
        with torch.inference_mode():
            return self.program(x)

    def describe(self) -> dict[str, Any]:
        return {"target": "cpu"}


class _QuietBackend(BackendBase):
    name = "quiet"

    def compile(self, program: InferenceProgram, example: Tensor, cfg: Any) -> _Quiet:
        exe = _Quiet(program)
        for _ in range(3):
            exe(example)
        return exe


class _QuietPlugin:
    hookimpl = pluggy.HookimplMarker("bnn_harness")

    @staticmethod
    @hookimpl
    def bnn_harness_backends() -> list:
        return [_QuietBackend()]


@pytest.mark.slow
def test_compile_time_is_logged_for_a_backend_that_does_not_report_it(
    make_cfg, tmp_path: Path
) -> None:
    reg = registry.build()
    reg.manager.register(_QuietPlugin(), name="quiet [tests]")
    cfg = make_cfg("method=deterministic", "backend.name=quiet")
    results = runner.run(cfg, reg)
    assert results["compile/seconds"] > 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert run.data.metrics["compile/seconds"] == results["compile/seconds"]


# -- random draws, declared through the API -------------------------------------------------


@pytest.mark.parametrize("local_reparam", [False, True], ids=["weights", "lrt"])
def test_draws_round_trip_through_an_exported_graph(x, local_reparam: bool) -> None:
    """Declared draws, sampled by the shared helper and fed to the (x, *noise) module,
    reproduce the eager program under the same seed; torch.export keeps them inputs."""
    torch.manual_seed(0)
    program = _svi(5, local_reparam)
    module, draws = with_draws(program, x)
    assert draws and all(d.dist == "normal" for d in draws)
    assert [d.name for d in draws] == [f"draw{i}" for i in range(len(draws))]
    torch.manual_seed(7)
    noise = sample_draws(draws)
    assert [tuple(n.shape) for n in noise] == [d.shape for d in draws]
    with torch.no_grad():
        out = module(x, *noise)
        torch.manual_seed(7)
        eager = program(x)
    torch.testing.assert_close(out, eager)
    with torch.no_grad():
        exported = torch.export.export(module, (x, *noise)).module()
        torch.testing.assert_close(exported(x, *noise), out)
        fresh = exported(x, *sample_draws(draws))
    assert not torch.allclose(fresh, out), "the graph must read its noise, not a constant"


def test_dropout_is_a_bernoulli_keep_mask(x) -> None:
    torch.manual_seed(0)
    program = DropoutSampler(_net().eval(), 6)
    module, [draw] = with_draws(program, x)
    assert draw.dist == "bernoulli(0.7)" and draw.shape == (18, 16)
    mask = Draw("m", (200_000,), draw.dist).sample()
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.7) < 0.01  # 200k draws: sd 0.001
    noise = sample_draws([draw])
    with torch.no_grad():
        exported = torch.export.export(module, (x, *noise)).module()
        torch.testing.assert_close(exported(x, *noise), module(x, *noise))
        assert not torch.allclose(exported(x, *sample_draws([draw])), module(x, *noise))


def test_draws_are_made_on_one_torch_thread(monkeypatch) -> None:
    """A parallel comparison left PyTorch's OpenMP worker spinning on the core that a
    compiled program's workers needed next (8.4 ms instead of 1.2 in TVM's kernels)."""
    seen: list[int] = []
    sample = Draw.sample

    def spy(self, generator=None, out=None):
        seen.append(torch.get_num_threads())
        return sample(self, generator, out)

    monkeypatch.setattr(Draw, "sample", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        draws = [Draw("a", (4,), "normal"), Draw("b", (4,), "bernoulli(0.5)")]
        sample_draws(draws)
        sample_draws(draws, out=[torch.empty(4), torch.empty(4)])
        assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_deterministic_program_declares_no_draws(x) -> None:
    assert SinglePass(_net().eval()).draws(x) == []


def test_unknown_distribution_is_refused() -> None:
    with pytest.raises(HarnessError, match="unknown distribution 'gamma'"):
        Draw("z", (2,), "gamma")
    with pytest.raises(HarnessError, match="unknown distribution"):
        Draw("z", (2,), "bernoulli(1.5)")


def test_draws_served_in_a_changed_order_are_refused(x) -> None:
    program = _svi(3)
    draws = program.draws(x)
    wrong = [torch.zeros(5, 5)] * len(draws)
    with pytest.raises(HarnessError, match="random draws changed"):
        WithDraws(program)(x, *wrong)


# -- train/eval modes belong to the program -------------------------------------------------


def _toggle(program: InferenceProgram) -> InferenceProgram:
    """What exporters and backends do to a module they are handed."""
    program.eval()
    program.train()
    program.train(False)
    return program.train(True)


def test_mc_dropout_keeps_sampling_after_eval_and_train(x) -> None:
    torch.manual_seed(0)
    program = _toggle(DropoutSampler(_net().eval(), 8))
    exe = TorchBackend().compile(program, x[:1], TorchConfig())
    first, second = exe(x), exe(x)
    assert first.std(0).mean() > 1e-3, "the S passes must differ"
    assert not torch.allclose(first, second), "each call must draw new masks"


def test_deterministic_stays_deterministic_after_train(x) -> None:
    torch.manual_seed(0)
    program = _toggle(SinglePass(_net().eval()))
    exe = TorchBackend().compile(program, x[:1], TorchConfig())
    torch.testing.assert_close(exe(x), exe(x), rtol=0, atol=0)
    assert program.draws(x) == [], "no dropout mask may appear after .train()"


# -- import boundaries ----------------------------------------------------------------------


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """Absolute module names imported anywhere in the file (lazy imports included)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(root).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(node.lineno, base if base.startswith("harness.api") else n) for n in names]
    return found


def _owner(module: str, root: Path) -> str:
    """The package a plugins.* module belongs to: its kind package (plugins.methods), or
    the subpackage it sits in (plugins.methods.pfp), which is a plugin of its own."""
    parts = module.split(".")
    kind = root / "plugins" / parts[1] if len(parts) > 1 else root / "plugins"
    if len(parts) > 2 and (kind / parts[2] / "__init__.py").exists():
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def boundary_violations(root: Path) -> list[str]:
    """Plugins import only `harness.api` from the core; from `plugins.` only their own kind
    package (whose top-level modules are shared within the kind) and, inside a subpackage,
    that subpackage: no plugin reaches into another kind or into another's subpackage."""
    bad = []
    for path in sorted((root / "plugins").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        own = _owner(module, root)
        kind = ".".join(module.split(".")[:2])
        for line, name in _imports(path, root):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if name.startswith("harness") and not name.startswith("harness.api"):
                bad.append(where)
            elif name.startswith("plugins."):
                target = _owner(name, root)
                if target != own and target != kind:
                    bad.append(where)
    return bad


def test_plugins_import_only_the_api_and_their_own_package() -> None:
    assert boundary_violations(ROOT) == []


def test_the_boundary_scan_sees_violations(tmp_path: Path) -> None:
    """The scan itself: a cross-kind import, a reach into a subpackage, a core module."""
    for folder in ("plugins/methods/pfp", "plugins/quantizers"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "plugins/__init__.py").write_text("")
    (tmp_path / "plugins/methods/__init__.py").write_text("")
    (tmp_path / "plugins/methods/pfp/ops.py").write_text("from harness.api import MomentOp\n")
    (tmp_path / "plugins/methods/svi.py").write_text("import plugins.methods.training\n")
    (tmp_path / "plugins/methods/lin.py").write_text("from plugins.methods.pfp import ops\n")
    (tmp_path / "plugins/quantizers/qat.py").write_text(
        "def f():\n    from plugins.methods.svi import SVI\n    from harness import runner\n"
    )
    bad = boundary_violations(tmp_path)
    assert len(bad) == 3, bad
    assert any("lin.py:1 imports plugins.methods.pfp.ops" in b for b in bad)
    assert any("qat.py:2 imports plugins.methods.svi.SVI" in b for b in bad)
    assert any("qat.py:3 imports harness.runner" in b for b in bad)


def test_draws_refilled_in_place_are_the_same_samples() -> None:
    """Buffers reused across calls (compiled executables' inputs) get the same values as
    fresh tensors under the same seed, for every distribution, and are refilled in place."""
    from harness.api import draw_buffers

    draws = [
        Draw("w", (3, 5), "normal"),
        Draw("u", (7,), "uniform"),
        Draw("m", (4, 6), "bernoulli(0.7)"),
    ]
    torch.manual_seed(5)
    fresh = sample_draws(draws)
    buffers = draw_buffers(draws)
    torch.manual_seed(5)
    refilled = sample_draws(draws, out=buffers)
    for new, ref, buf in zip(refilled, fresh, buffers, strict=True):
        assert new.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(new, ref, rtol=0, atol=0)
    assert set(refilled[2].unique().tolist()) <= {0.0, 1.0}
    again = sample_draws(draws, out=buffers)
    assert not torch.equal(again[0], fresh[0])

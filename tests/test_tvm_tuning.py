"""MetaSchedule with a tiny budget: records land in the database and a second build reads
them instead of searching again (what lets a sweep tune each workload once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.api import HarnessError, MomentOp
from plugins.backends.tvm import TVMConfig, tuning
from plugins.backends.tvm.backend import TVMBackend
from plugins.methods.pfp.program import PFPProgram


def _program(seed: int) -> PFPProgram:
    g = torch.Generator().manual_seed(seed)

    def dense(o: int, i: int, first: bool) -> MomentOp:
        tensors = {
            "mean_w": torch.randn(o, i, generator=g) / i**0.5,
            "var_w": 0.01 * torch.rand(o, i, generator=g),
            "mean_b": torch.randn(o, generator=g),
            "var_b": 0.01 * torch.rand(o, generator=g),
        }
        return MomentOp("dense", tensors, {"first": first})

    return PFPProgram([dense(16, 12, True), MomentOp("relu"), dense(4, 16, False)])


def _records(directory: Path) -> int:
    files = list(directory.rglob("database_tuning_record.json"))
    return sum(len(f.read_text().splitlines()) for f in files)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One real tuning run (the slow part), shared by the tests that read its database."""
    directory = tmp_path_factory.mktemp("tuning")
    cfg = TVMConfig(tune="metaschedule", trials=2, tuning_dir=str(directory))
    first = TVMBackend().compile(_program(0), torch.randn(3, 12), cfg)
    return directory, first.describe()


@pytest.mark.slow
def test_second_build_reads_the_database_and_does_not_tune(tuned: tuple[Path, dict]) -> None:
    tmp_path, info = tuned
    cfg = TVMConfig(tune="metaschedule", trials=2, tuning_dir=str(tmp_path))
    x = torch.randn(3, 12)
    assert info["tuned_tasks"] >= 2 and info["trials"] >= 1
    records = _records(tmp_path)
    assert records >= 1
    searched = json.loads(next(tmp_path.rglob("searched.json")).read_text())
    assert len(searched) == info["tuned_tasks"]

    # Every workload's kernel is built from its record, not left as the untuned TIR.
    assert info["applied"] == info["tasks"] >= 2

    # Other weights, same shapes: same workloads, so nothing is searched again.
    again = TVMBackend().compile(_program(1), x, cfg)
    assert again.describe()["tuned_tasks"] == 0 and again.describe()["trials"] == 0
    assert again.describe()["applied"] == again.describe()["tasks"]
    assert _records(tmp_path) == records
    mean, var = again(x)
    ref_mean, ref_var = _program(1)(x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_trial_budget_must_be_positive(tmp_path: Path) -> None:
    cfg = TVMConfig(tune="metaschedule", trials=0, tuning_dir=str(tmp_path))
    with pytest.raises(HarnessError, match=r"backend\.trials must be positive"):
        TVMBackend().compile(_program(0), torch.randn(2, 12), cfg)


@pytest.mark.slow
def test_records_change_the_built_kernels(tuned: tuple[Path, dict]) -> None:
    """The database lookup hits every fused kernel, and each hit replaces its TIR."""
    import tvm
    import tvm_ffi
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    from plugins.backends.tvm import lowering, tuning
    from plugins.backends.tvm.backend import host_target

    tmp_path, _ = tuned
    target = host_target()
    db = ms.database.JSONDatabase(work_dir=str(tuning.database_dir(tmp_path, target)))
    # as the backend lowers for MetaSchedule: mean and variance as two plain sums
    mod = lowering.to_relax(_program(0).moment_ops(), (3, 12), pair=False)
    with target:
        fused = tvm.transform.Sequential(tuning.fuse_passes())(mod)
    tuned, hits = tuning.apply_records(db, target, fused)
    kernels = [gv for gv, f in fused.functions.items() if isinstance(f, tirx.PrimFunc)]
    # a workload whose every candidate failed to build or run has no record to apply
    recorded = [gv for gv in kernels if db.has_workload(tuning._task_key(fused[gv]))]
    assert len(kernels) == 3 and hits == len(recorded) >= 2
    for gv in recorded:
        assert not tvm_ffi.structural_equal(tuned[gv].body, fused[gv].body), gv.name_hint


def test_workloads_without_a_reduction_search_a_small_population() -> None:
    """The ReLU moments' space is one point: at a population of 512 each of the five empty
    generations after the first trial took minutes. Layers with a reduction keep TVM's 512."""
    import tvm
    from tvm import tirx

    from plugins.backends.tvm import lowering
    from plugins.backends.tvm.backend import host_target

    mod = lowering.to_relax(_program(0).moment_ops(), (3, 12))
    with host_target():
        fused = tvm.transform.Sequential(tuning.fuse_passes())(mod)
    kinds = {
        gv.name_hint: tuning.spatial_only(f)
        for gv, f in fused.functions.items()
        if isinstance(f, tirx.PrimFunc)
    }
    assert sorted(kinds.values()) == [False, False, True], kinds
    assert tuning.population(300, spatial=True) == 64
    assert tuning.population(300, spatial=False) == 512
    assert tuning.population(2, spatial=False) == 64


def test_metaschedule_gets_gaussian_layers_it_can_tile() -> None:
    """MultiLevelTiling takes blocks with one output: the hand schedules' two-output
    (mean, variance) reduction left MetaSchedule a dense space of annotations alone (a
    5x slower best kernel after 244 trials); the two sums lowered for it are tiled."""
    tuning.skip_gpu_intrinsics()
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import relax_integration as ri

    from plugins.backends.tvm import lowering
    from plugins.backends.tvm.backend import host_target

    target = host_target()
    tiled = {}
    for pair in (True, False):
        mod = lowering.to_relax(_program(0).moment_ops(), (3, 12), pair=pair)
        dense = [t for t in ri.extract_tasks(mod, target) if t.task_name.startswith("dense")]
        context = ms.TuneContext(
            mod=dense[0].dispatched[0],
            target=target,
            space_generator="post-order-apply",
            task_name="dense",
            num_threads=1,
        )
        spaces = context.generate_design_space()
        tiled[pair] = sum("meta_schedule.tiling_structure" in str(s.trace) for s in spaces)
    assert tiled[True] == 0 and tiled[False] > 0, tiled


def test_sampling_programs_are_searched_but_not_their_draws() -> None:
    """The generic path's kernels are tasks (fused first: extract_tasks on the Relax
    operators found none, and tune=metaschedule built them untuned); with
    backend.noise=philox the draw kernels, written final, are not (a block-less function
    broke the population rule's look for a root block)."""
    from harness.api import DataSpec
    from plugins.backends.tvm import generic, philox
    from plugins.backends.tvm.backend import host_target
    from plugins.methods.mc_dropout import DropoutSampler
    from plugins.models import MLP, MLPConfig

    net = MLP().factory(MLPConfig(hidden=[16], dropout=0.2), DataSpec((1, 6, 6), 4))()
    mod, draws = generic.to_relax(DropoutSampler(net.eval(), 3).eval(), torch.randn(2, 1, 6, 6))
    fed = [t.task_name for t in tuning.search_tasks(mod, host_target())]
    assert any("matmul" in n for n in fed), fed
    inside = [t.task_name for t in tuning.search_tasks(philox.in_graph(mod, draws), host_target())]
    assert inside and not any(n.startswith("draw") for n in inside), inside


@pytest.mark.slow
def test_a_sampling_program_is_tuned_and_built_from_its_records(tmp_path: Path) -> None:
    """tune=metaschedule on the generic path, draws inside: the kernels are searched, the
    build applies records, a second build searches nothing, and the draws still vary."""
    from harness.api import DataSpec
    from plugins.methods.mc_dropout import DropoutSampler
    from plugins.models import MLP, MLPConfig

    net = MLP().factory(MLPConfig(hidden=[16], dropout=0.2), DataSpec((1, 6, 6), 4))()
    program, x = DropoutSampler(net.eval(), 3).eval(), torch.randn(2, 1, 6, 6)
    cfg = TVMConfig(tune="metaschedule", trials=4, tuning_dir=str(tmp_path))
    first = TVMBackend().compile(program, x, cfg).describe()
    assert first["tuned_tasks"] > 0 and first["trials"] > 0 and first["applied"] > 0, first
    exe = TVMBackend().compile(program, x, cfg)
    again = exe.describe()
    assert again["tuned_tasks"] == 0 and again["applied"] == first["applied"], again
    assert not torch.allclose(exe(x), exe(x))

"""Building a Relax module under one of three tuning modes, with a reusable MetaSchedule database.

- none: TVM's default CPU pipeline; TIR as written (LLVM vectorises what it can).
- default: hand schedules (schedules.py) for the Gaussian operators; DLight's CPU rules
  for what the PyTorch frontend produces. No search, no database.
- metaschedule: evolutionary search with a trial budget. Records go to one JSON database
  per target under `tuning_dir`; MetaSchedule keys each record by the structural hash of
  the TIR workload (shapes and code, not weight values), so a sweep over seeds, methods
  or datasets with the same layer shapes tunes each workload once and later builds only
  read the database.

Candidates are measured where the code will run: on this CPU by default, on a board over
TVM RPC for `tvm_arm` (a `Measure` with a cross-compiling export and MetaSchedule's
RPCRunner, from arm.py). Emulated measurements get a database of their own: a schedule
that is fast under qemu says nothing about a Cortex-A72.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import relax, tirx

from harness.api import HarnessError

TUNE_MODES = ("none", "default", "metaschedule")
log = logging.getLogger(__name__)


@dataclass
class BuildInfo:
    seconds: float = 0.0
    tasks: int = 0
    tuned_tasks: int = 0  # tasks searched in this build (0 when the database had them all)
    trials: int = 0  # measured candidates added to the database by this build
    database: str = ""
    applied: int = 0  # PrimFuncs built from a tuning record (metaschedule)


def check_mode(mode: str) -> None:
    if mode not in TUNE_MODES:
        raise HarnessError(f"backend.tune must be one of {', '.join(TUNE_MODES)}, got '{mode}'")


def database_dir(root: str | Path, target: tvm.target.Target, label: str = "") -> Path:
    """One database per target (and per `label`, e.g. "emulated"): records of one CPU are no
    advice for another, and timings under an emulator none for the CPU it emulates."""
    key = hashlib.sha256(json.dumps(str(target), sort_keys=True).encode()).hexdigest()[:12]
    parts = [target.kind.name, str(target.attrs.get("mtriple", "") or "")]
    parts += [str(target.attrs.get("mcpu", "") or "generic"), label, key]
    return Path(root) / "-".join(p for p in parts if p)


@dataclass
class Measurement:
    """How MetaSchedule measures the candidates of one search."""

    runner: Any  # a meta_schedule Runner; its worker pool is shut down after the search
    export: Callable[[Any], str] | None = None  # the LocalBuilder's f_export (None: TVM's)


Measure = Callable[[], AbstractContextManager[Measurement]]


@contextmanager
def measure_here() -> Iterator[Measurement]:
    """This CPU: TVM's LocalRunner on TVM's exported library."""
    from tvm.s_tir import meta_schedule as ms

    yield Measurement(ms.runner.LocalRunner())


# Tensor intrinsics of accelerators a CPU search never uses. MetaSchedule imports all of
# TVM's intrinsics in the tuner and again in every build worker, and parsing the GPU ones
# costs tens of CPU-seconds per process (minutes on a loaded machine).
GPU_INTRINSICS = ("cuda", "rocm", "hexagon", "riscv_cpu")


def skip_gpu_intrinsics() -> None:
    """Stand empty modules in for the GPU intrinsic tables (before their first import)."""
    for name in GPU_INTRINSICS:
        full = f"tvm.s_tir.tensor_intrin.{name}"
        sys.modules.setdefault(full, types.ModuleType(full))


def fuse_passes() -> list:
    """Legalize and fuse as TVM's default pipeline does: every path (DLight, task extraction,
    the build that applies records) must fuse alike, or tuned workloads never match."""
    t = relax.transform
    return [t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FoldConstant(), t.FuseOps(), t.FuseTIR()]


def dlight(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    first: Callable[[tvm.IRModule], tvm.IRModule] | None = None,
) -> tvm.IRModule:
    """Fused as the default pipeline fuses, then `first` (our schedules for the kernels it
    knows, marked scheduled), then DLight's CPU rules for the rest."""
    from tvm.s_tir import dlight as dl

    with target:
        mod = tvm.transform.Sequential(fuse_passes())(mod)
        if first is not None:
            mod = first(mod)
        return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)


def build(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    mode: str,
    *,
    schedule: Callable[[tvm.IRModule], tvm.IRModule] | None = None,
    trials: int = 64,
    tuning_dir: str | Path = "results/tvm_tuning",
    measure: Measure = measure_here,
    label: str = "",
) -> tuple[relax.VMExecutable, BuildInfo]:
    """`schedule` is the hand schedule for mode "default" (None: DLight's rules); `measure`
    and `label` (the database's) are for mode "metaschedule", entered only to search."""
    check_mode(mode)
    start = time.perf_counter()
    info = BuildInfo()
    if mode == "metaschedule":
        root = database_dir(tuning_dir, target, label)
        ex = _metaschedule(mod, target, trials, root, info, measure)
    else:
        if mode == "default":
            mod = schedule(mod) if schedule is not None else dlight(mod, target)
        ex = tvm.compile(mod, target=target)
    info.seconds = time.perf_counter() - start
    return ex, info


def population(per_task: int, spatial: bool = False) -> int:
    """The evolutionary search's population for a budget of `per_task` measurements.

    TVM's 512 suits budgets of a thousand trials on workloads with a reduction. A
    workload without one (the ReLU moments, Clark's max-pool) gets only parallel /
    vectorise annotations: a space of one or a few points, exhausted by the first trial.
    The search still runs five empty generations before it stops, and at 512 each ranked
    the whole population with the cost model: 2.5 to 4 min per generation for one ReLU
    moment workload here. At 64 the whole search of that workload took 2 min 39 s."""
    if spatial:
        return 64
    return min(512, max(64, 32 * per_task))


def spatial_only(func: tirx.PrimFunc) -> bool:
    """No block of `func` reduces (elementwise, broadcast, layout work)."""
    from tvm import s_tir

    from plugins.backends.tvm import schedules

    sch = s_tir.Schedule(func)
    return not any(schedules.reduces(sch, b) for b in sch.get_child_blocks(sch.get_sblock("root")))


def _contexts(tasks: list, logs: Path, per_task: int, workers: int) -> list:
    """relax_integration.extracted_tasks_to_tune_contexts, with a search strategy per task
    (its population depends on the workload). One call for all tasks: each call of
    MetaSchedule's logger setup replaces the handlers of the loggers set up before it."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    loggers = get_loggers_from_work_dir(str(logs), [t.task_name for t in tasks])
    out = []
    for task, logger, seed in zip(tasks, loggers, fork_seed(0, n=len(tasks)), strict=True):
        pop = population(per_task, spatial_only(task.dispatched[0]["main"]))
        context = ms.TuneContext(
            mod=task.dispatched[0],
            target=task.target,
            space_generator="post-order-apply",
            search_strategy=ms.search_strategy.EvolutionarySearch(population_size=pop),
            task_name=task.task_name,
            logger=logger,
            rand_state=seed,
            num_threads=workers,
        )
        out.append(context.clone())
    return out


def search_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """MetaSchedule's tasks: the kernels of `mod` fused as the build that applies the
    records fuses them (extract_tasks itself neither legalizes nor fuses, so the generic
    path's Relax operators gave it no task at all and `tune=metaschedule` built them
    untuned), less kernels written final (the in-graph draws, philox.py), which have no
    blocks to search."""
    from tvm.s_tir.meta_schedule import relax_integration as ri

    with target:
        fused = tvm.transform.Sequential(fuse_passes())(mod)
    plain = {
        gv: _unfused(f) if isinstance(f, tirx.PrimFunc) else f for gv, f in fused.functions.items()
    }
    return [
        t
        for t in ri.extract_tasks(tvm.IRModule(plain, attrs=fused.attrs), target)
        if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled")
    ]


def _metaschedule(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    trials: int,
    work: Path,
    info: BuildInfo,
    measure: Measure,
) -> relax.VMExecutable:
    skip_gpu_intrinsics()
    from tvm.s_tir import meta_schedule as ms

    if trials <= 0:
        raise HarnessError(f"backend.trials must be positive, got {trials}")
    work.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(work))
    tasks = search_tasks(mod, target)
    # Workloads searched before count as done even if no candidate was valid (trivial
    # copies): a later build never searches them again.
    tried_file = work / "searched.json"
    tried = set(json.loads(tried_file.read_text())) if tried_file.exists() else set()

    def key(task) -> str:
        return str(tvm_ffi.structural_hash(task.dispatched[0]))

    todo = [
        t
        for t in tasks
        if key(t) not in tried
        and db.query_tuning_record(t.dispatched[0], target, t.task_name) is None
    ]
    info.tasks, info.tuned_tasks, info.database = len(tasks), len(todo), str(work)
    if todo:
        before = len(db.get_all_tuning_records())
        print(
            f"[tvm] tuning {len(todo)}/{len(tasks)} workloads, {trials} trials, database {work}",
            file=sys.stderr,
            flush=True,
        )
        # Thread counts given explicitly: MetaSchedule's own defaults need psutil, and the
        # XGBoost cost model needs xgboost; without it the search samples at random.
        workers = os.cpu_count() or 1
        # MetaSchedule rebuilds its logging config on every call from the handlers its
        # logger holds; a handler without a name (left by a previous call under pytest's
        # log capture) crashes that rebuild, so a second tuning in one process failed.
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        for handler in list(ms_logger.handlers):
            ms_logger.removeHandler(handler)
            handler.close()
        per_task = max(1, -(-trials // len(todo)))  # every workload gets its share
        contexts = _contexts(todo, work / "logs", per_task, workers)
        with measure() as how:
            # The runner keeps a worker process (`tvm.exec.popen_worker`) until its pool is
            # shut down; left to garbage collection it outlived the command that started it.
            try:
                ms.tune.tune_tasks(
                    tasks=contexts,
                    task_weights=[t.weight for t in todo],
                    work_dir=str(work / "logs"),
                    max_trials_global=per_task * len(todo),
                    max_trials_per_task=per_task,
                    num_trials_per_iter=min(per_task, 16),
                    builder=ms.builder.LocalBuilder(
                        max_workers=workers, initializer=skip_gpu_intrinsics, f_export=how.export
                    ),
                    runner=how.runner,
                    database=db,
                    cost_model="xgb" if importlib.util.find_spec("xgboost") else "random",
                )
            finally:
                how.runner.pool.shutdown(wait=True)
        info.trials = len(db.get_all_tuning_records()) - before
        tried_file.write_text(json.dumps(sorted(tried | {key(t) for t in todo})))
        print(f"[tvm] tuning done: {info.trials} trials recorded", file=sys.stderr, flush=True)
    return _compile_with_records(db, mod, target, info)


def _task_key(func: tirx.PrimFunc) -> tvm.IRModule:
    """A fused PrimFunc as MetaSchedule stored its task: the build pipeline adds an
    `op_pattern` attribute that extracted tasks lack (with `global_symbol` "main" instead),
    and records are keyed by a structural hash that includes attributes; TVM's own
    `compile_relax` therefore finds no record and builds the untuned module."""
    return tvm.IRModule({"main": _unfused(func).with_attr("global_symbol", "main")})


def _unfused(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Without the attribute fusion adds: how tasks are extracted and records looked up."""
    return func.without_attr("op_pattern")


def apply_records(db, target: tvm.target.Target, mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Every fused PrimFunc with a record replaced by its tuned schedule; (module, hits)."""
    out, hits = {}, 0
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            sch = db.query_schedule(_task_key(func), target, gv.name_hint)
            if sch is not None:
                func = sch.mod["main"].with_attrs(
                    {"global_symbol": gv.name_hint, "tirx.is_scheduled": True}
                )
                hits += 1
        out[gv] = func
    return tvm.IRModule(out, attrs=mod.attrs), hits


def _lower_passes(target: tvm.target.Target) -> list:
    """The default pipeline's lowering for this target; compile_relax's fallback for CPU
    targets, whose backend module has no pass lists of its own in TVM 0.27."""
    from tvm.relax import pipeline

    try:
        return pipeline.dataflow_lower_passes(target) + pipeline.finalize_passes(target)
    except (ValueError, AttributeError):
        t = relax.transform
        return [
            t.RewriteDataflowReshape(),
            t.ToNonDataflow(),
            t.RemovePurityChecking(),
            t.CallTIRRewrite(),
            t.StaticPlanBlockMemory(),
            t.LowerAllocTensor(),
            t.KillAfterLastUse(),
            t.LowerRuntimeBuiltin(),
            t.ComputePrimValue(),
            t.VMShapeLower(),
            t.AttachGlobalSymbol(),
        ]


def _compile_with_records(
    db, mod: tvm.IRModule, target: tvm.target.Target, info: BuildInfo
) -> relax.VMExecutable:
    """compile_relax's pipeline (same fusion as task extraction, so the workloads match),
    with the records applied by `apply_records`; the count of hits goes to `info`."""
    from tvm.relax import pipeline

    @tvm.transform.module_pass(opt_level=3, name="ApplyTuningRecords")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            dispatch = pipeline.library_dispatch_passes(target)
        except (ValueError, AttributeError):
            dispatch = []
        mod = tvm.transform.Sequential([*dispatch, *fuse_passes()])(mod)
        mod, info.applied = apply_records(db, target, mod)
        return tvm.transform.Sequential(_lower_passes(target))(mod)

    with target, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=_pipeline)

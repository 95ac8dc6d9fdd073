"""The two TVM backends and their executable: one compiled module per batch size, cached.

Path choice: a "moments" program that describes itself as a MomentOp list is lowered
with our Gaussian operator library (lowering.py); anything else goes through
torch.export and TVM's PyTorch frontend (generic.py).

Batch size: shapes are static. The executable compiles a module the first time it
sees a batch size and keeps it, so the harness's evaluation chunks, its last smaller
chunk and each timing batch size cost one build each (well under a second for the
seed's networks untuned; tuned builds read the MetaSchedule database). A symbolic batch
would save those builds but MetaSchedule does not tune symbolic shapes, and static
bounds let the schedules split loops without tails.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.api import (
    BackendBase,
    Draw,
    HarnessError,
    InferenceProgram,
    draw_buffers,
    sample_draws,
)
from plugins.backends.tvm import TVMArmConfig, TVMConfig, philox

PATHS = ("auto", "gaussian", "generic")
NOISE = ("philox", "torch")
Runner = Callable[[Tensor], Any]
Feed = Callable[[], list[Tensor]]


@dataclass
class Noise:
    """What a built module takes after x: the program's draws (sampled by PyTorch per
    call) or, drawn inside it (philox.in_graph), one Philox state."""

    draws: list[Draw]
    in_graph: bool = False

    def feed(self) -> Feed:
        """The inputs of one call after x, fresh per call. Runners called one after another
        may share a feed: the draws' buffers are refilled only after the previous call has
        returned (SVI's MLP: 36 MB)."""
        if self.in_graph:
            return philox.State()
        buffers = draw_buffers(self.draws)
        return lambda: sample_draws(self.draws, out=buffers)

    def describe(self) -> str:
        if not self.draws:
            return "none"
        if self.in_graph:
            return "Philox-4x32-10 inside the compiled module, per call"
        return "sampled by torch per call, fed as inputs"


def host_target(mcpu: str = ""):
    """LLVM's own name for this CPU (e.g. znver5): the bundled LLVM refuses "native"."""
    import tvm
    from tvm.target import codegen

    cpu = mcpu or codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
        raise HarnessError(f"backend.mcpu '{cpu}' is not a CPU this LLVM knows")
    # num-cores: MetaSchedule sizes its parallel loops by it and refuses a target without it
    cores = available_cores()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": cores})


def lanes(target) -> int:
    """float32 lanes of the target's vector registers (AVX-512: 16, AVX2: 8, NEON: 4).

    From the target's features, not `llvm_get_vector_width`: that says 512 bits for every
    x86 CPU, and 16-lane tiles on an AVX2 CPU split into 8+2 lanes with shuffles and spills.
    """
    from tvm.target import codegen

    if codegen.target_has_features("avx512f", target):
        return 16
    if codegen.target_has_features("avx2", target) or codegen.target_has_features("avx", target):
        return 8
    return 4  # NEON, SSE and anything else with 128-bit vectors


# TVM's ThreadGroup::kSpecifyThreadShareAllCore: workers may run on any core in the list.
SHARE_ALL_CORES = -3


def cores_here() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0)) or [0]
    return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    return len(cores_here())


# TVM's thread settings are thread-local, so is the record of what this thread set.
_threads_now = threading.local()


def thread_count(cfg: TVMConfig) -> int:
    if cfg.threads < 0:
        raise HarnessError(f"backend.threads must be 0 (all cores) or positive, got {cfg.threads}")
    return cfg.threads or available_cores()


def use_threads(n: int) -> None:
    """n workers for TVM's kernels called from this thread (a no-op when it has them).

    TVM decides per parallel launch whether to run serially, from TVM_NUM_THREADS (else
    OMP_NUM_THREADS, else half the logical CPUs) read at that moment, unless the calling
    thread has configured its pool with an explicit CPU list; and it sizes the pool once,
    on first use, from the same number. Setting the variable was not enough: the runner
    restores each job's environment, so in a sweep every TVM job after the first ran its
    kernels on one thread (PFP at batch 1000: 1.68 ms against 1.04 as the first job). The
    CPU list, this process's cores shared by all workers, fixes both for the thread's
    lifetime, whatever the environment says later.
    """
    import tvm

    if getattr(_threads_now, "n", 0) != n:
        cores = [str(c) for c in cores_here()]
        tvm.get_global_func("runtime.config_threadpool")(SHARE_ALL_CORES, n, cores)
        _threads_now.n = n


def to_torch(out: Any) -> Any:
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return torch.from_numpy(out.numpy())
    return tuple(to_torch(o) for o in out)


def choose_path(program: InferenceProgram, requested: str) -> str:
    if requested not in PATHS:
        raise HarnessError(f"backend.path must be one of {', '.join(PATHS)}, got '{requested}'")
    has_ops = program.kind == "moments" and program.moment_ops() is not None
    if requested == "gaussian" and not has_ops:
        raise HarnessError(
            "backend.path=gaussian needs a moment program with moment_ops() (e.g. method=pfp)"
        )
    if requested == "auto":
        return "gaussian" if has_ops else "generic"
    return requested


class TVMExecutable:
    """Calls the module built for x's batch size, building it on first sight."""

    def __init__(self, build_for: Callable[[Tensor], Runner], info: dict[str, Any]):
        self._build_for, self._runners, self.info = build_for, {}, info
        self.info.setdefault("compile_s", 0.0)
        self.info.setdefault("trials", 0)
        self.info.setdefault("tuned_tasks", 0)
        self.info.setdefault("tasks", 0)  # metaschedule: workloads in the builds
        self.info.setdefault("applied", 0)  # metaschedule: kernels built from a record

    def __call__(self, x: Tensor) -> Any:
        run = self._runners.get(x.shape[0])
        if run is None:
            start = time.perf_counter()
            run = self._runners[x.shape[0]] = self._build_for(x)
            self.info["compile_s"] += time.perf_counter() - start
        return run(x)

    def describe(self) -> dict[str, Any]:
        return self.info | {"batch_sizes_built": sorted(self._runners)}


class TVMBackend(BackendBase):
    name = "tvm"

    def check(self, cfg: TVMConfig) -> None:
        """Options, before anything trains; the target (mcpu) is checked when it is built."""
        if importlib.util.find_spec("tvm") is None:
            raise HarnessError(f"backend={self.name} needs TVM: pip install 'bnn-harness[tvm]'")
        from plugins.backends.tvm import tuning

        if cfg.path not in PATHS:
            raise HarnessError(f"backend.path must be one of {', '.join(PATHS)}, got '{cfg.path}'")
        tuning.check_mode(cfg.tune)
        if cfg.noise not in NOISE:
            raise HarnessError(
                f"backend.noise must be one of {', '.join(NOISE)}, got '{cfg.noise}'"
            )
        if cfg.trials < 0:
            raise HarnessError(f"backend.trials must be >= 0, got {cfg.trials}")
        thread_count(cfg)

    def target(self, cfg: TVMConfig):
        return host_target(cfg.mcpu)

    def compile(self, program: InferenceProgram, example: Tensor, cfg: TVMConfig) -> TVMExecutable:
        from plugins.backends.tvm import tuning

        tuning.check_mode(cfg.tune)
        path = choose_path(program, cfg.path)
        target = self.target(cfg)
        program = program.eval()
        info: dict[str, Any] = {
            "target": str(target),
            "tuning": cfg.tune,
            "path": path,
            "threads": thread_count(cfg),
            "lanes": lanes(target),
        }
        exe = TVMExecutable(lambda x: self._build(program, x, path, target, cfg, info), info)
        exe(example)  # build the example's batch size now: fail here, not mid-evaluation
        return exe

    def _module(self, program: InferenceProgram, x: Tensor, path: str, target, cfg: TVMConfig):
        """The Relax module, its hand schedule (or None) and its noise inputs."""
        from plugins.backends.tvm import generic, lowering, schedules, tuning

        width = lanes(target)
        if path == "gaussian":
            pair = cfg.tune != "metaschedule"  # its tiling rule takes one-output blocks
            mod = lowering.to_relax(program.moment_ops(), tuple(x.shape), pad_to=width, pair=pair)
            return mod, (lambda m: schedules.schedule_module(m, width)), Noise([])
        mod, draws = generic.to_relax(program, x)
        mod = generic.pad_widths(generic.shared_input_matmuls(mod, width), width)
        noise = Noise(draws, in_graph=cfg.noise == "philox" and bool(draws))
        if noise.in_graph:
            mod = philox.in_graph(mod, draws)
        first = lambda m: generic.schedule_fused(m, width)  # noqa: E731
        return mod, (lambda m: tuning.dlight(m, target, first)), noise

    def build_module(self, program: InferenceProgram, x: Tensor, path: str, target, cfg):
        """(executable, tuning.BuildInfo, Noise) at x's batch size: what compile and export
        both build."""
        from plugins.backends.tvm import tuning

        mod, schedule, noise = self._module(program, x, path, target, cfg)
        ex, built = tuning.build(
            mod,
            target,
            cfg.tune,
            schedule=schedule,
            trials=cfg.trials,
            tuning_dir=cfg.tuning_dir,
            **self.measured_on(cfg),
        )
        return ex, built, noise

    def _build(
        self, program: InferenceProgram, x: Tensor, path: str, target, cfg: TVMConfig, info
    ) -> Runner:
        ex, built, noise = self.build_module(program, x, path, target, cfg)
        info["noise"] = noise.describe()
        info["trials"] += built.trials
        info["tuned_tasks"] += built.tuned_tasks
        info["tasks"] += built.tasks
        info["applied"] += built.applied
        if built.database:
            info["database"] = built.database
        return self.runner(ex, noise, cfg, info, x)

    def measured_on(self, cfg: TVMConfig) -> dict[str, Any]:
        """tuning.build's `measure` and database `label`: MetaSchedule times candidates on
        the CPU that runs them (here: the defaults, this CPU)."""
        return {}

    def export(
        self, program: InferenceProgram, example: Tensor, cfg: TVMConfig, out: Path
    ) -> dict[str, Any]:
        """Deployable artefact (Backend.export): this host's library and a numpy+TVM runner."""
        from plugins.backends.tvm import export

        ex, noise, target = export.build(self, program, example, cfg)
        return export.write(ex, noise, target, Path(out), None)

    def runner(self, ex, noise: Noise, cfg: TVMConfig, info, x: Tensor) -> Runner:
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(ex, tvm.cpu())
        feed = noise.feed()  # one for both thread counts tried

        def on(n: int) -> Runner:
            return _runner(vm["main"], feed, _share, lambda: use_threads(n), _shared)

        threads = thread_count(cfg)
        run = on(threads)
        if cfg.threads == 0 and threads > 1:
            alone = on(1)
            if faster_alone(alone, run, x):
                run, threads = alone, 1
        info.setdefault("threads_by_batch", {})[int(x.shape[0])] = threads
        return run


def faster_alone(alone: Runner, pooled: Runner, x: Tensor, pool_above_s: float = 5e-3) -> bool:
    """Whether one thread runs x's batch faster than the pool. At small batches waking and
    joining the workers costs more than they save (PFP's 8x8 MLP at batch 1: 0.019 ms on
    one thread, 0.029 on two); where the two cross depends on the CPU, so it is measured:
    blocks of about a millisecond, interleaved, median of seven each. Work of more than
    `pool_above_s` a call is left to the pool without measuring."""
    start = time.perf_counter()
    pooled(x)
    call_s = time.perf_counter() - start
    if call_s > pool_above_s:
        return False
    alone(x)
    calls = max(1, int(1e-3 / max(call_s, 1e-6)))
    blocks: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(7):
        for key, run in enumerate((alone, pooled)):
            start = time.perf_counter()
            for _ in range(calls):
                run(x)
            blocks[key].append(time.perf_counter() - start)
    return statistics.median(blocks[0]) < statistics.median(blocks[1])


def _share(t: Tensor) -> Any:
    """A torch tensor as a TVM tensor without a copy (DLPack). Copies through numpy cost
    about 35 us per input and 16 us per output here, more than a whole PFP MLP at batch 1.
    TVM's kernels assume 64-byte aligned buffers; a view into a batch may start anywhere."""
    import tvm

    t = t.detach().contiguous()
    if t.data_ptr() % 64:
        t = t.clone()
    return tvm.runtime.from_dlpack(t)


def _shared(out: Any) -> Any:
    """The VM's outputs (fresh buffers per call) as torch tensors, without a copy."""
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return torch.from_dlpack(out)
    return tuple(_shared(o) for o in out)


def _runner(
    fn, feed: Feed, put, before: Callable[[], None] | None = None, out: Callable = to_torch
) -> Runner:
    """Fresh noise per call (inside the timed call), then the compiled function.

    feed: Noise.feed's; put: a torch tensor to the function's device; out: its outputs
    back to torch."""

    def run(x: Tensor) -> Any:
        if before is not None:
            before()
        args = [put(x)] + [put(noise) for noise in feed()]
        return out(fn(*args))

    return run


class TVMArmBackend(TVMBackend):
    name = "tvm_arm"
    _close: Callable[[], None] | None = None  # the open session's, while one is open

    def target(self, cfg: TVMArmConfig):
        from plugins.backends.tvm import arm

        return arm.target(cfg.mcpu, cfg.cores)

    def export(
        self, program: InferenceProgram, example: Tensor, cfg: TVMArmConfig, out: Path
    ) -> dict[str, Any]:
        """The aarch64 library for the example's batch size and its runner; no board needed."""
        from plugins.backends.tvm import arm, export

        arm.check_compiler(cfg.cc)
        ex, noise, target = export.build(self, program, example, cfg)
        return export.write(ex, noise, target, Path(out), cfg.cc)

    def compile(
        self, program: InferenceProgram, example: Tensor, cfg: TVMArmConfig
    ) -> TVMExecutable:
        from plugins.backends.tvm import arm

        # One session per executable; a server serves one session at a time, so the
        # previous executable of this backend is closed before the next one connects.
        if self._close is not None:
            self._close()
        session = self.session = arm.connect(cfg)
        try:
            exe = super().compile(program, example, cfg)
        except BaseException:
            session.close()
            raise
        exe.info |= session.describe()

        def close() -> None:
            exe._runners.clear()  # the remote VMs hold the session open
            session.close()
            self._close = None
            if self.session is session:
                self.session = None

        exe.close = self._close = close
        return exe

    def release(self, executable: TVMExecutable) -> None:
        """The board's session, closed at the end of the job (see BackendBase.release)."""
        if self._close is not None and executable.close is self._close:
            self._close()

    def measured_on(self, cfg: TVMArmConfig) -> dict[str, Any]:
        """Candidates timed on the board by MetaSchedule's RPCRunner, with the executable's
        session released meanwhile (a server serves one at a time); emulated timings go to
        a database of their own. Only a search connects: builds from records need no board."""
        from plugins.backends.tvm import arm

        if cfg.tune != "metaschedule":
            return {}
        session = getattr(self, "session", None)
        if session is not None:
            emulated, release = session.device == "emulated", session.release
        else:  # export: ask the server what it is, if there is one
            emulated, release = cfg.emulated, None
            try:
                probe = arm.connect(cfg)
                emulated = probe.device == "emulated"
                probe.close()
            except HarnessError:
                pass
        return {
            "measure": arm.measure(cfg, emulated, release),
            "label": "emulated" if emulated else "",
        }

    def runner(self, ex, noise: Noise, cfg: TVMArmConfig, info, x: Tensor) -> Runner:
        fn, put = self.session.load(ex)
        return _runner(fn, noise.feed(), lambda t: put(t.detach().contiguous().numpy()))

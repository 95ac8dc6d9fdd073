"""backend=onnxruntime: the program exported to ONNX and run by ONNX Runtime's CPU provider.

The runtime a deployer picks when the model has to leave PyTorch, so it is the baseline a
compiler like TVM has to beat. The export is `torch.onnx.export(..., dynamo=True)` (the
torch.export based exporter, through onnxscript): the TorchScript exporter cannot trace
`torch.vmap`/`functional_call` (ensembles, SVI, SWAG) nor PFP's normal CDF, this one
converts every built-in program.

Random draws: exporters freeze `randn` into a constant and drop dropout, so the
program's declared draws (`InferenceProgram.draws`) become graph inputs through the API's
`with_draws`, as on TVM's generic path, and every call samples them with torch and feeds
them in. The sampling is inside the call, so its cost is in every timing.

Batch axis: the export keeps the batch dimension symbolic where torch.export can (one
session for every batch size; a draw whose size grows with the batch, like a dropout mask
over S x B rows, gets the matching derived dimension). Programs whose trace pins the
batch (vmap over convolutions) get one static session per batch size, built on first use
and cached, like the TVM backend's builds; `describe()["batch_axis"]` says which.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy
import torch
from torch import Tensor

from harness.api import (
    BackendBase,
    ConfigSchema,
    Draw,
    HarnessError,
    InferenceProgram,
    draw_buffers,
    sample_draws,
    with_draws,
)

hookimpl = pluggy.HookimplMarker("bnn_harness")

LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
BATCH_AXES = ("auto", "static")
REQUIRES = ("onnxruntime", "onnx", "onnxscript")
PROVIDER = "CPUExecutionProvider"
INSTALL = "pip install 'bnn-harness[onnx]'"
TRACE_BATCH = 2  # torch.export pins size-1 dimensions, so the dynamic export traces two rows


@dataclass
class OnnxRuntimeConfig:
    name: str = "onnxruntime"
    intra_op_threads: int = 0  # 0: ONNX Runtime's default, one per physical core
    inter_op_threads: int = 0  # 0: default; used by execution_mode=parallel only
    graph_optimization_level: str = "all"  # disable, basic, extended, all
    execution_mode: str = "sequential"  # sequential, parallel (independent branches at once)
    # false: idle worker threads sleep instead of spinning, which leaves the cores to
    # whatever runs beside (the interleaved reference) at a small cost in latency
    allow_spinning: bool = True
    batch_axis: str = "auto"  # auto: one dynamic-batch session where possible; static: per size


Session = Callable[[dict[str, Any]], list[Any]]


@dataclass
class _Built:
    """A session and the draws it takes, as a function of the batch size."""

    run: Session
    draws: Callable[[int], list[Draw]]


class OnnxRuntimeExecutable:
    """Samples the draws, feeds them with x, returns the outputs as torch tensors."""

    def __init__(self, kind: str, build_for: Callable[[int], _Built], info: dict[str, Any]):
        self.kind, self._build_for, self.info = kind, build_for, info
        self._dynamic: _Built | None = None
        self._static: dict[int, _Built] = {}
        self._buffers: dict[int, list[Tensor]] = {}  # noise refilled per call, per batch size

    def _session(self, batch: int) -> tuple[_Built, list[Draw]]:
        built = self._dynamic or self._static.get(batch)
        if built is None:
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # tracing draws: keep the caller's stream
                built = self._static[batch] = self._build_for(batch)
            self.info["compile_s"] += time.perf_counter() - start
        return built, built.draws(batch)

    def __call__(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        built, draws = self._session(x.shape[0])
        feed = {"x": x.detach().to(torch.float32).contiguous().numpy()}
        buffers = self._buffers.get(x.shape[0])
        if buffers is None:
            buffers = self._buffers[x.shape[0]] = draw_buffers(draws)
        for draw, noise in zip(draws, sample_draws(draws, out=buffers), strict=True):
            feed[draw.name] = noise.numpy()
        outs = [torch.from_numpy(o) for o in built.run(feed)]
        return outs[0] if self.kind == "samples" else (outs[0], outs[1])

    def describe(self) -> dict[str, Any]:
        built = [] if self._dynamic else sorted(self._static)
        return self.info | {"batch_sizes_built": built}


def _reason(err: Exception) -> str:
    """The line of an exporter error that names the problem (its summary's innermost one)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    causes = [ln for ln in lines if ln.startswith("<class '")]
    line = causes[0] if causes else (lines[0] if lines else "")
    if line.startswith("<class '"):
        name, _, rest = line.partition(">:")
        line = f"{name.rsplit('.', 1)[-1].rstrip(chr(39))}: {rest.strip()}"
    return f"{type(err).__name__}: {line}"[:400]


def _quiet_exporter() -> Any:
    """The exporter logs a warning per torchvision operator it cannot register; mute them."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    return logger, level


def export_onnx(
    module: torch.nn.Module,
    args: tuple[Tensor, ...],
    names: list[str],
    outputs: list[str],
    dynamic_shapes: Any = None,
) -> bytes:
    """The serialized ONNX model of `module(*args)`; a HarnessError naming what failed."""
    logger, level = _quiet_exporter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                module,
                args,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except HarnessError:
        raise
    except Exception as err:  # the exporter's own errors name the unsupported operator
        raise HarnessError(
            f"the ONNX exporter cannot convert this program: {_reason(err)}"
        ) from err
    finally:
        logger.setLevel(level)
    return onnx_program.model_proto.SerializeToString()


def _batch_linear(a: list[Draw], b: list[Draw]) -> list[tuple[tuple[int, ...], ...]] | None:
    """Per draw and dimension (k, c) with size = k * batch + c, from the draws at batch
    TRACE_BATCH and TRACE_BATCH + 1; None if they are not the same draws."""
    if len(a) != len(b):
        return None
    out = []
    for da, db in zip(a, b, strict=True):
        if (da.name, da.dist, len(da.shape)) != (db.name, db.dist, len(db.shape)):
            return None
        steps = [sb - sa for sa, sb in zip(da.shape, db.shape, strict=True)]
        dims = tuple((k, sa - TRACE_BATCH * k) for k, sa in zip(steps, da.shape, strict=True))
        if any(k < 0 for k, _ in dims):
            return None
        out.append(dims)
    return out


def _draws_at(
    template: list[Draw], linear: list[tuple[tuple[int, ...], ...]]
) -> Callable[[int], list[Draw]]:
    @functools.cache  # per batch size: the call path builds no Draw objects
    def at(batch: int) -> list[Draw]:
        return [
            Draw(d.name, tuple(k * batch + c for k, c in dims), d.dist)
            for d, dims in zip(template, linear, strict=True)
        ]

    return at


def _dynamic_shapes(linear: list[tuple[tuple[int, ...], ...]]) -> Any:
    batch = torch.export.Dim("batch")

    def dim(k: int, c: int) -> Any:
        expr = batch if k == 1 else batch * k
        return expr if c == 0 else expr + c

    noise = tuple({i: dim(k, c) for i, (k, c) in enumerate(dims) if k} for dims in linear)
    return ({0: batch}, noise) if noise else ({0: batch},)


class OnnxRuntimeBackend(BackendBase):
    name = "onnxruntime"

    def check(self, cfg: OnnxRuntimeConfig) -> None:
        missing = [m for m in REQUIRES if importlib.util.find_spec(m) is None]
        if missing:
            raise HarnessError(f"backend={self.name} needs {', '.join(missing)}: {INSTALL}")
        for key in ("intra_op_threads", "inter_op_threads"):
            if getattr(cfg, key) < 0:
                raise HarnessError(
                    f"backend.{key} must be >= 0 (0: default), got {getattr(cfg, key)}"
                )
        for key, valid in (
            ("graph_optimization_level", LEVELS),
            ("execution_mode", MODES),
            ("batch_axis", BATCH_AXES),
        ):
            if getattr(cfg, key) not in valid:
                raise HarnessError(
                    f"backend.{key} must be one of {', '.join(valid)}, got '{getattr(cfg, key)}'"
                )

    def _options(self, cfg: OnnxRuntimeConfig) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.intra_op_threads
        opts.inter_op_num_threads = cfg.inter_op_threads
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, LEVELS[cfg.graph_optimization_level]
        )
        opts.execution_mode = getattr(ort.ExecutionMode, MODES[cfg.execution_mode])
        spin = "1" if cfg.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.log_severity_level = 3  # errors only: the harness reports its own
        return opts

    def _session(self, model: bytes, cfg: OnnxRuntimeConfig) -> Any:
        import onnxruntime as ort

        if PROVIDER not in ort.get_available_providers():
            raise HarnessError(f"this onnxruntime build has no {PROVIDER}: {INSTALL}")
        try:
            return ort.InferenceSession(model, self._options(cfg), providers=[PROVIDER])
        except Exception as err:  # an operator the runtime lacks at this opset
            raise HarnessError(f"ONNX Runtime cannot load the exported program: {err}") from err

    def compile(
        self, program: InferenceProgram, example: Tensor, cfg: OnnxRuntimeConfig
    ) -> OnnxRuntimeExecutable:
        self.check(cfg)
        import onnxruntime as ort

        program = program.eval()
        outputs = ["mean", "var"] if program.kind == "moments" else ["logits"]
        info: dict[str, Any] = {
            "target": f"cpu (onnxruntime {ort.__version__}, {PROVIDER})",
            "tuning": f"graph_optimization_level={cfg.graph_optimization_level}",
            "exporter": "torch.onnx.export(dynamo=True)",
            "threads": {"intra_op": cfg.intra_op_threads, "inter_op": cfg.inter_op_threads},
            "execution_mode": cfg.execution_mode,
            "compile_s": 0.0,
        }

        def static(batch: int) -> _Built:
            x = _rows(example, batch)
            module, draws = with_draws(program, x)
            names = ["x"] + [d.name for d in draws]
            model = export_onnx(module, (x, *sample_draws(draws)), names, outputs)
            return _Built(_runner(self._session(model, cfg), outputs), lambda _: draws)

        exe = OnnxRuntimeExecutable(program.kind, static, info)
        start = time.perf_counter()
        if cfg.batch_axis == "auto":
            with torch.random.fork_rng(devices=[]):
                exe._dynamic = self._dynamic(program, example, outputs, cfg, exe._static)
        info["batch_axis"] = "dynamic" if exe._dynamic else "static"
        info["compile_s"] = time.perf_counter() - start
        exe(example)  # build (static) and run the example now: fail here, not mid-evaluation
        sampled = bool(program.draws(example))
        info["noise"] = "sampled by torch per call, fed as inputs" if sampled else "none"
        return exe

    def _dynamic(
        self,
        program: InferenceProgram,
        example: Tensor,
        outputs: list[str],
        cfg: OnnxRuntimeConfig,
        static: dict[int, _Built],
    ) -> _Built | None:
        """One session for every batch size, or None where the export pins the batch (then
        the session traced at TRACE_BATCH is kept as that size's static one)."""
        rows = [_rows(example, n) for n in (TRACE_BATCH, TRACE_BATCH + 1)]
        module, draws = with_draws(program, rows[0])
        linear = _batch_linear(draws, program.draws(rows[1]))
        if linear is None:
            return None
        names = ["x"] + [d.name for d in draws]
        args = (rows[0], *sample_draws(draws))
        try:
            model = export_onnx(module, args, names, outputs, _dynamic_shapes(linear))
        except HarnessError:
            return None  # a constraint torch.export could not prove: static sessions instead
        session = self._session(model, cfg)
        built = _Built(_runner(session, outputs), _draws_at(draws, linear))
        if isinstance(session.get_inputs()[0].shape[0], str):
            return built
        static[TRACE_BATCH] = _Built(built.run, lambda _: draws)
        return None


def _rows(example: Tensor, batch: int) -> Tensor:
    return example[:1].expand(batch, *example.shape[1:]).contiguous()


def _runner(session: Any, outputs: list[str]) -> Session:
    return lambda feed: session.run(outputs, feed)


@hookimpl
def bnn_harness_backends() -> list:
    return [OnnxRuntimeBackend()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("backend", "onnxruntime_schema", OnnxRuntimeConfig)]

"""`torch.compile` of the program: what a PyTorch user would try before reaching for TVM.

Inductor specialises on the first batch size and recompiles (or goes dynamic) for new
ones; `dynamic` picks that policy. Compilation is lazy, so `compile` runs the example
once and times that as the compile cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pluggy
import torch
from torch import Tensor

from harness.api import BackendBase, ConfigSchema, HarnessError, InferenceProgram

hookimpl = pluggy.HookimplMarker("bnn_harness")

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DYNAMIC = ("auto", "true", "false")


@dataclass
class TorchCompileConfig:
    name: str = "torch_compile"
    mode: str = "default"
    dynamic: str = "auto"  # auto: specialise first, go dynamic when the batch size changes
    fullgraph: bool = False


class TorchCompileExecutable:
    def __init__(self, fn: Any, info: dict[str, Any]):
        self.fn, self.info = fn, info

    def __call__(self, x: Tensor) -> Any:
        with torch.inference_mode():
            return self.fn(x)

    def describe(self) -> dict[str, Any]:
        return self.info


class TorchCompileBackend(BackendBase):
    name = "torch_compile"

    def check(self, cfg: TorchCompileConfig) -> None:
        if cfg.mode not in MODES:
            raise HarnessError(f"backend.mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
        if str(cfg.dynamic).lower() not in DYNAMIC:
            raise HarnessError(
                f"backend.dynamic must be one of {', '.join(DYNAMIC)}, got '{cfg.dynamic}'"
            )

    def compile(
        self, program: InferenceProgram, example: Tensor, cfg: TorchCompileConfig
    ) -> TorchCompileExecutable:
        self.check(cfg)
        dynamic = {"auto": None, "true": True, "false": False}[str(cfg.dynamic).lower()]
        fn = torch.compile(program.eval(), mode=cfg.mode, dynamic=dynamic, fullgraph=cfg.fullgraph)
        info = {"target": "cpu (inductor)", "tuning": cfg.mode, "compile_s": 0.0}
        exe = TorchCompileExecutable(fn, info)
        start = time.perf_counter()
        exe(example)
        info["compile_s"] = time.perf_counter() - start
        return exe


@hookimpl
def bnn_harness_backends() -> list:
    return [TorchCompileBackend()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("backend", "torch_compile_schema", TorchCompileConfig)]

"""The eager PyTorch backend: the program as it is, under inference mode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pluggy
import torch
from torch import Tensor

from harness.api import BackendBase, ConfigSchema, HarnessError, InferenceProgram

hookimpl = pluggy.HookimplMarker("bnn_harness")


@dataclass
class TorchConfig:
    name: str = "torch"
    threads: int = 0  # 0: PyTorch's default


class TorchExecutable:
    def __init__(self, program: InferenceProgram, compile_s: float):
        self.program, self.compile_s = program.eval(), compile_s

    def __call__(self, x: Tensor) -> Any:
        with torch.inference_mode():
            return self.program(x)

    def describe(self) -> dict[str, Any]:
        return {
            "target": "cpu",
            "threads": torch.get_num_threads(),
            "tuning": "none",
            "compile_s": self.compile_s,
        }


class TorchBackend(BackendBase):
    name = "torch"

    def check(self, cfg: TorchConfig) -> None:
        if cfg.threads < 0:
            raise HarnessError(f"backend.threads must be >= 0, got {cfg.threads}")

    def compile(
        self, program: InferenceProgram, example: Tensor, cfg: TorchConfig
    ) -> TorchExecutable:
        self.check(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        start = time.perf_counter()
        exe = TorchExecutable(program, 0.0)
        exe(example)  # fail here, at compile time, if the program cannot run
        exe.compile_s = time.perf_counter() - start
        return exe


@hookimpl
def bnn_harness_backends() -> list:
    return [TorchBackend()]


@hookimpl
def bnn_harness_config_schemas() -> list[ConfigSchema]:
    return [ConfigSchema("backend", "torch_schema", TorchConfig)]

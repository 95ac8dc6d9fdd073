"""backend=torch_compile: the program through Inductor gives eager's numbers."""

from __future__ import annotations

import pytest
import torch

from harness.api import HarnessError, MomentOp
from plugins.backends.torch_compile import TorchCompileBackend, TorchCompileConfig
from plugins.methods.pfp.program import PFPProgram


def _program() -> PFPProgram:
    g = torch.Generator().manual_seed(0)
    w = {
        "mean_w": torch.randn(5, 8, generator=g),
        "var_w": 0.01 * torch.rand(5, 8, generator=g),
        "mean_b": torch.zeros(5),
        "var_b": torch.full((5,), 0.01),
    }
    return PFPProgram([MomentOp("dense", w, {"first": True}), MomentOp("relu")])


@pytest.mark.slow
def test_compiled_program_matches_eager_for_new_batch_sizes() -> None:
    program = _program()
    exe = TorchCompileBackend().compile(program, torch.randn(2, 8), TorchCompileConfig())
    assert exe.describe()["compile_s"] > 0
    for b in (2, 7):
        x = torch.randn(b, 8)
        for got, want in zip(exe(x), program(x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (TorchCompileConfig(mode="turbo"), "backend.mode must be one of"),
        (TorchCompileConfig(dynamic="maybe"), "backend.dynamic must be one of"),
    ],
)
def test_config_errors(cfg: TorchCompileConfig, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        TorchCompileBackend().compile(_program(), torch.randn(2, 8), cfg)

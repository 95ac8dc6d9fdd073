"""MetaSchedule with a tiny budget: records land in the database and a second build reads
them instead of searching again (what lets a sweep tune each workload once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.api import HarnessError, MomentOp
from plugins.backends.tvm import TVMConfig
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


@pytest.mark.slow
def test_second_build_reads_the_database_and_does_not_tune(tmp_path: Path) -> None:
    cfg = TVMConfig(tune="metaschedule", trials=2, tuning_dir=str(tmp_path))
    x = torch.randn(3, 12)
    first = TVMBackend().compile(_program(0), x, cfg)
    info = first.describe()
    assert info["tuned_tasks"] >= 2 and info["trials"] >= 1
    records = _records(tmp_path)
    assert records >= 1
    searched = json.loads(next(tmp_path.rglob("searched.json")).read_text())
    assert len(searched) == info["tuned_tasks"]

    # Other weights, same shapes: same workloads, so nothing is searched again.
    again = TVMBackend().compile(_program(1), x, cfg)
    assert again.describe()["tuned_tasks"] == 0 and again.describe()["trials"] == 0
    assert _records(tmp_path) == records
    mean, var = again(x)
    ref_mean, ref_var = _program(1)(x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_trial_budget_must_be_positive(tmp_path: Path) -> None:
    cfg = TVMConfig(tune="metaschedule", trials=0, tuning_dir=str(tmp_path))
    with pytest.raises(HarnessError, match=r"backend\.trials must be positive"):
        TVMBackend().compile(_program(0), torch.randn(2, 12), cfg)

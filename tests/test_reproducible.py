"""Same machine, same library builds: a job rerun from nothing gives identical metrics.

What is not checked here, and does not hold: another CPU or another build of PyTorch /
BLAS may sum in another order, and the differences then grow through training to the size
of the seed-to-seed spread (README, "What is reproducible").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from harness import registry, runner

# Timings and wall-clock seconds are measurements of the machine, not of the model.
NOT_REPRODUCIBLE = ("lat/", "ref/", "speedup/", "fit/seconds", "compile/seconds")


def _quality(results: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in results.items() if not k.startswith(NOT_REPRODUCIBLE)}


@pytest.mark.slow
def test_rerun_into_empty_caches_and_stores_is_identical(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """PFP on SVI's posterior: training (SVI), a moment program, sampled entropy split,
    the variance score and the bootstrap interval all sit on the path being compared."""
    reg = registry.default()
    first = runner.run(make_cfg("method=pfp", root=tmp_path / "a"), reg)
    second = runner.run(make_cfg("method=pfp", root=tmp_path / "b"), reg)
    assert first["fit/cached"] == second["fit/cached"] == 0.0  # both trained from nothing
    assert {"ood/auroc_var", "ood/auroc_entropy_lo", "cls/acc"} <= set(first)
    assert _quality(first) == _quality(second)  # exact, not approximate
    files = [sorted((tmp_path / d / "cache").rglob("*.safetensors")) for d in ("a", "b")]
    assert len(files[0]) == len(files[1]) > 0
    assert [f.read_bytes() for f in files[0]] == [f.read_bytes() for f in files[1]]
    logged = [
        json.loads(next((tmp_path / d / "artifacts").rglob("results.json")).read_text())
        for d in ("a", "b")
    ]
    assert _quality(logged[0]["metrics"]) == _quality(logged[1]["metrics"])

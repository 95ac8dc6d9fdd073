"""Jobs sharing a process do not leak thread counts or environment into each other, and a
candidate and its reference are timed under the candidate's thread settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pluggy
import pytest
import torch

from harness import cli, registry, runner, summary
from plugins.backends import TorchBackend
from tests.conftest import FAST, store_overrides

hookimpl = pluggy.HookimplMarker("bnn_harness")
LEAK = "BNN_HARNESS_TEST_LEAK"


class LeakyBackend(TorchBackend):
    """The eager backend, plus what a careless backend does to the process: an environment
    variable and OpenMP's thread count set in `compile`; it records the thread count of
    every call, so the timing calls can be checked."""

    name = "leaky"

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[int] = []
        self.fail = fail

    def compile(self, program, example, cfg):
        os.environ[LEAK] = "set by the first job"
        os.environ["OMP_NUM_THREADS"] = "1"
        exe = super().compile(program, example, cfg)
        if self.fail:
            raise RuntimeError("compile failed after changing the process")
        return Recording(exe, self.seen)


class Recording:
    def __init__(self, exe, seen: list[int]) -> None:
        self.exe, self.seen = exe, seen

    def __call__(self, x):
        self.seen.append(torch.get_num_threads())
        return self.exe(x)

    def describe(self):
        return self.exe.describe()


def _registry_with(backend: LeakyBackend) -> registry.Registry:
    reg = registry.build()
    plugin = SimpleNamespace(bnn_harness_backends=hookimpl(lambda: [backend]))
    reg.manager.register(plugin, name="leaky [tests]")
    return reg


@pytest.fixture
def threads():
    """A thread count unlike the one the leaky backend sets, restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def _run_params(root: Path) -> list[dict[str, str]]:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=["bnn-harness"], order_by=["start_time ASC"], output_format="list"
    )
    return [run.data.params for run in runs]


@pytest.mark.slow
def test_second_job_sees_the_threads_and_environment_from_before_the_first(
    make_cfg, tmp_path: Path, threads: int
) -> None:
    leaky = LeakyBackend()
    reg = _registry_with(leaky)
    omp = os.environ.get("OMP_NUM_THREADS")
    first = make_cfg("method=deterministic", "backend.threads=1", "reference.backend.threads=2")
    first.backend.name = "leaky"
    runner.run(first, reg)
    assert torch.get_num_threads() == threads
    assert LEAK not in os.environ
    assert os.environ.get("OMP_NUM_THREADS") == omp
    # Evaluation and timing both ran under the candidate's setting, although compiling the
    # reference (threads=2) came in between.
    assert leaky.seen and set(leaky.seen) == {1}

    runner.run(make_cfg("method=deterministic"), reg)
    assert torch.get_num_threads() == threads
    first_params, second_params = _run_params(tmp_path)
    assert first_params["timing.torch_threads"] == "1"
    assert first_params["timing.env.OMP_NUM_THREADS"] == "1"
    assert second_params["timing.torch_threads"] == str(threads)
    assert second_params.get("timing.env.OMP_NUM_THREADS") == omp


@pytest.mark.slow
def test_a_failing_job_restores_threads_and_environment(make_cfg, threads: int) -> None:
    """Restored on the way out of an error too: here compile fails after changing both."""
    leaky = LeakyBackend(fail=True)
    cfg = make_cfg("method=deterministic", "backend.threads=1")
    cfg.backend.name = "leaky"
    with pytest.raises(RuntimeError, match="compile failed"):
        runner.run(cfg, _registry_with(leaky))
    assert LEAK not in os.environ
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_sweep_id_does_not_outlive_the_sweep(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(summary.SWEEP_ENV, raising=False)
    monkeypatch.delenv(summary.PARENT_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    common = ["method=deterministic", *FAST, *store_overrides(tmp_path)]
    swept = cli.main(["run", "-m", *common, f"hydra.sweep.dir={tmp_path}/sweep", "seed=0"])
    assert swept == 0
    assert summary.SWEEP_ENV not in os.environ and summary.PARENT_ENV not in os.environ
    single = cli.main(["run", *common, f"hydra.run.dir={tmp_path}/run"])
    assert single == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"], order_by=["start_time ASC"])
    jobs = runs[runs["tags.role"] == "job"]
    swept_id, single_id = list(jobs["tags.sweep_id"])
    assert swept_id != "single" and single_id == "single"

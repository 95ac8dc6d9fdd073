"""A sweep as MLflow shows it: one parent run, its jobs as child runs, a table at the end.

Runs of one sweep share the `sweep_id` tag and point at the parent through MLflow's own
`mlflow.parentRunId` tag, so the UI nests them. Both ids are set once in the launching
process and reach parallel workers (joblib, Ray, Submitit) through the environment; a
plain tag works across processes where MLflow's in-process `nested=True` cannot.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from hydra.experimental.callback import Callback
from mlflow.entities import Param
from omegaconf import DictConfig, OmegaConf

from harness.config import TrackingConfig
from harness.tracking import experiment_id, git_commit, hardware, with_retry

SWEEP_ENV = "BNN_HARNESS_SWEEP_ID"
PARENT_ENV = "BNN_HARNESS_PARENT_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "role"  # job | sweep | report: tables and reports read only the jobs
FAILURE_MARKER = "bnn_harness_failed.txt"
FAILURES: list[str] = []  # the last sweep's failed jobs, read from their markers
COLUMNS = {
    "tags.mlflow.runName": "run",
    "status": "status",
    "metrics.cls/acc": "acc",
    "metrics.cal/nll": "nll",
    "metrics.cal/ece": "ece",
    "metrics.ood/auroc_entropy": "auroc_H",
    "metrics.ood/auroc_mi": "auroc_MI",
    "metrics.lat/b1_ms": "b1_ms",
    "metrics.speedup/b1": "speedup_b1",
}


def sweep_id() -> str:
    return os.environ.get(SWEEP_ENV, "single")


def job_tags(preset: str | None) -> dict[str, str]:
    """Tags that place a job in its sweep and preset; the parent link only inside a sweep."""
    tags = {"sweep_id": sweep_id(), ROLE_TAG: "job", "preset": preset or "none"}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags[PARENT_TAG] = parent
    return tags


def only_jobs(runs: pd.DataFrame) -> pd.DataFrame:
    """Drop sweep parents and report runs (runs from before the role tag count as jobs)."""
    if runs.empty or f"tags.{ROLE_TAG}" not in runs:
        return runs
    role = runs[f"tags.{ROLE_TAG}"].fillna("job")
    return runs[role == "job"]


def runs_of(tracking: TrackingConfig, sweep: str | None = None) -> pd.DataFrame:
    """Job runs of one sweep (default: the newest sweep in the experiment)."""
    exp = experiment_id(tracking)
    runs = only_jobs(mlflow.search_runs([exp], order_by=["attributes.start_time DESC"]))
    if runs.empty:
        return runs
    sweep = sweep or runs["tags.sweep_id"].iloc[0]
    return runs[runs["tags.sweep_id"] == sweep].iloc[::-1]


def table(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "no runs recorded"
    shown = runs.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def _tracking(config: DictConfig) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))


def _preset(config: DictConfig) -> str | None:
    return OmegaConf.select(config, "hydra.runtime.choices.experiment")


def _sweep_params(config: DictConfig) -> dict[str, str]:
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides = OmegaConf.select(config, "hydra.overrides.task") or []
    out = {f"sweep.{k}": str(v) for k, v in params.items()}
    out["sweep.overrides"] = " ".join(overrides)[:6000]
    out["sweep.launcher"] = str(OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher"))
    return out


class SweepSummary(Callback):
    """Opens the sweep's parent run before any job starts, closes it with the table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        os.environ[SWEEP_ENV] = sweep
        preset = _preset(config) or "none"
        # Creating the store here, in one process, also keeps parallel workers from racing
        # to run MLflow's schema migrations on a fresh SQLite file.
        exp = experiment_id(_tracking(config))
        client = mlflow.MlflowClient()
        tags = {
            "sweep_id": sweep,
            ROLE_TAG: "sweep",
            "preset": preset,
            "git_commit": git_commit(),
            "hardware": hardware(),
        }
        run = with_retry(
            lambda: client.create_run(exp, run_name=f"sweep-{preset}-{sweep}", tags=tags)
        )
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in _sweep_params(config).items()]
        with_retry(lambda: client.log_batch(run_id, params=params))
        os.environ[PARENT_ENV] = run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        markers = sorted(Path(config.hydra.sweep.dir).glob(f"**/{FAILURE_MARKER}"))
        FAILURES[:] = [m.read_text() for m in markers]
        tracking = _tracking(config)
        runs = runs_of(tracking, sweep_id())
        text = table(runs)
        print(f"\nsweep {sweep_id()} (MLflow experiment '{tracking.experiment}'):")
        print(text)
        parent = os.environ.pop(PARENT_ENV, None)
        if parent is None:
            return
        client = mlflow.MlflowClient()
        finished = int((runs["status"] == "FINISHED").sum()) if not runs.empty else 0
        # Markers also count jobs refused before their run existed (config errors).
        failed = max(len(FAILURES), len(runs) - finished)
        with_retry(lambda: client.log_text(parent, text, "summary.txt"))
        with_retry(lambda: client.set_tag(parent, "finished_jobs", str(finished)))
        with_retry(lambda: client.set_tag(parent, "failed_jobs", str(failed)))
        with_retry(lambda: client.set_terminated(parent, "FINISHED"))

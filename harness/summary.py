"""A sweep as MLflow shows it: one parent run, its jobs as child runs, a table at the end.

Runs of one sweep share the `sweep_id` tag and point at the parent through MLflow's own
`mlflow.parentRunId` tag, so the UI nests them. Both ids are set once in the launching
process and reach parallel workers (joblib, Ray, Submitit) through the environment; a
plain tag works across processes where MLflow's in-process `nested=True` cannot.

A sweep stopped by a signal ends KILLED with every job still RUNNING in it (parallel
workers cannot mark their own runs once the launcher has killed them), and the tables
pick the newest sweep that finished, so a partial sweep is never read as the newest
result. A resumed sweep lists the runs it reused (`reused_runs`) and shows them as its own.
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

from harness import concurrency
from harness.config import TrackingConfig
from harness.tracking import experiment_id, git_commit, hardware, with_retry

SWEEP_ENV = "BNN_HARNESS_SWEEP_ID"
PARENT_ENV = "BNN_HARNESS_PARENT_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "role"  # job | sweep | report: tables and reports read only the jobs
FAILURE_MARKER = "bnn_harness_failed.txt"
SKIP_MARKER = "bnn_harness_skipped.txt"
FAILURES: list[str] = []  # the last sweep's failed jobs, read from their markers
SKIPPED: list[str] = []  # run ids the last sweep reused instead of rerunning
UNFINISHED = ("RUNNING", "SCHEDULED", "KILLED")
# The sweep this process launched and has not closed: (tracking, sweep id, parent run id).
_active: list[tuple[TrackingConfig, str, str]] = []
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
    tags |= concurrency.job_tags()
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags[PARENT_TAG] = parent
    return tags


def roles(runs: pd.DataFrame) -> pd.Series:
    """Each run's role: job, sweep or report (runs from before the role tag are jobs)."""
    return runs.get(f"tags.{ROLE_TAG}", pd.Series("job", index=runs.index)).fillna("job")


def only_jobs(runs: pd.DataFrame) -> pd.DataFrame:
    """Drop sweep parents and report runs."""
    if runs.empty:
        return runs
    return runs[roles(runs) == "job"]


def _tag_of(run: pd.Series, name: str) -> str:
    value = run.get(f"tags.{name}")
    return value if isinstance(value, str) else ""


def finished_sweeps(runs: pd.DataFrame) -> list[str]:
    """Sweep ids, newest first, whose parent (if any) FINISHED and no job is unfinished."""
    if runs.empty or "tags.sweep_id" not in runs:
        return []
    role = roles(runs)
    parents = runs[role == "sweep"]
    jobs = runs[role == "job"]
    bad = set(parents.loc[parents["status"] != "FINISHED", "tags.sweep_id"])
    # A job left RUNNING or KILLED spoils its sweep; outside a sweep (no parent, e.g. the
    # `single` runs) it is only left out.
    swept = jobs["tags.sweep_id"].isin(set(parents["tags.sweep_id"]))
    bad |= set(jobs.loc[swept & jobs["status"].isin(UNFINISHED), "tags.sweep_id"])
    return [s for s in _newest_first(runs, role) if s not in bad]


def _newest_first(runs: pd.DataFrame, role: pd.Series) -> list[str]:
    """Sweep ids by their newest job or parent: a resumed sweep whose every job was
    reused has no job of its own, and it is still the newest sweep."""
    return list(runs.loc[role.isin(["job", "sweep"]), "tags.sweep_id"].dropna().drop_duplicates())


def select_sweep(
    runs: pd.DataFrame, sweep: str | None = None, include_unfinished: bool = False
) -> pd.DataFrame:
    """The job runs of one sweep, oldest first, from runs sorted newest first.

    Without `sweep`, the newest sweep that finished (any newest one with
    `include_unfinished`); the runs a resumed sweep reused count as its own.
    """
    jobs = only_jobs(runs)
    if jobs.empty:
        return jobs
    role = roles(runs)
    if sweep is None:
        order = _newest_first(runs, role) if include_unfinished else finished_sweeps(runs)
        if not order:
            return jobs.iloc[0:0]
        sweep = order[0]
        if not include_unfinished:
            jobs = jobs[~jobs["status"].isin(UNFINISHED)]
    chosen = jobs["tags.sweep_id"] == sweep
    parents = runs[(role == "sweep") & (runs["tags.sweep_id"] == sweep)]
    reused = {r for p in parents.get("tags.reused_runs", []) for r in str(p).split(",") if r}
    chosen |= jobs["run_id"].isin(reused)
    return jobs[chosen].iloc[::-1]


def runs_of(
    tracking: TrackingConfig, sweep: str | None = None, include_unfinished: bool = False
) -> pd.DataFrame:
    """Job runs of one sweep (default: the newest finished sweep in the experiment)."""
    exp = experiment_id(tracking)
    runs = with_retry(lambda: mlflow.search_runs([exp], order_by=["attributes.start_time DESC"]))
    return select_sweep(runs, sweep, include_unfinished)


def close_active(status: str, reason: str) -> str | None:
    """End the sweep this process opened (KILLED on a signal, FAILED when Hydra itself
    failed), and every job of it still RUNNING; the parent's id, if there was one."""
    if not _active:
        return None
    tracking, sweep, parent = _active.pop()
    os.environ.pop(PARENT_ENV, None)
    experiment_id(tracking)
    client = mlflow.MlflowClient()
    running = with_retry(
        lambda: mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.sweep_id = '{sweep}' and attributes.status = 'RUNNING'",
            output_format="list",
        )
    )
    if status == "FAILED" and not [r for r in running if r.info.run_id != parent]:
        # Hydra failed before any job ran (a bad sweep value): leave no run behind.
        jobs = with_retry(
            lambda: mlflow.search_runs(
                search_all_experiments=True,
                filter_string=f"tags.sweep_id = '{sweep}'",
                output_format="list",
            )
        )
        if all(r.info.run_id == parent for r in jobs):
            with_retry(lambda: client.delete_run(parent))
            return None
    for run in running:
        if run.info.run_id != parent:
            with_retry(lambda run=run: client.set_tag(run.info.run_id, "error", reason))
            with_retry(lambda run=run: client.set_terminated(run.info.run_id, status))
    with_retry(lambda: client.set_tag(parent, "error", reason))
    with_retry(lambda: client.set_terminated(parent, status))
    return parent


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
        serial = concurrency.one_per_machine(config)  # before Hydra builds the launcher
        if serial:
            print(f"{preset}: one job at a time per machine for clean timings ({serial})")
        launched = concurrency.start(config)
        # Creating the store here, in one process, also keeps parallel workers from racing
        # to run MLflow's schema migrations on a fresh SQLite file.
        tracking = _tracking(config)
        exp = with_retry(lambda: experiment_id(tracking), float(tracking.lock_wait_s))
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
        params.append(Param("sweep.concurrent_jobs", launched[concurrency.CONCURRENT_ENV]))
        with_retry(lambda: client.log_batch(run_id, params=params))
        os.environ[PARENT_ENV] = run_id
        _active[:] = [(_tracking(config), sweep, run_id)]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        FAILURES[:] = [m.read_text() for m in sorted(folder.glob(f"**/{FAILURE_MARKER}"))]
        SKIPPED[:] = [m.read_text().strip() for m in sorted(folder.glob(f"**/{SKIP_MARKER}"))]
        tracking = _tracking(config)
        parent = os.environ.pop(PARENT_ENV, None)
        concurrency.stop()
        _active.clear()
        client = mlflow.MlflowClient()
        if parent is not None and SKIPPED:
            reused = ",".join(SKIPPED)
            experiment_id(tracking)
            with_retry(lambda: client.set_tag(parent, "reused_runs", reused[:8000]))
        runs = runs_of(tracking, sweep_id(), include_unfinished=True)
        own = runs[runs["tags.sweep_id"] == sweep_id()] if not runs.empty else runs
        text = table(runs)
        print(f"\nsweep {sweep_id()} (MLflow experiment '{tracking.experiment}'):")
        print(text)
        if SKIPPED:
            print(f"{len(SKIPPED)} job(s) skipped: already FINISHED (resume=false reruns them)")
        if parent is None:
            return
        finished = int((own["status"] == "FINISHED").sum()) if not own.empty else 0
        # Markers also count jobs refused before their run existed (config errors).
        failed = max(len(FAILURES), len(own) - finished)
        # A worker's marker may sit on another machine (Ray); its FAILED run still counts.
        FAILURES.extend(["error: recorded as a FAILED MLflow run"] * (failed - len(FAILURES)))
        with_retry(lambda: client.log_text(parent, text, "summary.txt"))
        with_retry(lambda: client.set_tag(parent, "finished_jobs", str(finished)))
        with_retry(lambda: client.set_tag(parent, "failed_jobs", str(failed)))
        with_retry(lambda: client.set_tag(parent, "skipped_jobs", str(len(SKIPPED))))
        with_retry(lambda: client.set_terminated(parent, "FINISHED"))

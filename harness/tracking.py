"""One MLflow run per job: flat params, prefixed metrics, tags, artifacts.

A job that raises is still a complete record: status FAILED, the error as a tag
and the traceback as an artifact. Parallel jobs share one SQLite file, whose writers
lock it whole; a write that meets the lock waits and retries instead of losing the run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.entities import Run

from harness.config import TrackingConfig

MAX_PARAM = 6000
RETRY_S = 120.0
T = TypeVar("T")


def _locked(err: BaseException) -> bool:
    text = f"{err} {err.__cause__}".lower()
    return "database is locked" in text or "database table is locked" in text


def with_retry(call: Callable[[], T], budget_s: float = RETRY_S) -> T:
    """`call()`, retried with backoff while SQLite reports its lock (held by another job)."""
    deadline = time.monotonic() + budget_s
    pause = 0.05
    while True:
        try:
            return call()
        except Exception as err:
            if not _locked(err) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def store_uri(cfg: TrackingConfig) -> str:
    """A relative SQLite path is made absolute, and its folder created, before MLflow sees it."""
    if cfg.uri.startswith("sqlite:///") and not cfg.uri.startswith("sqlite:////"):
        path = Path(cfg.uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return cfg.uri


def experiment_id(cfg: TrackingConfig) -> str:
    mlflow.set_tracking_uri(store_uri(cfg))
    found = mlflow.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    artifacts = Path(cfg.artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=artifacts.as_uri())
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def hardware() -> str:
    return f"{platform.machine()} {platform.processor() or platform.system()} x{os.cpu_count()}"


@contextmanager
def job_run(
    cfg: TrackingConfig, run_name: str, resolved: dict[str, Any], tags: dict[str, str]
) -> Iterator[Run]:
    """An MLflow run holding the flattened config as params and the config itself."""
    exp = with_retry(lambda: experiment_id(cfg))
    tags = {"git_commit": git_commit(), "hardware": hardware(), **tags}
    run = with_retry(lambda: mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags))
    try:
        params = {k: str(v)[:MAX_PARAM] for k, v in flatten(resolved).items()}
        with_retry(lambda: mlflow.log_params(params))
        mlflow.log_dict(resolved, "config.yaml")
        yield run
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"[:5000]
        with_retry(lambda: mlflow.set_tag("error", message))
        mlflow.log_text(traceback.format_exc(), "error.txt")
        _end(run.info.run_id, "FAILED")
        raise
    _end(run.info.run_id, "FINISHED")


def _end(run_id: str, status: str) -> None:
    """End the active run; MLflow pops it before writing, so a locked write is redone here."""
    try:
        mlflow.end_run(status=status)
    except Exception as err:
        if not _locked(err):
            raise
        with_retry(lambda: mlflow.MlflowClient().set_terminated(run_id, status))


def log_results(
    metrics: dict[str, float],
    artifacts: dict[str, Any],
    figures: dict[str, Any],
    arrays: dict[str, dict[str, np.ndarray]] | None = None,
) -> None:
    """`arrays`: per-sample values (e.g. entropies) as compressed .npz, too long for JSON."""
    with_retry(lambda: mlflow.log_metrics({k: float(v) for k, v in metrics.items()}))
    for name, payload in artifacts.items():
        mlflow.log_dict(payload, name)
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
    for name, payload in (arrays or {}).items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.savez_compressed(path, **payload)
            mlflow.log_artifact(str(path))

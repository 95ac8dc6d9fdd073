"""One MLflow run per job: flat params, prefixed metrics, tags, artifacts.

A job that raises is still a complete record: status FAILED, the error as a tag
and the traceback as an artifact.
"""

from __future__ import annotations

import os
import platform
import subprocess
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run

from harness.config import TrackingConfig

MAX_PARAM = 6000


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
    exp = experiment_id(cfg)
    tags = {"git_commit": git_commit(), "hardware": hardware(), **tags}
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags) as run:
        try:
            mlflow.log_params({k: str(v)[:MAX_PARAM] for k, v in flatten(resolved).items()})
            mlflow.log_dict(resolved, "config.yaml")
            yield run
        except BaseException as err:
            mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status="FAILED")
            raise


def log_results(
    metrics: dict[str, float], artifacts: dict[str, Any], figures: dict[str, Any]
) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    for name, payload in artifacts.items():
        mlflow.log_dict(payload, name)
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)

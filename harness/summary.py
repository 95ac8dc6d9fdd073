"""The compact table a sweep prints at its end, read back from MLflow.

Runs of one sweep share the `sweep_id` tag, set once in the launching process
(inherited by parallel workers through the environment).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import mlflow
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.config import TrackingConfig
from harness.tracking import experiment_id

SWEEP_ENV = "BNN_HARNESS_SWEEP_ID"
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


def runs_of(tracking: TrackingConfig, sweep: str | None = None) -> pd.DataFrame:
    """Runs of one sweep (default: the newest sweep in the experiment)."""
    exp = experiment_id(tracking)
    runs = mlflow.search_runs([exp], order_by=["attributes.start_time DESC"])
    if runs.empty:
        return runs
    sweep = sweep or runs["tags.sweep_id"].iloc[0]
    return runs[runs["tags.sweep_id"] == sweep].iloc[::-1]


def table(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "no runs recorded"
    shown = runs.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        print(f"\nsweep {sweep_id()} (MLflow experiment '{tracking.experiment}'):")
        print(table(runs_of(tracking, sweep_id())))

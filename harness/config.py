"""Structured-config schemas: a typo in a key fails at start with Hydra's own message.

Top-level fields live here; each plugin registers the schema of its own group entry
through the `bnn_harness_config_schemas` hook, so the core names no plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from harness.registry import Registry
from harness.timing import TimingConfig


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///results/mlflow.db"
    experiment: str = "bnn-harness"
    artifacts: str = "results/mlartifacts"
    lock_wait_s: float = 120.0  # how long a write waits for SQLite's lock before giving up


@dataclass
class ReferenceConfig:
    method: Any = MISSING
    backend: Any = MISSING


@dataclass
class RunConfig:
    method: Any = MISSING
    backend: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    quant: Any = MISSING
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 10, 100])
    batch_size: Optional[int] = None  # noqa: UP045 - OmegaConf needs Optional; sweeps set it
    eval_batch_size: int = 1000
    moment_samples: int = 100
    seed: int = 0
    timing: TimingConfig = field(default_factory=TimingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache_dir: str = "results/cache"
    # Skip a job whose config already has a FINISHED run; unset: on in sweeps, off for one run.
    resume: Optional[bool] = None  # noqa: UP045 - OmegaConf needs Optional


def register(registry: Registry) -> None:
    store = ConfigStore.instance()
    store.store(name="config_schema", node=RunConfig)
    for schema in registry.collect("bnn_harness_config_schemas"):
        store.store(group=schema.group, name=schema.name, node=schema.node)

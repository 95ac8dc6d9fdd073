"""One MLflow run per job: flat params, prefixed metrics, tags, artifacts.

A job that raises is still a complete record: status FAILED, the error as a tag
and the traceback as an artifact; one stopped by SIGINT/SIGTERM ends KILLED, so no run
stays RUNNING forever. Parallel jobs share one SQLite file, whose writers lock it whole;
a write that meets the lock waits and retries (`tracking.lock_wait_s`) instead of losing
the run, and past that wait says which store to replace by a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.entities import Run

from harness import machine
from harness.api import HarnessError
from harness.config import TrackingConfig

MAX_PARAM = 6000
RETRY_S = 120.0
# Top-level keys that change where or whether a job is recorded, never what it measures.
UNHASHED = ("resume", "tracking", "cache_dir", "hydra")
T = TypeVar("T")
_store = {"uri": "", "wait_s": RETRY_S}
# Ids of the runs `job_run` created since `created.clear()`: a failure says "recorded"
# only when a run exists.
created: list[str] = []
_signals: list[int] = []
# MLflow's SQL store logs every locked query at ERROR with its SQL and traceback (a wait is
# not an error; a real one is raised to us), and its table creation at INFO, on stderr.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class Interrupted(BaseException):
    """SIGINT/SIGTERM as an exception that no `except Exception` swallows (Lightning turns a
    KeyboardInterrupt into exit 1, which would lose which signal stopped the job)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _signals:  # already unwinding: let the cleanup that marks runs KILLED finish
        return
    _signals.append(signum)
    raise Interrupted(signum)


@contextmanager
def catch_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while the block runs (also in a launcher's
    worker process); a no-op where they already do, or off the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is _on_signal
    ):
        yield
        return
    _signals.clear()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted() -> int | None:
    """The signal that stopped this process, if one did."""
    return _signals[0] if _signals else None


def _locked(err: BaseException) -> bool:
    text = f"{err} {err.__cause__}".lower()
    return "database is locked" in text or "database table is locked" in text


def with_retry(call: Callable[[], T], budget_s: float | None = None) -> T:
    """`call()`, retried with backoff while SQLite reports its lock (held by another job)."""
    budget_s = _store["wait_s"] if budget_s is None else budget_s
    deadline = time.monotonic() + budget_s
    pause = 0.05
    while True:
        try:
            return call()
        except Exception as err:
            if not _locked(err):
                raise
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"MLflow store {_store['uri'] or 'in use'} stayed locked by another process "
                    f"for {budget_s:g} s; for parallel or remote writers point tracking.uri at "
                    "a tracking server (`mlflow server`), or raise tracking.lock_wait_s"
                ) from err
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0) + 0.01))
            pause = min(pause * 2, 2.0)


def config_hash(resolved: Mapping[str, Any]) -> str:
    """What identifies a job's result: its resolved config minus where it is recorded."""
    kept = {k: v for k, v in resolved.items() if k not in UNHASHED}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    _store.update(uri=cfg.uri, wait_s=float(cfg.lock_wait_s))
    mlflow.set_tracking_uri(store_uri(cfg))
    found = mlflow.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    location = None  # a tracking server's own artifact root: workers need no shared folder
    if not cfg.uri.startswith(("http://", "https://")):
        artifacts = Path(cfg.artifacts).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
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
    return machine.hardware()


def finished_run(cfg: TrackingConfig, digest: str) -> str | None:
    """A FINISHED run of the experiment with this config hash; looking creates no store."""
    uri = store_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    _store.update(uri=cfg.uri, wait_s=float(cfg.lock_wait_s))
    mlflow.set_tracking_uri(uri)
    found = with_retry(lambda: mlflow.get_experiment_by_name(cfg.experiment))
    if found is None:
        return None
    runs = with_retry(
        lambda: mlflow.search_runs(
            [found.experiment_id],
            filter_string=f"tags.config_hash = '{digest}' and attributes.status = 'FINISHED'",
            max_results=1,
            output_format="list",
        )
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def job_run(
    cfg: TrackingConfig, run_name: str, resolved: dict[str, Any], tags: dict[str, str]
) -> Iterator[Run]:
    """An MLflow run holding the flattened config as params and the config itself."""
    _store.update(uri=cfg.uri, wait_s=float(cfg.lock_wait_s))
    exp = with_retry(lambda: experiment_id(cfg))
    tags = {"git_commit": git_commit(), "hardware": hardware(), **tags}
    run = with_retry(lambda: mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags))
    created.append(run.info.run_id)
    try:
        params = {k: str(v)[:MAX_PARAM] for k, v in flatten(resolved).items()}
        with_retry(lambda: mlflow.log_params(params))
        mlflow.log_dict(resolved, "config.yaml")
        yield run
    except BaseException as err:
        killed = isinstance(err, Interrupted) or interrupted() is not None
        message = f"{type(err).__name__}: {err}"[:5000]
        with_retry(lambda: mlflow.set_tag("error", message))
        mlflow.log_text(traceback.format_exc(), "error.txt")
        _end(run.info.run_id, "KILLED" if killed else "FAILED")
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


def log_params(params: dict[str, Any]) -> None:
    """Params known only while the job runs (e.g. the thread settings it was timed under)."""
    with_retry(lambda: mlflow.log_params({k: str(v)[:MAX_PARAM] for k, v in params.items()}))

"""The runner end to end on a real SQLite MLflow store, read back with search_runs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from harness import registry, runner
from harness.api import HarnessError


def _runs(root: Path, experiment: str = "bnn-harness"):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment])


def test_run_logs_params_metrics_tags_artifacts(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=deterministic")
    results = runner.run(cfg, registry.default(), {"sweep_id": "t1"})
    [run] = _runs(tmp_path).itertuples(index=False)
    row = run._asdict()
    runs = _runs(tmp_path)
    assert runs.loc[0, "status"] == "FINISHED"
    assert runs.loc[0, "params.method.name"] == "deterministic"
    assert runs.loc[0, "params.reference.method.samples"] == "10"
    assert runs.loc[0, "tags.sweep_id"] == "t1"
    assert runs.loc[0, "tags.mlflow.runName"] == "deterministic-torch"
    for tag in ("git_commit", "hardware", "method", "backend", "dataset"):
        assert runs.loc[0, f"tags.{tag}"], tag
    for metric in (
        "cls/acc",
        "cal/nll",
        "cal/brier",
        "cal/ece",
        "ood/auroc_entropy",
        "ood/auroc_mi",
        "lat/b1_ms",
        "speedup/b1",
        "speedup/b4",
        "mem/param_bytes",
        "unc/ambiguous_aleatoric",
        "unc/ood_patches_epistemic",
    ):
        assert runs.loc[0, f"metrics.{metric}"] == pytest.approx(results[metric]), metric
    assert 0.5 < results["cls/acc"] <= 1.0
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(runs.loc[0, "run_id"])}
    assert {"config.yaml", "results.json", "reliability.json", "reliability.png"} <= names
    assert row  # one run only: the unpacking above would fail otherwise


def test_same_config_same_metrics_and_cache_hit(make_cfg, tmp_path: Path) -> None:
    first = runner.run(
        make_cfg("method=mc_dropout", "method.samples=5", root=tmp_path / "a"), registry.default()
    )
    again = runner.run(
        make_cfg("method=mc_dropout", "method.samples=5", root=tmp_path / "a"), registry.default()
    )
    fresh = runner.run(
        make_cfg("method=mc_dropout", "method.samples=5", root=tmp_path / "b"), registry.default()
    )
    assert first["fit/cached"] == 0.0 and again["fit/cached"] == 1.0
    for key in ("cls/acc", "cal/nll", "cal/ece", "ood/auroc_mi", "unc/test_epistemic"):
        assert first[key] == again[key] == fresh[key], key


def test_base_posterior_is_shared(make_cfg, tmp_path: Path) -> None:
    """MC dropout starts from the cached deterministic network instead of retraining."""
    runner.run(make_cfg("method=deterministic"), registry.default())
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    runner.run(make_cfg("method=mc_dropout"), registry.default())
    after = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert after.count("deterministic") == cached.count("deterministic") == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_sizes=[1,0]", "batch sizes must be positive"),
        ("batch_size=-3", "batch sizes must be positive"),
        ("eval_batch_size=0", "eval_batch_size"),
        ("model.hidden=[0]", "widths must be positive"),
        ("model.dropout=1.5", "model.dropout"),
    ],
)
def test_config_errors_fail_before_any_run(make_cfg, tmp_path: Path, override, message) -> None:
    with pytest.raises(HarnessError, match=message):
        runner.run(make_cfg(override), registry.default())
    assert not (tmp_path / "mlflow.db").exists()


def test_failure_inside_job_is_a_failed_run(make_cfg, tmp_path: Path) -> None:
    """Options are checked before the run (tests/test_contract.py); what only shows once the
    base is trained (MC dropout on a network without dropout) fails inside it."""
    with pytest.raises(HarnessError, match="needs a model with dropout"):
        runner.run(make_cfg("method=mc_dropout", "model.dropout=0"), registry.default())
    runs = _runs(tmp_path)
    assert list(runs["status"]) == ["FAILED"]
    assert "needs a model with dropout" in runs.loc[0, "tags.error"]
    client = mlflow.MlflowClient()
    text = Path(client.download_artifacts(runs.loc[0, "run_id"], "error.txt", str(tmp_path)))
    assert "Traceback" in text.read_text()

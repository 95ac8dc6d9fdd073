"""The MLflow UI in a real headless Chromium against a store filled by real runs."""

from __future__ import annotations

import html
import re
from pathlib import Path

import matplotlib.image
import mlflow
import pytest

from harness import browser, registry, runner
from harness.summary import PARENT_TAG, ROLE_TAG

pytestmark = pytest.mark.skipif(
    browser.chromium() is None,
    reason="chromium is not installed (.ci/setup-browser, or apt-get install chromium)",
)


def _text(dom: str) -> str:
    """Visible text: scripts and styles dropped, tags removed, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.mark.slow
def test_sweep_runs_and_metrics_show_in_the_ui(make_cfg, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("ui-test", artifact_location=(tmp_path / "art").as_uri())
    parent = mlflow.MlflowClient().create_run(
        exp, run_name="sweep-ui-test", tags={ROLE_TAG: "sweep", "sweep_id": "s1"}
    )
    mlflow.MlflowClient().set_terminated(parent.info.run_id)
    tags = {"sweep_id": "s1", ROLE_TAG: "job", PARENT_TAG: parent.info.run_id}
    results = {}
    for method in ("deterministic", "mc_dropout"):
        cfg = make_cfg(f"method={method}", "tracking.experiment=ui-test")
        results[f"{method}-torch"] = runner.run(cfg, registry.default(), tags)

    with browser.mlflow_server(uri) as base:
        # Main screen: the sweep is one row; its jobs fold under it (MLflow's parent tag).
        folded = _text(browser.render(f"{base}/#/experiments/{exp}/runs"))
        assert "sweep-ui-test" in folded
        assert "deterministic-torch" not in folded

        # Jobs flat, a chart section per metric prefix; screenshot kept. (The charts
        # themselves draw lazily, so their titles are checked on the comparison view.)
        shot = tmp_path / "mlflow_ui.png"
        url = browser.runs_url(base, exp, "tags.role = 'job'", "metrics.`cls/acc`")
        charts = _text(browser.render(url, screenshot=shot))
        for name in results:
            assert name in charts
        for prefix in ("cls", "cal", "ood", "unc", "lat", "speedup", "mem"):
            assert re.search(rf"\b{prefix} \(\d+\)", charts), prefix
        height, width, _ = matplotlib.image.imread(shot).shape
        assert (width, height) == (1600, 1100)

        # Comparison view: run names, metric values and the sweep's tags side by side.
        jobs = mlflow.search_runs([exp], "tags.role = 'job'", output_format="list")
        ids = [r.info.run_id for r in jobs]
        compared = _text(browser.render(browser.compare_url(base, exp, ids)))
        assert f"Comparing {len(ids)} Runs" in compared
        for metric in ("cls/acc", "cal/ece", "cal/nll", "amb/acc"):  # a long list is cut short
            assert metric in compared, metric
        for name, scores in results.items():
            assert name in compared
            assert f"{scores['cls/acc']:.3f}".rstrip("0") in compared
        assert "sweep_id" in compared and "s1" in compared

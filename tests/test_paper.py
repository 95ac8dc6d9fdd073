"""The paper preset: its claim table, seed statistics and plots, on a small synthetic store.

Runs are logged with known metrics into a real SQLite MLflow store, so every number the
page shows can be checked against what went in.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import claims, plots, report, stats
from harness.config import TrackingConfig
from tests.conftest import CONF

METHODS = ("svi", "pfp", "linearised")


def _log(root: Path, method: str, backend: str, model: str, seed: int, metrics: dict) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    tags = {
        "preset": "paper", "sweep_id": "s1", "role": "job", "method": method,
        "backend": backend, "model": model, "quant": "none", "bits": "32",
        "dataset": "dirty_mnist",
    }  # fmt: skip
    with mlflow.start_run(run_name=f"{method}-{backend}", tags=tags):
        mlflow.log_params(
            {"seed": seed, "method.name": method, "backend.name": backend, "model.name": model}
        )
        mlflow.log_metrics(metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """svi / pfp / linearised x mlp / lenet5 x 3 seeds on torch; one timed compile seed.

    Designed outcomes: PFP's accuracy equals SVI's (holds); PFP's ECE is 0.03 worse on
    lenet5 only (calibration: partly); PFP is >= 20x faster everywhere (holds); the
    linearised pass is 5x faster at batch 1000 (speed: partly)."""
    root = tmp_path_factory.mktemp("paper")
    for model in ("mlp", "lenet5"):
        for seed in range(3):
            jitter = 0.01 * (seed - 1)
            for method in METHODS:
                ece = 0.05 + (0.03 if (method == "pfp" and model == "lenet5") else 0.0)
                metrics = {
                    "cls/acc": 0.95 + jitter,
                    "cal/ece": ece,
                    "cal/nll": 0.2,
                    "ood/auroc_entropy": 0.9 + jitter,
                    "ood/auroc_mi": 0.88,
                    "lat/b10_ms": {"svi": 10.0, "pfp": 0.3, "linearised": 0.2}[method],
                }
                if method != "svi":
                    metrics["ood/auroc_var"] = 0.91
                    fast = {1: 50.0, 10: 40.0, 1000: 20.0 if method == "pfp" else 5.0}
                    if seed == 0:
                        metrics |= {f"speedup/b{b}": v for b, v in fast.items()}
                _log(root, method, "torch", model, seed, metrics)
        for method in ("pfp", "svi"):
            speed = {"speedup/b1": 80.0, "speedup/b10": 60.0, "speedup/b1000": 30.0}
            lat = {"lat/b10_ms": 0.1 if method == "pfp" else 12.0}
            quality = {"cls/acc": 0.95, "ood/auroc_entropy": 0.9, "cal/nll": 0.2}
            _log(root, method, "torch_compile", model, 0, quality | lat | speed)
    return root


def _runs(root: Path):
    return report.preset_runs(TrackingConfig(uri=f"sqlite:///{root}/mlflow.db"), "paper")


def test_claim_table_verdicts_and_numbers(store: Path) -> None:
    rows = {r["claim"]: r for r in claims.evaluate(claims.load("paper"), _runs(store))}
    acc = rows["PFP matches SVI in accuracy"]
    assert acc["verdict"] == "holds"
    # mean ± sample std over the three seeds (0.94, 0.95, 0.96: std 0.01), per model.
    assert (
        "mlp: accuracy 0.950 ± 0.010 vs 0.950 ± 0.010 (Δ +0.000"
        in acc["measured (mean ± std over seeds)"]
    )
    cal = rows["PFP matches SVI in calibration"]
    assert cal["verdict"].startswith("partly") and "3 of 4 checks pass" in cal["verdict"]
    assert "ECE 0.080 ± 0.000 vs 0.050 ± 0.000 (Δ +0.030" in cal["measured (mean ± std over seeds)"]
    var = rows["PFP's own OOD score (mean logit variance) is as good as SVI's mutual information"]
    assert (
        var["verdict"] == "holds"
        and "0.910 ± 0.000 vs 0.880 ± 0.000" in var["measured (mean ± std over seeds)"]
    )
    speed = rows["PFP is much faster than SVI with 100 samples"]
    assert speed["verdict"] == "holds"
    measured = speed["measured (mean ± std over seeds)"]
    assert "mlp/torch: b1 50x, b10 40x, b1000 20x" in measured
    assert "lenet5/torch_compile: b1 80x, b10 60x, b1000 30x" in measured
    lin = rows["The linearised single pass is much faster than SVI with 100 samples"]
    assert lin["verdict"] == "partly (4 of 6 checks pass)"
    assert rows["The linearised single pass rivals sampling"]["verdict"] == "holds"


def test_page_has_seed_table_claims_and_plots(store: Path, tmp_path: Path) -> None:
    text, figures = report.build("paper", _runs(store))
    assert (
        "## Accuracy, calibration and OOD detection, over seeds" in text
        and "## Claims against measurements" in text
    )
    assert "| pfp-torch | lenet5 | 3 | 0.950 ± 0.010 |" in text
    assert "Quality claims read 3 seed(s) per configuration" in text
    for model in ("mlp", "lenet5"):
        assert f"speedup_grid_{model}.png" in figures and f"cost_{model}.png" in figures
    grid = figures["speedup_grid_mlp.png"]
    assert [ax.get_title() for ax in grid.axes] == ["torch", "torch_compile"]


def test_seed_groups_leave_out_seed_and_timing_settings() -> None:
    import pandas as pd

    runs = pd.DataFrame(
        {
            "status": ["FINISHED"] * 4,
            "params.seed": ["0", "1", "2", "0"],
            "params.batch_sizes": ["[1, 10]", "[10]", "[10]", "[10]"],
            "params.timing.rounds": ["5", "3", "3", "3"],
            "params.method.name": ["svi", "svi", "svi", "pfp"],
            "metrics.cls/acc": [0.9, 0.92, 0.94, 0.5],
        }
    )
    groups = stats.seed_groups(runs)
    assert [len(g) for g in groups] == [3, 1]
    mean, std, n = stats.mean_std(stats.column(groups[0], "cls/acc"))
    assert (round(mean, 6), round(std, 6), n) == (0.92, 0.02, 3)
    assert stats.fmt(mean, std, n) == "0.920 ± 0.020"
    assert stats.fmt(*stats.mean_std([0.5])) == "0.500"
    assert stats.fmt(*stats.mean_std([float("nan")])) == "-"


def _rgb(colour) -> tuple[float, ...]:
    return tuple(round(c, 4) for c in matplotlib.colors.to_rgb(colour))


def test_speedup_grid_one_panel_per_backend_same_colour_per_method() -> None:
    colours = plots.palette(["svi", "pfp", "ensemble"])
    assert colours == plots.palette(["ensemble", "pfp", "svi"])  # order-free
    assert len({_rgb(c) for c in colours.values()}) == 3
    curves = {
        "tvm": {"pfp": {1: 100.0, 10: 50.0}, "svi": {1: 1.0, 10: 1.0}},
        "torch": {"pfp": {1: 40.0, 10: 20.0}, "ensemble": {1: 5.0, 10: 4.0}},
    }
    fig = plots.speedup_grid(curves, colours)
    assert [ax.get_title() for ax in fig.axes] == ["torch", "tvm"]
    for ax in fig.axes:
        for line in ax.get_lines()[: -0 or None]:
            if line.get_label() in colours:
                assert _rgb(line.get_color()) == _rgb(colours[line.get_label()])
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"ensemble", "pfp", "svi"}


def test_quality_vs_cost_marks_the_pareto_front() -> None:
    assert plots.pareto_front([1.0, 2.0, 3.0, 0.5], [0.8, 0.9, 0.85, 0.7], higher=True) == [
        3,
        0,
        1,
    ]
    assert plots.pareto_front([1.0, 2.0], [0.3, 0.2], higher=False) == [0, 1]
    points = [
        {"method": "pfp", "backend": "tvm", "latency_ms": 0.1, "AUROC": 0.9, "NLL": 0.3},
        {"method": "svi", "backend": "torch", "latency_ms": 10.0, "AUROC": 0.92, "NLL": 0.2},
        {"method": "svi", "backend": "tvm", "latency_ms": 20.0, "AUROC": 0.92, "NLL": 0.25},
    ]
    colours = plots.palette(["pfp", "svi"])
    fig = plots.quality_vs_cost(points, {"AUROC": True, "NLL": False}, colours, batch=10)
    assert len(fig.axes) == 2
    auroc = fig.axes[0]
    named = {t.get_text() for t in auroc.texts}
    assert named == {"pfp/tvm", "svi/torch"}  # svi/tvm is dominated by svi/torch
    assert auroc.get_xscale() == "log" and "batch 10" in auroc.get_xlabel()
    faces = {_rgb(c.get_facecolor()[0]) for c in auroc.collections}
    assert faces == {_rgb(colours["pfp"]), _rgb(colours["svi"])}


def test_uncertainty_scatter_panel_per_run_colour_per_split() -> None:
    rng = np.random.default_rng(0)
    parts = {
        name: {
            split: (rng.random(1000), rng.random(1000))
            for split in ("clean", "ambiguous", "ood_fashion")
        }
        for name in ("svi", "pfp", "ensemble")
    }
    fig = plots.uncertainty_scatter(parts, per_split=300)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["svi", "pfp", "ensemble"]
    for ax in visible:
        assert [len(c.get_offsets()) for c in ax.collections] == [300, 300, 300]
        colours = [_rgb(c.get_facecolor()[0]) for c in ax.collections]
        assert len(set(colours)) == 3
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "clean", "ambiguous", "ood_fashion"
    ]  # fmt: skip


def test_paper_preset_composes_the_study() -> None:
    """The grid the issue asks for: 8 methods x 2 models x (3 quality seeds + 3 speed
    backends), the MLP 784-100-100-10, the reference trained like SVI (one cache entry)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=paper"], return_hydra_config=True)
        tvm = compose(
            "config",
            overrides=[
                "+experiment=paper", "experiment/paper_part=tvm",
                "experiment/paper_method=linearised", "model=lenet5",
            ],
        )  # fmt: skip
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert len(params["experiment/paper_method"].split(",")) == 8
    assert params["model"] == "mlp,lenet5"
    assert len(params["experiment/paper_part"].split(",")) == 6
    assert cfg.dataset.name == "dirty_mnist" and list(cfg.model.hidden) == [100, 100]
    assert cfg.method.fit == cfg.reference.method.fit  # SVI and the reference share training
    assert tvm.backend.name == "tvm" and list(tvm.batch_sizes) == [1, 10, 100, 1000]
    assert tvm.method.base.fit == cfg.method.fit  # the linearised pass reads SVI's entry
    assert (CONF / "claims" / "paper.yaml").exists()

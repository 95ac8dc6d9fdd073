"""`bnn-harness report` on a real SQLite MLflow store: pages, plots and the summary run."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness import cli, registry, report, runner
from harness.api import HarnessError
from harness.config import TrackingConfig
from tests.conftest import CONF


def _tracking(root: Path) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", artifacts=f"{root}/artifacts")


def _tags(preset: str, sweep: str) -> dict[str, str]:
    return {"preset": preset, "sweep_id": sweep, "role": "job"}


def _png(path: Path) -> tuple[int, ...]:
    return matplotlib.image.imread(path).shape


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real jobs of one sweep (MC dropout reuses the MAP net) after an older sweep."""
    from tests.conftest import FAST, store_overrides

    root = tmp_path_factory.mktemp("store")
    reg = registry.default()
    _log(root, "deterministic-torch", _tags("calib", "old") | {"method": "x"}, {"cls/acc": 0.1})
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):

        def cfg(*extra: str):
            return compose("config", overrides=[*FAST, *store_overrides(root), *extra])

        for method in ("deterministic", "mc_dropout"):
            runner.run(cfg(f"method={method}"), reg, _tags("calib", "new"))
    return root


def test_page_tables_and_plots_from_real_runs(real_store: Path, tmp_path: Path) -> None:
    tracking = _tracking(real_store)
    written = report.write_reports(tracking, tmp_path, "calib")
    page = (tmp_path / "calib.md").read_text()
    runs = report.preset_runs(tracking, "calib")
    assert list(runs["tags.mlflow.runName"]) == ["deterministic-torch", "mc_dropout-torch"]
    assert set(runs["tags.sweep_id"]) == {"new"}  # the newest sweep only
    for _, run in runs.iterrows():
        name = run["tags.mlflow.runName"]
        row = next(line for line in page.splitlines() if f"| {name} |" in line)
        assert f"{run['metrics.cls/acc']:.4g}" in row and f"{run['metrics.cal/ece']:.4g}" in row
    assert "ambiguous (tot/ale/epi)" in page and "ood_patches (tot/ale/epi)" in page
    assert "b4 speedup" in page
    for name in ("reliability.png", "entropy.png", "speedup_grid.png", "aleatoric_epistemic.png"):
        assert tmp_path / "calib" / name in written
        assert f"](calib/{name})" in page
        height, width, _ = _png(tmp_path / "calib" / name)
        assert height > 100 and width > 100
    # Per-sample entropies come from each run's uncertainty.npz, one value per sample.
    hists = report.entropies(runs)
    assert set(hists) == {"deterministic", "mc_dropout"}
    assert set(hists["mc_dropout"]) == {"clean", "ambiguous", "ood_patches", "ood_noise"}
    assert all(v.ndim == 1 and v.size > 50 for v in hists["mc_dropout"].values())
    assert float(hists["deterministic"]["ood_noise"].mean()) > float(
        hists["deterministic"]["clean"].mean()
    )
    diagram = report.reliability_diagrams(runs)["mc_dropout"]
    assert sum(diagram["count"]) == len(np.asarray(hists["mc_dropout"]["clean"]))


def test_summary_run_holds_the_page_and_is_not_a_job(real_store: Path, tmp_path: Path) -> None:
    tracking = _tracking(real_store)
    report.write_reports(tracking, tmp_path / "a", "calib")
    report.write_reports(tracking, tmp_path / "b", "calib")  # reports are not read as jobs
    assert (tmp_path / "a" / "calib.md").read_text() == (tmp_path / "b" / "calib.md").read_text()
    mlflow.set_tracking_uri(tracking.uri)
    summaries = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.role = 'report'"
    )
    assert len(summaries) >= 2 and set(summaries["tags.report_of"]) == {"new"}
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(summaries["run_id"].iloc[0])}
    assert {"calib.md", "reliability.png", "entropy.png", "speedup_grid.png"} <= names
    assert report.presets(tracking) == ["calib"]


def _log(root: Path, name: str, tags: dict[str, str], metrics: dict[str, float]) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    with mlflow.start_run(run_name=name, tags=tags):
        mlflow.log_metrics(metrics)


def test_bit_width_and_batch_sweeps_become_curves(tmp_path: Path) -> None:
    """Logged runs with known values: float runs join every quantizer's line at 32 bits,
    and runs that swept `batch_size` one by one merge into one speedup curve."""
    base = {"preset": "q", "sweep_id": "s", "role": "job", "method": "svi", "backend": "torch"}
    for quant, bits, acc in [("none", 32, 0.97), ("vpq", 4, 0.90), ("vpq", 8, 0.96)]:
        tags = base | {"quant": quant, "bits": str(bits), "dataset": "dirty_digits"}
        metrics = {"cls/acc": acc, "ood/auroc_entropy": acc - 0.1, "mem/param_bytes": bits * 100}
        _log(tmp_path, f"svi-torch-{quant}{bits}", tags, metrics)
    for b, speedup in [(1, 40.0), (100, 3.0)]:
        tags = base | {"method": "pfp", "quant": "none", "bits": "32", "dataset": "dirty_digits"}
        _log(tmp_path, f"pfp-torch-b{b}", tags, {f"speedup/b{b}": speedup, f"lat/b{b}_ms": 1.0})
    runs = report.preset_runs(_tracking(tmp_path), "q")
    series = report.bits_series(runs)
    assert series["accuracy"]["svi-vpq"] == {4: 0.90, 8: 0.96, 32: 0.97}
    assert series["parameter bytes"]["svi-vpq"] == {4: 400, 8: 800, 32: 3200}
    assert report.speedup_curves(runs)["pfp-torch"] == {1: 40.0, 100: 3.0}
    report.write_reports(_tracking(tmp_path), tmp_path / "out", "q")
    page = (tmp_path / "out" / "q.md").read_text()
    assert "## By bit width" in page and "| svi-vpq | 4 | 0.9 |" in page
    assert (tmp_path / "out" / "q" / "bits.png").exists()
    assert (tmp_path / "out" / "q" / "speedup_grid.png").exists()


def test_emulated_latency_stays_in_its_own_table(tmp_path: Path) -> None:
    """A run on the emulated board never reaches the speed table or a speedup."""
    base = {"preset": "e", "sweep_id": "s", "role": "job", "method": "pfp", "quant": "none"}
    _log(tmp_path, "pfp-tvm", base | {"backend": "tvm"}, {"lat/b1_ms": 0.05, "speedup/b1": 2000})
    arm = base | {"backend": "tvm_arm", "device": "emulated"}
    _log(tmp_path, "pfp-tvm_arm", arm, {"lat_emulated/b1_ms": 25.6})
    runs = report.preset_runs(_tracking(tmp_path), "e")
    assert [r["run"] for r in report.latency_rows(runs)] == ["pfp-tvm"]
    assert report.emulated_rows(runs) == [
        {"run": "pfp-tvm_arm", "device": "emulated", "b1 ms": 25.6}
    ]
    assert list(report.speedup_curves(runs)) == ["pfp-tvm"]
    report.write_reports(_tracking(tmp_path), tmp_path / "out", "e")
    page = (tmp_path / "out" / "e.md").read_text()
    speed, emulated = page.split("## Latency and speedup")[1].split("## Latency under emulation")
    assert "pfp-tvm_arm" in emulated and "pfp-tvm_arm" not in speed


def test_unknown_preset_is_one_line_naming_the_known(
    real_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = _tracking(real_store).uri
    code = cli.main(["report", "--experiment", "nope", "--uri", uri, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == f"error: no runs of preset 'nope' in {uri}; presets: calib"
    with pytest.raises(HarnessError, match="--sweep needs --experiment"):
        report.write_reports(_tracking(real_store), tmp_path, None, "new")
    with pytest.raises(HarnessError, match="has no sweep 'gone'"):
        report.write_reports(_tracking(real_store), tmp_path, "calib", "gone")


@pytest.mark.parametrize("preset", ["speedup", "calibration"])
def test_presets_sweep_installed_plugins(preset: str) -> None:
    """Every method and backend a preset sweeps has a config entry and an installed plugin."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.tracking.experiment == preset
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    reg = registry.default()
    for group in ("method", "backend"):
        for name in str(params.get(group, cfg[group].name)).split(","):
            assert (CONF / group / f"{name}.yaml").exists(), f"{group}/{name}.yaml"
            reg.get(group, name)


def test_a_resumed_sweep_that_reused_every_job_is_the_newest() -> None:
    """Parts run as separate sweeps, then the whole preset resumed: the last sweep runs no
    job of its own, and the report must still read it (every part's runs), not the newest
    part."""
    from harness.summary import select_sweep

    rows = [  # newest first, as MLflow returns them
        ("whole", "sweep", "FINISHED", "", "a1,b1"),
        ("b", "job", "FINISHED", "b1", ""),
        ("b", "sweep", "FINISHED", "", ""),
        ("a", "job", "FINISHED", "a1", ""),
        ("a", "sweep", "FINISHED", "", ""),
    ]
    runs = pd.DataFrame(
        rows, columns=["tags.sweep_id", "tags.role", "status", "run_id", "tags.reused_runs"]
    )
    assert sorted(select_sweep(runs)["run_id"]) == ["a1", "b1"]
    assert list(select_sweep(runs, include_unfinished=True)["run_id"]) == ["a1", "b1"]

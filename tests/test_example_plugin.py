"""The example third-party package, installed with pip and found through its entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import FAST, cli_env, store_overrides
from tests.test_cli import bnn

OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index"]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bnn-harness-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `pip install` of the example into its own folder (the shared venv stays as is);
    no network: no dependencies (bnn-harness is here) and no isolated build environment."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # pip builds in the source tree (build/, *.egg-info): build a copy, not the checkout.
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    source = shutil.copytree(EXAMPLE, build / "src", ignore=skip)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", *OFFLINE, "-t", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env() | {"TMPDIR": str(build), "PIP_NO_CACHE_DIR": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert (target / "bnn_harness_example" / "conf" / "experiment" / "moons.yaml").exists()
    return target


def test_installed_example_is_listed_with_its_package(site: Path) -> None:
    out = bnn("plugins", env=cli_env() | {"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("temperature" in ln and "[bnn-harness-example]" in ln for ln in lines)
    assert any("two_moons" in ln and "[bnn-harness-example]" in ln for ln in lines)
    assert "failed to load" not in out.stdout


@pytest.mark.slow
def test_example_preset_sweeps_its_method_and_dataset(site: Path, tmp_path: Path) -> None:
    """`+experiment=moons` comes from the package's own config tree; temperature scaling
    keeps every prediction of the MAP network it shares through the cache."""
    out = bnn(
        "run",
        "+experiment=moons",
        *FAST,
        "method.fit.epochs=20",
        *store_overrides(tmp_path),
        f"hydra.sweep.dir={tmp_path}/sweep",
        env=cli_env() | {"PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moons"], filter_string="tags.role = 'job'")
    by = runs.set_index("tags.method")
    assert set(by.index) == {"deterministic", "temperature"}
    assert set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.dataset"]) == {"two_moons"}
    assert set(runs["tags.preset"]) == {"moons"}
    assert by.loc["temperature", "metrics.fit/cached"] == 0.0
    assert len(list((tmp_path / "cache").glob("deterministic-*"))) == 1  # one MAP net, shared
    assert by.loc["temperature", "metrics.cls/acc"] == by.loc["deterministic", "metrics.cls/acc"]
    assert by.loc["deterministic", "metrics.cls/acc"] > 0.8
    # Fitted on validation NLL, the temperature does not make test NLL much worse.
    nll = by["metrics.cal/nll"]
    assert nll["temperature"] < nll["deterministic"] + 0.05

"""A real install: the built wheel (not the editable checkout) in a fresh venv outside the
repository runs `bnn-harness plugins`, a job and a preset from a folder of its own.

The fresh venv gets the wheel only (`--no-deps`); its dependencies (torch, MLflow, ...) come
from this environment's site-packages through a `.pth` line, which adds them to sys.path
but runs none of their `.pth` files, so the editable install of the checkout stays out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import mlflow
import pytest

from tests.conftest import FAST, store_overrides

ROOT = Path(__file__).resolve().parent.parent
# What the build reads: the packaging files and the packages' folders.
SOURCES = ["pyproject.toml", "setup.py", "README.md", "harness", "plugins", "hydra_plugins", "conf"]


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{args}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from a copy of the checkout; returns its bin/."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    _run(
        sys.executable,
        *("-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"),
        *("--wheel-dir", dist, src),
        cwd=tmp,
    )
    [wheel] = dist.glob("bnn_harness-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("harness/conf/config.yaml", "harness/conf/experiment/calibration.yaml"):
        assert shipped in names, f"{shipped} is not in the wheel"
    assert not any(n.startswith(("conf/", "tests/")) for n in names)
    # Data files plugins read at run time (checksums, manifests, configs) ship with them.
    for pattern in ("*.sha256", "*.json", "*.yaml"):
        for path in (src / "plugins").rglob(pattern):
            assert path.relative_to(src).as_posix() in names, f"{path.name} is not in the wheel"

    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site.stdout.strip()) / "_bnn_harness_deps.pth").write_text("\n".join(sorted(deps)))
    _run(
        sys.executable,
        *("-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel),
        cwd=tmp,
    )
    return venv / "bin"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working folder outside the checkout, so nothing resolves relative to it."""
    work = tmp_path / "work"
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    return work


@pytest.mark.slow
def test_the_wheel_not_the_checkout_is_imported(installed: Path, elsewhere: Path) -> None:
    probe = (
        "import harness.cli, plugins, hydra_plugins.bnn_harness_searchpath.searchpath as s\n"
        "import importlib.resources as r\n"
        "print(harness.cli.__file__, plugins.__file__, s.__file__)\n"
        "print(r.files('harness.conf') / 'config.yaml')"
    )
    out = _run(installed / "python", "-c", probe, cwd=elsewhere).stdout.split()
    venv = installed.parent.resolve()
    for path in out:
        assert Path(path).resolve().is_relative_to(venv), path
    assert Path(out[-1]).is_file()


@pytest.mark.slow
def test_installed_cli_lists_plugins_and_runs_a_job_and_a_preset(
    installed: Path, elsewhere: Path
) -> None:
    bnn = installed / "bnn-harness"
    listed = _run(bnn, "plugins", cwd=elsewhere).stdout
    for name in ("deterministic", "svi", "torch", "dirty_digits", "mlp", "vpq"):
        assert f"  {name} " in listed, name
    assert "[bnn-harness]" in listed and "failed to load" not in listed

    store = elsewhere / "store"
    common = [*FAST, *store_overrides(store)]
    job = _run(
        bnn, "run", "method=deterministic", *common, f"hydra.run.dir={elsewhere}/run", cwd=elsewhere
    )
    assert "deterministic-torch: acc=" in job.stdout

    # A preset from the wheel's own config tree, its grid cut to two cheap methods.
    preset = _run(
        bnn,
        "run",
        "+experiment=calibration",
        "hydra.sweeper.params.method='deterministic,mc_dropout'",
        *common,
        f"hydra.sweep.dir={elsewhere}/sweep",
        cwd=elsewhere,
    )
    assert "mc_dropout-torch: acc=" in preset.stdout
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["calibration"], filter_string="tags.role = 'job'")
    assert sorted(runs["tags.method"]) == ["deterministic", "mc_dropout"]
    assert set(runs["status"]) == {"FINISHED"} and set(runs["tags.preset"]) == {"calibration"}


INERT = """
import sys
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):  # runs the plugins
    if sys.argv[2:] == ["compose"]:
        compose("config")
print(sorted(m for m in ("torch", "harness.registry", "plugins") if m in sys.modules))
"""


def test_search_path_plugin_is_inert_in_other_hydra_apps(tmp_path: Path) -> None:
    """Another Hydra app in the same environment loads no bnn-harness plugin and no torch;
    bnn-harness's own config tree still gets the plugins' search-path entries."""
    (tmp_path / "config.yaml").write_text("a: 1\n")
    out = _run(sys.executable, "-c", INERT, tmp_path, "compose", cwd=tmp_path)
    assert out.stdout.strip() == "[]"
    ours = _run(sys.executable, "-c", INERT, ROOT / "conf", cwd=tmp_path)
    assert "harness.registry" in ours.stdout

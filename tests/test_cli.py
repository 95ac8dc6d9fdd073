"""The command line as a user runs it: real Hydra sweeps, real store, real UI server."""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import BIN, FAST, cli_env, store_overrides

ROOT = Path(__file__).resolve().parent.parent


def bnn(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None):
    return subprocess.run(
        [str(BIN / "bnn-harness"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or cli_env(),
        timeout=600,
    )


@pytest.mark.slow  # over 10 s: a subprocess sweep or server
def test_multirun_records_failed_job_and_goes_on(tmp_path: Path) -> None:
    out = bnn(
        "run",
        "-m",
        "method=mc_dropout",
        "model.dropout=0,0.1",  # no dropout: fails inside the job, after the base trained
        *FAST,
        *store_overrides(tmp_path),
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert out.returncode == 1, out.stderr
    assert "needs a model with dropout" in out.stderr
    assert "1 job(s) failed" in out.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["bnn-harness"])
    parent = runs[runs["tags.role"] == "sweep"]
    runs = runs[runs["tags.role"] == "job"]
    assert sorted(runs["status"]) == ["FAILED", "FINISHED"]
    assert runs["tags.sweep_id"].nunique() == 1
    assert (runs["tags.mlflow.parentRunId"] == parent["run_id"].item()).all()
    assert "mc_dropout-torch FINISHED" in " ".join(out.stdout.split())  # the summary table


def test_typo_in_key_is_hydras_one_message(tmp_path: Path) -> None:
    out = bnn("run", "method.sampels=3", *store_overrides(tmp_path))
    assert out.returncode != 0
    assert "Key 'sampels' not in 'SVIConfig'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # Hydra's message, as one line
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_method_lists_options(tmp_path: Path) -> None:
    out = bnn("run", "method=bogus", *store_overrides(tmp_path))
    assert out.returncode != 0
    assert "Could not find 'method/bogus'" in out.stderr
    assert "deterministic, ensemble" in out.stderr and "_schema" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "deterministic" in out.stderr and "svi" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_batch_size_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = bnn("run", "batch_size=0", *store_overrides(tmp_path), f"hydra.run.dir={tmp_path}/r")
    assert out.returncode == 1
    assert out.stderr.strip() == "error: batch sizes must be positive integers, got [0]"
    assert not (tmp_path / "mlflow.db").exists()


def test_error_before_any_run_does_not_claim_a_recorded_run(tmp_path: Path) -> None:
    out = bnn(
        "run",
        "tracking.uri=bogus://nowhere",
        f"cache_dir={tmp_path}/c",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.endswith("no MLflow run was written") and "recorded" not in line


def test_plugins_lists_kinds_and_sources() -> None:
    out = bnn("plugins")
    assert out.returncode == 0
    for line in ("methods:", "backends:", "datasets:", "models:", "quantizers:"):
        assert line in out.stdout
    assert "dirty_digits" in out.stdout and "[bnn-harness]" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over 10 s: a subprocess sweep or server
def test_ui_serves_on_localhost(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "bnn-harness"), "ui", "--port", str(port)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("MLflow UI did not answer on 127.0.0.1")
        assert (tmp_path / "results" / "mlflow.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


EXTERNAL = """
import pluggy
import torch
from dataclasses import dataclass
from harness.api import DataBundle, DataSpec

hookimpl = pluggy.HookimplMarker("bnn_harness")


class Blobs:
    name = "blobs"

    def load(self, cfg, seed):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(cfg.classes, 4, generator=g) * 4

        def split(n):
            y = torch.randint(0, cfg.classes, (n,), generator=g)
            return centres[y] + torch.randn(n, 4, generator=g), y

        far = (torch.randn(50, 4, generator=g) * 12, -torch.ones(50, dtype=torch.long))
        return DataBundle(split(300), split(100), split(100), DataSpec((4,), cfg.classes),
                          ood={"far": far})


@hookimpl
def bnn_harness_datasets():
    return [Blobs()]


@hookimpl
def bnn_harness_config_searchpath():
    return ["pkg://blobs_plugin.conf"]
"""


@pytest.mark.slow  # over 10 s: a subprocess sweep or server
def test_third_party_plugin_ships_its_own_config_group(tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "blobs_plugin"
    (pkg / "conf" / "dataset").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(EXTERNAL))
    (pkg / "conf" / "__init__.py").write_text("")
    (pkg / "conf" / "dataset" / "blobs.yaml").write_text("name: blobs\nclasses: 3\n")
    info = tmp_path / "site" / "blobs_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: blobs-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bnn_harness]\nblobs = blobs_plugin\n")
    env = cli_env() | {"PYTHONPATH": str(tmp_path / "site")}
    listed = bnn("plugins", env=env)
    assert "blobs" in listed.stdout and "[blobs-plugin]" in listed.stdout
    out = bnn(
        "run",
        "dataset=blobs",
        "method=deterministic",
        *FAST,
        *store_overrides(tmp_path),
        f"hydra.run.dir={tmp_path}/r",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "deterministic-torch: acc=" in out.stdout

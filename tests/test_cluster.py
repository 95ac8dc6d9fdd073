"""Sweeps beyond one machine, run for real on this one: a Ray head on 127.0.0.1, submitit's
local executor (SLURM's code path without SLURM), and PostgreSQL behind MLflow.

Every service is started here, on loopback and a free port, and stopped by its process id
in a `finally`; the session fixture in conftest fails the run if any process outlives it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from hydra import compose, initialize_config_dir

from harness import concurrency
from tests.conftest import BIN, CONF, FAST, cli_env, store_overrides
from tests.test_cli import bnn

ARTIFACTS = {"config.yaml", "results.json", "reliability.json", "uncertainty.npz"}


def missing(what: str) -> None:
    """CI installs every piece (.ci/run, the `cluster` extra): there a gap fails loudly."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it: .ci/run, pip install -e '.[cluster]')")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_tree(proc: subprocess.Popen, pids: set[int], marker: str = "") -> None:
    """SIGTERM the service, then SIGKILL every process it started that is still there;
    processes re-parented away from it are found by `marker` in their command line."""
    pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if marker:
        for other in psutil.process_iter(["pid", "cmdline"]):
            if marker in " ".join(other.info["cmdline"] or []):
                pids.add(other.info["pid"])
    left = []
    for pid in pids:
        try:
            left.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for child in left:
        child.terminate()
    _, alive = psutil.wait_procs(left, timeout=10)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def ray_head() -> Iterator[str]:
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs (2 workers); its address."""
    ray = BIN / "ray"
    if not ray.exists():
        missing("ray not installed")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="bnnray", dir="/tmp")  # Ray's socket paths must be short
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=100000000",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
        start_new_session=True,
    )  # fmt: skip
    pids: set[int] = set()
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            status = subprocess.run(
                [str(ray), "status", f"--address={address}"],
                capture_output=True, text=True, env=cli_env(), timeout=60,
            )  # fmt: skip
            if status.returncode == 0 and "2.0 CPU" in status.stdout.replace("0.0/", ""):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray head did not start:\n{proc.stdout.read()[-3000:]}")
            time.sleep(2)
        yield address
    finally:
        stop_tree(proc, pids, marker=temp)
        shutil.rmtree(temp, ignore_errors=True)


def sweep_runs(uri: str, experiment: str = "bnn-harness") -> tuple[pd.DataFrame, pd.Series]:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment])
    [parent] = [r for _, r in runs[runs["tags.role"] == "sweep"].iterrows()]
    return runs[runs["tags.role"] == "job"], parent


def check_failure_recorded(jobs: pd.DataFrame, parent: pd.Series) -> pd.DataFrame:
    """patience=2 finishes, patience=0 fails in fit: both are runs of the sweep."""
    patience = jobs["params.method.fit.patience"].astype(int)
    assert set(jobs.loc[patience == 2, "status"]) == {"FINISHED"}
    assert set(jobs.loc[patience == 0, "status"]) == {"FAILED"}
    assert jobs.loc[patience == 0, "tags.error"].str.contains("patience").all()
    assert (jobs["tags.mlflow.parentRunId"] == parent["run_id"]).all()
    assert parent["status"] == "FINISHED"
    done = jobs[jobs["status"] == "FINISHED"]
    assert done["metrics.cls/acc"].between(0.3, 1.0).all()
    return done


@pytest.mark.slow
def test_ray_sweep_on_a_local_head(tmp_path: Path) -> None:
    """Two jobs on a Ray head the test started, in Ray's own worker processes; the failed
    one is a FAILED run and the command exits 1."""
    with ray_head() as address:
        out = bnn(
            "run", "-m", "method=deterministic", "method.fit.patience=2,0",
            "hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}",
            *FAST, *store_overrides(tmp_path), f"hydra.sweep.dir={tmp_path}/sweep",
        )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 job(s) failed" in out.stderr
    jobs, parent = sweep_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(jobs) == 2
    check_failure_recorded(jobs, parent)
    assert set(jobs["tags.launcher"]) == {"ray"}
    assert set(jobs["tags.concurrent_jobs"]) == {"2"}  # 2 jobs, 2 CPUs, 1 CPU each
    assert (tmp_path / "sweep" / "1" / "bnn_harness_failed.txt").exists()


@pytest.mark.slow
def test_submitit_local_jobs_run_as_separate_processes(tmp_path: Path) -> None:
    """SLURM's code path (submitit pickles the job, a fresh Python runs it) without SLURM."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        missing("hydra-submitit-launcher not installed")
    out = bnn(
        "run", "-m", "method=deterministic", "method.fit.patience=2,0",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        *FAST, *store_overrides(tmp_path), f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 job(s) failed" in out.stderr
    jobs, parent = sweep_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(jobs) == 2
    done = check_failure_recorded(jobs, parent)
    assert set(jobs["tags.launcher"]) == {"submitit_local"}
    assert set(jobs["tags.concurrent_jobs"]) == {"2"}  # the local executor starts both
    # Each job ran in its own submitit process, which logged its own id.
    logs = list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len({log.parent.name for log in logs}) == 2
    client = mlflow.MlflowClient()
    for run_id in done["run_id"]:
        assert {a.path for a in client.list_artifacts(run_id)} >= ARTIFACTS


def test_launcher_concurrency_and_one_job_per_machine() -> None:
    """Timing presets get the launcher's own one-per-machine setting unless the command
    line chose one; the tags say how many jobs could share a machine."""

    def cfg(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=True)

    speed = cfg("+experiment=speedup", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4")
    assert concurrency.sweep_size(speed) == 32  # 8 methods x 4 backends
    assert concurrency.one_per_machine(speed) is None  # chosen on the command line: kept
    assert concurrency.launcher_limit(speed) == 4
    default = cfg("+experiment=speedup", "hydra/launcher=joblib")
    assert concurrency.one_per_machine(default) == "hydra.launcher.n_jobs=1"
    assert concurrency.launcher_limit(default) == 1
    slurm = cfg("+experiment=speedup", "hydra/launcher=slurm")
    assert concurrency.launcher_limit(slurm) == 32
    assert (
        concurrency.one_per_machine(slurm) == "hydra.launcher.additional_parameters.exclusive=True"
    )
    assert concurrency.launcher_limit(slurm) == 1
    calib = cfg("+experiment=calibration", "hydra/launcher=joblib")
    assert concurrency.one_per_machine(calib) is None  # no timing claim: parallel is fine
    try:
        assert concurrency.start(calib)[concurrency.CONCURRENT_ENV] == str(
            min(concurrency.launcher_limit(calib), concurrency.sweep_size(calib))
        )
        assert concurrency.job_tags()["launcher"] == "joblib"
    finally:
        concurrency.stop()
    assert concurrency.job_tags() == {"launcher": "basic", "concurrent_jobs": "1"}


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        missing("PostgreSQL server not installed (apt-get install postgresql)")
    if not importlib.util.find_spec("psycopg2"):
        missing("psycopg2 not installed")
    return found[-1].parent


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 in a temp dir; its database URI. As root
    it runs as the `postgres` user (the server refuses root)."""
    bindir = pg_bin()
    root = Path(tempfile.mkdtemp(prefix="bnnpg", dir="/tmp"))
    prefix: list[str] = []
    if os.getuid() == 0:
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "bnn", "--auth=trust", "-E", "UTF8")
    options = f"-k {root} -h 127.0.0.1 -p {port}"
    try:
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            f"{root}/log",
            "-w",
            "start",
        )
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "bnn", "mlflow")
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the extra installs psycopg2.
        yield f"postgresql+psycopg2://bnn@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def counts(uri: str) -> dict[str, int]:
    """Runs, metric values and artifact files of the jobs in the store at `uri`."""
    jobs, _ = sweep_runs(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    metrics = sum(len(client.get_run(r).data.metrics) for r in jobs["run_id"])
    files = sum(len(client.list_artifacts(r)) for r in jobs["run_id"])
    return {"runs": len(jobs), "metrics": metrics, "artifacts": files}


@pytest.mark.slow
def test_four_parallel_workers_into_postgresql_and_a_server(tmp_path: Path) -> None:
    """Four joblib workers write one PostgreSQL store at once; `bnn-harness server` in front
    of the same database serves every run back; SQLite, the default, still holds a job."""
    with postgres() as uri:
        out = bnn(
            "run", "-m", "method=deterministic", "seed=0,1,2,3",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
            *FAST, f"tracking.uri={uri}", f"tracking.artifacts={tmp_path}/artifacts",
            f"cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/sweep",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        jobs, parent = sweep_runs(uri)
        assert len(jobs) == 4 and set(jobs["status"]) == {"FINISHED"}
        assert sorted(jobs["params.seed"]) == ["0", "1", "2", "3"]
        assert (jobs["tags.mlflow.parentRunId"] == parent["run_id"]).all()
        assert set(jobs["tags.concurrent_jobs"]) == {"4"}
        found = counts(uri)
        keys = [set(mlflow.get_run(r).data.metrics) for r in jobs["run_id"]]
        assert all(k == keys[0] for k in keys) and {"cls/acc", "lat/b1_ms"} <= keys[0]
        client = mlflow.MlflowClient(tracking_uri=uri)
        for run_id in jobs["run_id"]:
            assert {a.path for a in client.list_artifacts(run_id)} >= ARTIFACTS
        assert found == {"runs": 4, "metrics": 4 * len(keys[0]), "artifacts": found["artifacts"]}
        assert found["artifacts"] >= 4 * len(ARTIFACTS)
        print(f"postgresql store, 4 workers: {found}")
        port = free_port()
        server = subprocess.Popen(
            [str(BIN / "bnn-harness"), "server", "--backend-store-uri", uri,
             "--artifacts", str(tmp_path / "served"), "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError("bnn-harness server did not start") from None
                    time.sleep(1)
            served = counts(f"http://127.0.0.1:{port}")
            assert served == found
        finally:
            stop_tree(server, set())
    single = bnn(
        "run", "method=deterministic", "seed=0", *FAST, *store_overrides(tmp_path),
        f"hydra.run.dir={tmp_path}/single",
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = mlflow.search_runs(experiment_names=["bnn-harness"], output_format="list")
    assert set(run.data.metrics) == keys[0]
    assert run.data.tags["launcher"] == "basic" and run.data.tags["concurrent_jobs"] == "1"


def test_report_warns_when_timings_came_from_concurrent_jobs() -> None:
    from harness.report import concurrency_warning

    runs = pd.DataFrame(
        {"tags.concurrent_jobs": ["1", "4", None], "tags.launcher": ["basic", "joblib", None]}
    )
    [warning, _] = concurrency_warning(runs)
    assert "1 of 3 jobs" in warning and "up to 4" in warning and "joblib" in warning
    assert concurrency_warning(runs.iloc[[0, 2]]) == []
    assert concurrency_warning(pd.DataFrame({"status": ["FINISHED"]})) == []

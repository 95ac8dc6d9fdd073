"""A real sweep killed mid-way, then rerun: each job runs exactly once to FINISHED.

The sweep runs in its own process, as a user's would, and is stopped by a real signal
once its first job is FINISHED in the store; nothing here calls the handlers directly.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from harness import cli
from tests.conftest import BIN, FAST, cli_env, store_overrides
from tests.test_cli import ROOT, bnn

SEEDS = "0,1,2,3"


def _sweep(tmp_path: Path, sweep_dir: str) -> list[str]:
    return [
        "run",
        "-m",
        f"seed={SEEDS}",
        "method=deterministic",
        *FAST,
        *store_overrides(tmp_path),
        f"hydra.sweep.dir={tmp_path}/{sweep_dir}",
    ]


def _runs(tmp_path: Path) -> pd.DataFrame:
    if not (tmp_path / "mlflow.db").exists():
        return pd.DataFrame()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["bnn-harness"])


def _jobs(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty or "tags.role" not in runs:
        return runs
    return runs[runs["tags.role"] == "job"]


def _finished_jobs(tmp_path: Path) -> int:
    """Read with sqlite3, not MLflow: opening the store through MLflow while the sweep
    creates it would race its schema migrations."""
    try:
        with closing(sqlite3.connect(tmp_path / "mlflow.db", timeout=30)) as db:
            [(count,)] = db.execute(
                "SELECT count(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                "WHERE t.key = 'role' AND t.value = 'job' AND r.status = 'FINISHED'"
            ).fetchall()
    except sqlite3.OperationalError:  # no store or no tables yet
        return 0
    return count


def _kill_after_first_job(tmp_path: Path, signum: int) -> subprocess.CompletedProcess:
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(BIN / "bnn-harness"), *_sweep(tmp_path, "first")],
            cwd=ROOT,
            env=cli_env(),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if _finished_jobs(tmp_path):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no job finished before the sweep ended: {err.read_text()}")
        time.sleep(2.0)  # into the next job (it may still be opening its run: both are checked)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_sweep_is_marked_and_resumes_without_rerunning(
    tmp_path: Path, signum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    killed = _kill_after_first_job(tmp_path, signum)
    assert killed.returncode == 128 + signum, killed.stderr
    name = signal.Signals(signum).name
    [line] = [x for x in killed.stderr.splitlines() if x.startswith("interrupted")]
    assert line.startswith(f"interrupted by {name}: marked sweep run")
    assert "Traceback" not in killed.stderr

    runs = _runs(tmp_path)
    [parent] = runs[runs["tags.role"] == "sweep"].itertuples()
    assert parent.status == "KILLED"
    jobs = _jobs(runs)
    done_before = set(jobs.loc[jobs["status"] == "FINISHED", "tags.config_hash"])
    assert 1 <= len(done_before) < 4
    assert "RUNNING" not in set(jobs["status"])  # the job that was running ended KILLED
    assert set(jobs["status"]) <= {"FINISHED", "KILLED"}

    # The killed sweep is not "the newest" for the table unless asked.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    capsys.readouterr()
    assert cli.main(["table", "--uri", uri]) == 0
    assert "no finished sweep" in capsys.readouterr().out
    assert cli.main(["table", "--uri", uri, "--include-unfinished"]) == 0
    assert "FINISHED" in capsys.readouterr().out

    again = bnn(*_sweep(tmp_path, "second"))
    assert again.returncode == 0, again.stderr
    skipped = [x for x in again.stdout.splitlines() if "skipped: already FINISHED as run" in x]
    assert len(skipped) == len(done_before)
    assert f"{len(done_before)} job(s) skipped" in again.stdout

    runs = _runs(tmp_path)
    jobs = _jobs(runs)
    finished = jobs[jobs["status"] == "FINISHED"]
    per_config = finished.groupby("tags.config_hash").size()
    assert len(per_config) == 4 and (per_config == 1).all()  # each job once, none twice
    assert sorted(finished["params.seed"]) == ["0", "1", "2", "3"]
    parents = runs[runs["tags.role"] == "sweep"].set_index("status")
    resumed = parents.loc["FINISHED"]
    assert resumed["tags.skipped_jobs"] == str(len(done_before))
    assert len(resumed["tags.reused_runs"].split(",")) == len(done_before)

    # The resumed sweep is now the newest finished one, with the reused runs as its own.
    capsys.readouterr()
    assert cli.main(["table", "--uri", uri]) == 0
    assert capsys.readouterr().out.count("deterministic-torch FINISHED") == 4

    # resume=false reruns a job that is already done.
    forced = bnn(
        *_sweep(tmp_path, "third")[:2], "seed=0", *_sweep(tmp_path, "third")[4:], "resume=false"
    )
    assert forced.returncode == 0, forced.stderr
    assert "skipped" not in forced.stdout
    seeds = _jobs(_runs(tmp_path)).query("status == 'FINISHED'")["params.seed"]
    assert sorted(seeds) == ["0", "0", "1", "2", "3"]

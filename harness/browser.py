"""The MLflow UI as people see it: a local `mlflow server` read by headless Chromium.

MLflow's UI is a React app, so the page only holds runs and metrics after its scripts
have fetched them; Chromium's `--virtual-time-budget` lets the page settle before the
DOM or a screenshot is taken, with no driver package. Used by the browser test and to
regenerate results/mlflow_ui.png (`python -m harness.browser`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.api import HarnessError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    return next((p for name in CHROMIUM_NAMES if (p := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(uri: str, timeout_s: float = 180) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 against `uri`; yields its base URL, stops it after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = ["server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *serve, "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield _wait(proc, log, base, timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait(proc: subprocess.Popen, log: Any, base: str, timeout_s: float) -> str:
    """The base URL once /health answers; the server's own output if it dies first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                if reply.status == 200:
                    return base
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise HarnessError(f"mlflow server did not answer on {base} in {timeout_s}s")
        time.sleep(0.5)
    log.seek(0)
    raise HarnessError(f"mlflow server exited: {log.read().decode()[-2000:]}")


def _chromium(url: str, action: str, budget_ms: int) -> str:
    exe = chromium()
    if exe is None:
        raise HarnessError("chromium is not installed (Debian: apt-get install chromium)")
    args = [exe, *FLAGS, f"--virtual-time-budget={budget_ms}", "--window-size=1600,1100"]
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no stored UI state
        out = subprocess.run(
            [*args, f"--user-data-dir={profile}", action, url],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
    return out.stdout


def render(url: str, screenshot: Path | None = None, budget_ms: int = 30000) -> str:
    """The page's DOM after its scripts ran; with `screenshot`, also a PNG of it."""
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        _chromium(url, f"--screenshot={screenshot.resolve()}", budget_ms)
    return _chromium(url, "--dump-dom", budget_ms)


def runs_url(base: str, experiment_id: str, filter_string: str, order_by: str) -> str:
    """The runs page as charts of every metric. A filter plus a sort other than by date is
    what makes MLflow list child runs flat instead of folded under their sweep."""
    query = urllib.parse.urlencode(
        {
            "searchFilter": filter_string,
            "orderByKey": order_by,
            "orderByAsc": "false",
            "compareRunsMode": "CHART",
        }
    )
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(str(list(run_ids)).replace("'", '"'))
    exps = urllib.parse.quote(f'["{experiment_id}"]')
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from harness.config import TrackingConfig
    from harness.tracking import store_uri

    parser = argparse.ArgumentParser(description="screenshot an experiment in the MLflow UI")
    parser.add_argument("--experiment", default="calibration", help="MLflow experiment name")
    parser.add_argument("--uri", default=None, help="tracking URI (default: results/mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("results/mlflow_ui.png"))
    parser.add_argument(
        "--budget-ms", type=int, default=120000, help="virtual time the page gets to settle"
    )
    args = parser.parse_args(argv)
    uri = store_uri(TrackingConfig() if args.uri is None else TrackingConfig(uri=args.uri))
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(args.experiment)
    if found is None:
        print(f"error: no MLflow experiment '{args.experiment}' in {uri}", file=sys.stderr)
        return 1
    with mlflow_server(uri) as base:
        url = runs_url(base, found.experiment_id, "tags.role = 'job'", "metrics.`cls/acc`")
        render(url, screenshot=args.out, budget_ms=args.budget_ms)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`bnn-harness server`: one MLflow tracking server for sweeps that run on many machines.

The default store, a SQLite file, is right for one machine: parallel jobs wait for its
lock and retry. Workers on other machines must not share that file over a network file
system (its locking is not safe there); they send their runs to a tracking server
instead, which keeps them in a database (PostgreSQL) and their artifacts under one root
that it serves itself (`--artifacts-destination`), so workers need no shared folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.api import HarnessError

DEFAULT_ARTIFACTS = "results/mlartifacts-server"


def command(
    backend_store_uri: str,
    artifacts: str = DEFAULT_ARTIFACTS,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int | None = None,
) -> list[str]:
    """The `mlflow server` line: runs, params and metrics in the database; artifacts proxied
    by the server (clients log to `mlflow-artifacts:/`, the server writes `artifacts`)."""
    if not backend_store_uri.startswith(("postgresql", "mysql", "sqlite", "mssql")):
        raise HarnessError(
            f"--backend-store-uri {backend_store_uri!r} is not a database URI; give e.g. "
            "postgresql://user@host:5432/mlflow (or sqlite:///path.db for one machine)"
        )
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    line = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts,
        "--default-artifact-root",
        "mlflow-artifacts:/",
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if workers is not None:
        line += ["--workers", str(workers)]
    return line


def serve(backend_store_uri: str, artifacts: str, host: str, port: int, workers: int | None) -> int:
    """Replace this process by the server, so a signal stops the server itself."""
    line = command(backend_store_uri, artifacts, host, port, workers)
    print(f"MLflow tracking server on http://{host}:{port} (store {backend_store_uri})")
    if host != "127.0.0.1":
        print("jobs on other machines: tracking.uri=http://<this host>:" + str(port))
    sys.stdout.flush()
    os.execv(line[0], line)
    return 0

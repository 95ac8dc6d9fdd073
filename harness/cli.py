"""`bnn-harness`: run (Hydra), plugins, table, report, ui."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
FAILED: list[str] = []


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness import registry, runner, summary
    from harness.api import HarnessError

    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode == RunMode.RUN
    tags = summary.job_tags(hydra_cfg.runtime.choices.get("experiment"))
    marker = Path(hydra_cfg.runtime.output_dir) / summary.FAILURE_MARKER
    marker.unlink(missing_ok=True)  # left by an earlier sweep into the same folder
    try:
        results = runner.run(cfg, registry.default(), tags)
    except HarnessError as err:
        FAILED.append(f"error: {err}")
    except Exception as err:
        FAILED.append(
            f"error: job failed ({type(err).__name__}: {err}); recorded as a FAILED MLflow run"
        )
    else:
        acc, ece = results.get("cls/acc", float("nan")), results.get("cal/ece", float("nan"))
        print(f"{runner.run_name(cfg)}: acc={acc:.4f} ece={ece:.4f}")
        return
    print(FAILED[-1], file=sys.stderr)
    if single:
        raise SystemExit(1)
    # Parallel launchers run this in a worker whose FAILED list the launcher never sees;
    # a marker in the job's folder is counted by the sweep's end callback instead.
    marker.write_text(FAILED[-1])


def run(overrides: list[str]) -> int:
    import hydra

    from harness import config, registry, summary

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    config.register(registry.default())
    sys.argv = ["bnn-harness run", *overrides]
    hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")(_task)()
    failed = max(len(FAILED), len(summary.FAILURES))
    if failed:
        print(f"{failed} job(s) failed", file=sys.stderr)
        return 1
    return 0


def plugins() -> int:
    from harness import registry

    reg = registry.default()
    for kind in registry.KINDS:
        print(f"{kind}s:")
        for name, (_, source) in sorted(reg.plugins(kind).items()):
            print(f"  {name:<16} {source}")
    for entry, error in reg.failures.items():
        print(f"failed to load {entry}: {error}")
    return 0


def show_table(sweep: str | None) -> int:
    from harness import summary
    from harness.config import TrackingConfig

    print(summary.table(summary.runs_of(TrackingConfig(), sweep)))
    return 0


def report(experiment: str | None, uri: str | None, out: Path, sweep: str | None) -> int:
    from harness import report as reporting
    from harness.api import HarnessError
    from harness.config import TrackingConfig

    tracking = TrackingConfig() if uri is None else TrackingConfig(uri=uri)
    try:
        written = reporting.write_reports(tracking, out, experiment, sweep)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def ui(port: int) -> int:
    from harness.config import TrackingConfig
    from harness.tracking import store_uri

    uri = store_uri(TrackingConfig())
    print(f"MLflow UI on http://127.0.0.1:{port} (store {uri})")
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return run(argv[1:])
    parser = argparse.ArgumentParser(prog="bnn-harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a job or sweep; Hydra overrides follow (see --help)")
    sub.add_parser("plugins", help="list installed plugins by kind with their source package")
    table = sub.add_parser("table", help="print the compact table of a sweep (default: newest)")
    table.add_argument("--sweep", default=None)
    rep = sub.add_parser(
        "report", help="write results/<preset>.md and PNG plots from the runs in MLflow"
    )
    rep.add_argument(
        "--experiment", default=None, help="preset name (+experiment=NAME); default: every preset"
    )
    rep.add_argument("--sweep", default=None, help="sweep id (default: the preset's newest)")
    rep.add_argument("--uri", default=None, help="MLflow tracking URI (default: results/mlflow.db)")
    rep.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    ui_cmd = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the local store")
    ui_cmd.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.command == "plugins":
        return plugins()
    if args.command == "table":
        return show_table(args.sweep)
    if args.command == "report":
        return report(args.experiment, args.uri, args.out, args.sweep)
    return ui(args.port)


if __name__ == "__main__":
    raise SystemExit(main())

"""`bnn-harness`: run (Hydra), plugins, table, report, ui, server, cache."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

# The config tree ships as the package harness.conf (conf/ in the repository, mapped by
# setup.py), so a wheel finds it as well as an editable install.
CONF = "pkg://harness.conf"
FAILED: list[str] = []


def one_line(text: str) -> str:
    """A multi-line message (Hydra's, a library's) as one line: an indented list after a
    line ending in ':' becomes 'a, b' (schema entries left out: nobody selects them), and
    Hydra's search-path dump is dropped."""
    parts: list[str] = []
    listing = False
    for raw in str(text).splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line or (listing and line.endswith("_schema")):
            continue
        if listing and raw[:1] in ("\t", " "):
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        if parts and not parts[-1].endswith((".", ":", ";", ",")):
            parts[-1] += ";"
        parts.append(line)
    return " ".join(parts)


def _describe(err: BaseException) -> str:
    """Hydra's message plus the first line of its cause (the OmegaConf error that says why)."""
    message = one_line(str(err))
    cause = one_line(str(err.__cause__).splitlines()[0]) if err.__cause__ is not None else ""
    return f"{message} ({cause})" if cause and cause not in message else message


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness import registry, runner, summary, tracking
    from harness.api import HarnessError

    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode == RunMode.RUN
    tags = summary.job_tags(hydra_cfg.runtime.choices.get("experiment"))
    folder = Path(hydra_cfg.runtime.output_dir)
    marker, skipped = folder / summary.FAILURE_MARKER, folder / summary.SKIP_MARKER
    marker.unlink(missing_ok=True)  # left by an earlier sweep into the same folder
    skipped.unlink(missing_ok=True)
    tracking.created.clear()
    # Sweeps resume by default; one run reruns unless `resume=true` is given.
    resume = (not single) if cfg.get("resume") is None else bool(cfg.resume)
    try:
        with tracking.catch_signals():  # inside a launcher's worker process too
            done = runner.previous_run(cfg) if resume else None
            if done is not None:
                print(f"{runner.run_name(cfg)} skipped: already FINISHED as run {done}")
                if not single:
                    skipped.write_text(done)
                return
            results = runner.run(cfg, registry.default(), tags)
    except HarnessError as err:
        FAILED.append(f"error: {one_line(str(err))}")
    except Exception as err:
        where = (
            "recorded as a FAILED MLflow run" if tracking.created else "no MLflow run was written"
        )
        FAILED.append(f"error: job failed ({type(err).__name__}: {one_line(str(err))}); {where}")
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
    """Exit status: 0, 1 (a job or the config failed), 128 + signal (130 SIGINT, 143 SIGTERM)."""
    import hydra

    from harness import concurrency, config, registry, summary, tracking

    FAILED.clear()
    summary.FAILURES.clear()
    summary.SKIPPED.clear()
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    kept = (summary.SWEEP_ENV, summary.PARENT_ENV, *concurrency.ENV)
    saved = {k: os.environ.get(k) for k in kept}
    # conf/hydra/launcher/ray.yaml extends the Ray plugin's schema of the same name on purpose.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises; its error is printed here, one line
    config.register(registry.default())
    # Hydra's parser takes no flag after an override (`a=1 -m` is an argparse error).
    flags = [o for o in overrides if o in ("-m", "--multirun")]
    sys.argv = ["bnn-harness run", *flags, *[o for o in overrides if o not in flags]]
    try:
        with tracking.catch_signals():
            hydra.main(config_path=CONF, config_name="config", version_base="1.3")(_task)()
    except tracking.Interrupted as stop:
        name = signal.Signals(stop.signum).name
        parent = summary.close_active("KILLED", f"interrupted by {name}")
        marked = [f"sweep run {parent}"] if parent else []
        marked += [f"job run {r}" for r in tracking.created]
        what = f"marked {' and '.join(marked)} KILLED" if marked else "no MLflow run was written"
        print(f"interrupted by {name}: {what}; rerun the command to resume", file=sys.stderr)
        return 128 + stop.signum
    except SystemExit as stop:  # a single job's error (already printed), or --help
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except Exception as err:
        if full_error == "1":
            raise
        message = _describe(err)
        summary.close_active("FAILED", message[:5000])
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        for key, value in [*saved.items(), ("HYDRA_FULL_ERROR", full_error)]:
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    failed = max(len(FAILED), len(summary.FAILURES))
    if failed:
        print(f"{failed} job(s) failed", file=sys.stderr)
        return 1
    return 0


def plugins(reg=None) -> int:
    """Every plugin by kind; those that failed to import or to meet their contract after."""
    from harness import registry
    from harness.api import HarnessError

    reg = reg or registry.default()
    try:
        found = {kind: reg.plugins(kind) for kind in registry.KINDS}
    except HarnessError as err:  # e.g. two plugins of one kind with the same name
        print(f"error: {err}", file=sys.stderr)
        return 1
    for kind, named in found.items():
        print(f"{kind}s:")
        for name, (_, source) in sorted(named.items()):
            print(f"  {name:<16} {source}")
    for entry, error in reg.failures.items():
        print(f"failed to load {entry}: {error}")
    return 0


def show_table(
    experiment: str | None, uri: str | None, sweep: str | None, include_unfinished: bool
) -> int:
    from harness import summary
    from harness.config import TrackingConfig
    from harness.tracking import store_uri

    tracking = TrackingConfig()
    tracking.uri = uri or tracking.uri
    tracking.experiment = experiment or tracking.experiment
    path = store_uri(tracking).removeprefix("sqlite:///")
    if tracking.uri.startswith("sqlite:///") and not Path(path).exists():
        print(f"error: no MLflow store at {path}; pass --uri", file=sys.stderr)
        return 1
    runs = summary.runs_of(tracking, sweep, include_unfinished)
    if runs.empty and sweep is None and not include_unfinished:
        print("no finished sweep (killed or running ones need --include-unfinished)")
        return 0
    print(summary.table(runs))
    return 0


def report(
    experiment: str | None,
    uri: str | None,
    out: Path,
    sweep: str | None,
    include_unfinished: bool = False,
) -> int:
    from harness import report as reporting
    from harness.api import HarnessError
    from harness.config import TrackingConfig

    tracking = TrackingConfig() if uri is None else TrackingConfig(uri=uri)
    try:
        written = reporting.write_reports(tracking, out, experiment, sweep, include_unfinished)
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


def export(out: Path, overrides: list[str]) -> int:
    """Compose the config as `run` does and hand it to the backend's export hook."""
    from hydra import compose, initialize_config_module

    from harness import config, registry, runner
    from harness.api import HarnessError

    reg = registry.default()
    config.register(reg)
    try:
        with initialize_config_module(CONF.removeprefix("pkg://"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        written = runner.export(cfg, reg, out)
    except HarnessError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 1
    for folder in written:
        print(f"wrote {folder}")
    return 0


def arm_sim(action: str) -> int:
    """tools/arm_sim/sim.py of this checkout (a development tool, not part of the package)."""
    script = Path(__file__).resolve().parent.parent / "tools" / "arm_sim" / "sim.py"
    if not script.exists():
        print("error: arm-sim needs a source checkout (tools/arm_sim/sim.py)", file=sys.stderr)
        return 1
    import subprocess

    return subprocess.call([sys.executable, str(script), action])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return run(argv[1:])
    parser = argparse.ArgumentParser(prog="bnn-harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a job or sweep; Hydra overrides follow (see --help)")
    sub.add_parser("plugins", help="list installed plugins by kind with their source package")
    table = sub.add_parser("table", help="print the compact table of a sweep (default: newest)")
    table.add_argument("--experiment", default=None, help="MLflow experiment (bnn-harness)")
    table.add_argument("--uri", default=None, help="MLflow tracking URI (results/mlflow.db)")
    table.add_argument("--sweep", default=None, help="sweep id (default: the newest finished)")
    unfinished = "also pick a sweep that was killed or is still running"
    table.add_argument("--include-unfinished", action="store_true", help=unfinished)
    rep = sub.add_parser(
        "report", help="write results/<preset>.md and PNG plots from the runs in MLflow"
    )
    rep.add_argument(
        "--experiment", default=None, help="preset name (+experiment=NAME); default: every preset"
    )
    rep.add_argument("--sweep", default=None, help="sweep id (default: the preset's newest)")
    rep.add_argument("--uri", default=None, help="MLflow tracking URI (default: results/mlflow.db)")
    rep.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    rep.add_argument("--include-unfinished", action="store_true", help=unfinished)
    ui_cmd = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the local store")
    ui_cmd.add_argument("--port", type=int, default=5000)
    cache_cmd = sub.add_parser("cache", help="list, verify or prune the posterior cache")
    cache_cmd.add_argument("action", choices=("list", "verify", "prune"))
    cache_cmd.add_argument("--dir", type=Path, default=None, help="default: the config's cache_dir")
    cache_cmd.add_argument(
        "--older-than", type=float, default=None, metavar="DAYS", help="prune: also entries older"
    )
    exp = sub.add_parser(
        "export", help="write deployable artefacts (library, manifest, runner) per batch size"
    )
    exp.add_argument("--out", type=Path, required=True, help="output folder")
    exp.add_argument("overrides", nargs="*", help="Hydra overrides, as for run")
    srv = sub.add_parser(
        "server", help="MLflow tracking server on a database, for sweeps on many machines"
    )
    srv.add_argument(
        "--backend-store-uri", required=True, help="postgresql://user@host:5432/mlflow"
    )
    srv.add_argument("--artifacts", default=None, help="artifact root the server writes")
    srv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--workers", type=int, default=None, help="server processes")
    sim = sub.add_parser("arm-sim", help="the emulated aarch64 board (tools/arm_sim, a checkout)")
    sim.add_argument("action", choices=("start", "stop", "status", "build"))
    args = parser.parse_args(argv)
    if args.command == "export":
        return export(args.out, args.overrides)
    if args.command == "server":
        from harness import server
        from harness.api import HarnessError

        try:
            return server.serve(
                args.backend_store_uri,
                args.artifacts or server.DEFAULT_ARTIFACTS,
                args.host,
                args.port,
                args.workers,
            )
        except HarnessError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.command == "arm-sim":
        return arm_sim(args.action)
    if args.command == "cache":
        from harness import cache
        from harness.config import RunConfig

        return cache.command(args.action, args.dir or Path(RunConfig.cache_dir), args.older_than)
    if args.command == "plugins":
        return plugins()
    if args.command == "table":
        return show_table(args.experiment, args.uri, args.sweep, args.include_unfinished)
    if args.command == "report":
        return report(args.experiment, args.uri, args.out, args.sweep, args.include_unfinished)
    return ui(args.port)


if __name__ == "__main__":
    raise SystemExit(main())

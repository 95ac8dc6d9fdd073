"""`bnn-harness report`: the committed results/ pages, rebuilt from what MLflow recorded.

Runs are found by tags alone (`preset`, `sweep_id`, `role`), never by method or backend
name, so a preset that gains a plugin gains its rows and curves with no change here.
Sections and plots appear only when the runs carry the data for them (a sweep over bit
widths gets the bit-width plot; one over batch sizes the speedup plot).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness import claims, plots, stats
from harness.api import HarnessError
from harness.config import TrackingConfig
from harness.summary import PARENT_TAG, ROLE_TAG, only_jobs, select_sweep
from harness.tracking import store_uri, with_retry

MAX_PANELS = 16
QUALITY = {
    "cls/acc": "acc",
    "cal/nll": "nll",
    "cal/brier": "brier",
    "cal/ece": "ece",
    "amb/acc": "amb_acc",
    "ood/auroc_entropy": "auroc_H",
    "ood/auroc_mi": "auroc_MI",
    "ood/auroc_var": "auroc_var",
    "ood/fpr95_entropy": "fpr95_H",
}
BITS_METRICS = {
    "cls/acc": "accuracy",
    "ood/auroc_entropy": "OOD AUROC (entropy)",
    "mem/param_bytes": "parameter bytes",
}


def _tag(run: pd.Series, name: str, default: str = "-") -> str:
    value = run.get(f"tags.{name}")
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def label(run: pd.Series, backend: bool = True) -> str:
    """method-backend-quantBITS, from tags, so runs of any plugin are named alike."""
    parts = [_tag(run, "method")]
    if backend:
        parts.append(_tag(run, "backend"))
    quant = _tag(run, "quant", "none")
    if quant != "none":
        parts.append(f"{quant}{_tag(run, 'bits', '')}")
    return "-".join(parts)


def _search(filter_string: str) -> pd.DataFrame:
    return with_retry(
        lambda: mlflow.search_runs(
            search_all_experiments=True,
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
        )
    )


def presets(tracking: TrackingConfig) -> list[str]:
    """Every preset with recorded jobs (ad-hoc runs carry preset `none` and get no page)."""
    mlflow.set_tracking_uri(store_uri(tracking))
    runs = only_jobs(_search(""))
    if runs.empty or "tags.preset" not in runs:
        return []
    return sorted(p for p in runs["tags.preset"].dropna().unique() if p != "none")


def preset_runs(
    tracking: TrackingConfig,
    preset: str,
    sweep: str | None = None,
    include_unfinished: bool = False,
) -> pd.DataFrame:
    """The jobs of one sweep of `preset` (default: its newest finished sweep), oldest first."""
    if not re.fullmatch(r"[\w.-]+", preset):
        raise HarnessError(f"preset names are letters, digits, '_', '-' or '.', got {preset!r}")
    mlflow.set_tracking_uri(store_uri(tracking))
    found = _search(f"tags.preset = '{preset}'")
    if only_jobs(found).empty:
        known = ", ".join(presets(tracking)) or "none recorded"
        raise HarnessError(f"no runs of preset '{preset}' in {tracking.uri}; presets: {known}")
    chosen = select_sweep(found, sweep, include_unfinished)
    if chosen.empty and sweep is None:
        raise HarnessError(
            f"preset '{preset}' has no finished sweep (a killed or running one is left out); "
            "rerun it to resume, or pass --include-unfinished"
        )
    if chosen.empty:
        raise HarnessError(f"preset '{preset}' has no sweep '{sweep}'")
    return chosen.reset_index(drop=True)


def _metric(run: pd.Series, key: str) -> float:
    value = run.get(f"metrics.{key}")
    return float("nan") if value is None else float(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def distinct(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as shown, repeats dropped: a grid that repeats a float baseline per bit width
    (its quantizer `none` ignores the bits) gives identical rows."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        shown = "|".join(_fmt(v) for v in row.values())
        if shown not in seen:
            seen.add(shown)
            kept.append(row)
    return kept


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "FINISHED"]


def quality_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for _, run in runs.iterrows():
        row: dict[str, Any] = {
            "run": _tag(run, "mlflow.runName"),
            "status": run["status"],
            "dataset": _tag(run, "dataset"),
            "bits": _tag(run, "bits", "32"),
        }
        row |= {short: _metric(run, key) for key, short in QUALITY.items()}
        lo, hi = _metric(run, "ood/auroc_entropy_lo"), _metric(run, "ood/auroc_entropy_hi")
        if math.isfinite(lo) and math.isfinite(hi):
            row["auroc_H 95% CI"] = f"[{lo:.3f}, {hi:.3f}]"
        row["param_KiB"] = _metric(run, "mem/param_bytes") / 1024
        rows.append(row)
    return distinct(rows)


def _splits(runs: pd.DataFrame) -> list[str]:
    found = {
        m.group(1)
        for c in runs.columns
        if (m := re.fullmatch(r"metrics\.unc/(.+)_total", c)) and runs[c].notna().any()
    }
    order = {"test": 0, "ambiguous": 1}
    return sorted(found, key=lambda s: (order.get(s, 2), s))


def uncertainty_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Mean total / aleatoric / epistemic entropy per split: where each method puts its doubt."""
    splits = _splits(runs)
    rows = []
    for _, run in finished(runs).iterrows():
        row: dict[str, Any] = {"run": _tag(run, "mlflow.runName")}
        for split in splits:
            parts = [_metric(run, f"unc/{split}_{p}") for p in ("total", "aleatoric", "epistemic")]
            row[f"{split} (tot/ale/epi)"] = " / ".join(f"{v:.3f}" for v in parts)
        rows.append(row)
    return distinct(rows)


def _batch_sizes(runs: pd.DataFrame, prefix: str) -> list[int]:
    pattern = re.compile(rf"metrics\.{prefix}/b(\d+)(_ms)?")
    sizes = {
        int(m.group(1))
        for c in runs.columns
        if (m := pattern.fullmatch(c)) and runs[c].notna().any()
    }
    return sorted(sizes)


def speedup_curves(runs: pd.DataFrame) -> dict[str, dict[int, float]]:
    """Speedup by batch size per method/backend/bits, merged over runs that swept batch_size."""
    curves: dict[str, dict[int, float]] = {}
    for _, run in finished(runs).iterrows():
        for b in _batch_sizes(runs, "speedup"):
            value = _metric(run, f"speedup/b{b}")
            if math.isfinite(value) and value > 0:
                curves.setdefault(label(run), {})[b] = value
    return curves


def latency_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    sizes = _batch_sizes(runs, "speedup")
    rows = []
    for _, run in finished(runs).iterrows():
        row: dict[str, Any] = {"run": _tag(run, "mlflow.runName")}
        for b in sizes:
            row[f"b{b} ms"] = _metric(run, f"lat/b{b}_ms")
            row[f"b{b} ref ms"] = _metric(run, f"ref/b{b}_ms")
            row[f"b{b} speedup"] = _metric(run, f"speedup/b{b}")
        rows.append(row)
    return [r for r in rows if any(isinstance(v, float) and math.isfinite(v) for v in r.values())]


def emulated_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Latency under an emulator (`lat_emulated/`): a table of its own, never a speedup,
    never beside host or board timings (qemu-user times the translator, not the CPU)."""
    sizes = _batch_sizes(runs, "lat_emulated")
    rows = []
    for _, run in finished(runs).iterrows():
        row: dict[str, Any] = {"run": _tag(run, "mlflow.runName"), "device": _tag(run, "device")}
        row |= {f"b{b} ms": _metric(run, f"lat_emulated/b{b}_ms") for b in sizes}
        if any(math.isfinite(v) for k, v in row.items() if k.endswith(" ms")):
            rows.append(row)
    return rows


def bits_series(runs: pd.DataFrame) -> dict[str, dict[str, dict[int, float]]]:
    """Metric -> method/quantizer line -> bits -> value; float runs appear as 32 bits.

    Only when the runs span more than one bit width: otherwise there is nothing to plot.
    """
    done = finished(runs)
    bits = {int(_tag(r, "bits", "32")) for _, r in done.iterrows()}
    if len(bits) < 2:
        return {}
    series: dict[str, dict[str, dict[int, float]]] = {name: {} for name in BITS_METRICS.values()}
    quantizers = {_tag(r, "quant", "none") for _, r in done.iterrows()} - {"none"}
    for _, run in done.iterrows():
        quant, width = _tag(run, "quant", "none"), int(_tag(run, "bits", "32"))
        # A float run is every quantizer's 32-bit end point.
        lines = quantizers if quant == "none" else {quant}
        for key, name in BITS_METRICS.items():
            value = _metric(run, key)
            if math.isfinite(value):
                for q in lines:
                    series[name].setdefault(f"{_tag(run, 'method')}-{q}", {})[width] = value
    return series


def bits_rows(series: dict[str, dict[str, dict[int, float]]]) -> list[dict[str, Any]]:
    rows = []
    lines = sorted({line for per_metric in series.values() for line in per_metric})
    for line in lines:
        widths = sorted({b for m in series.values() for b in m.get(line, {})})
        for b in widths:
            rows.append(
                {"method-quant": line, "bits": b}
                | {name: series[name].get(line, {}).get(b, float("nan")) for name in series}
            )
    return rows


def _several_models(runs: pd.DataFrame) -> bool:
    return "tags.model" in runs and runs["tags.model"].nunique() > 1


def panel_name(run: pd.Series, several_models: bool) -> str:
    """A run's name in a per-run panel: with the model when the report spans several."""
    name = label(run, backend=False)
    return f"{name} ({_tag(run, 'model')})" if several_models else name


def representatives(runs: pd.DataFrame) -> pd.DataFrame:
    """One finished run per method/quantizer/bits/dataset/model: backends compute the same
    predictive, so per-backend copies of a diagram would only repeat it."""
    done = finished(runs)
    if done.empty:
        return done
    keys = done.apply(
        lambda r: (label(r, backend=False), _tag(r, "dataset"), _tag(r, "model")), axis=1
    )
    return done[~keys.duplicated()].head(MAX_PANELS)


def _artifact(run_id: str, path: str, load: Callable[[Path], Any]) -> Any | None:
    """A run's artifact, or None for runs logged before it existed."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp
            )
        except Exception:
            return None
        return load(Path(local))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def reliability_diagrams(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    import json

    found = {}
    several = _several_models(runs)
    for _, run in representatives(runs).iterrows():
        diagram = _artifact(run["run_id"], "reliability.json", lambda p: json.loads(p.read_text()))
        if diagram is not None:
            found[panel_name(run, several)] = diagram
    return found


def entropies(runs: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """Total predictive entropy per evaluated split (clean test, ambiguous, each OOD set)."""
    found = {}
    for _, run in representatives(runs).iterrows():
        arrays = _artifact(run["run_id"], "uncertainty.npz", _load_npz)
        if not arrays:
            continue
        splits = {}
        for key, values in arrays.items():
            split, _, part = key.rpartition(".")
            finite = values[np.isfinite(values)]
            if part == "total" and finite.size:
                splits["clean" if split == "test" else split] = finite
        if splits:
            found[panel_name(run, _several_models(runs))] = splits
    return found


def uncertainty_parts(runs: pd.DataFrame) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-sample (aleatoric, epistemic) entropy per split, from each run's uncertainty.npz."""
    found = {}
    several = _several_models(runs)
    for _, run in representatives(runs).iterrows():
        arrays = _artifact(run["run_id"], "uncertainty.npz", _load_npz)
        if not arrays:
            continue
        splits = {}
        for key in arrays:
            split, _, part = key.rpartition(".")
            epi_key = f"{split}.epistemic"
            if part != "aleatoric" or epi_key not in arrays:
                continue
            ale, epi = arrays[key], arrays[epi_key]
            keep = np.isfinite(ale) & np.isfinite(epi)
            if keep.any():
                splits["clean" if split == "test" else split] = (ale[keep], epi[keep])
        if splits:
            found[panel_name(run, several)] = splits
    return found


def seed_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Quality per config over its seeds, mean ± std (the std is over seeds, ddof 1)."""
    several = _several_models(runs)
    rows = []
    for group in stats.seed_groups(runs):
        first = group.iloc[0]
        row: dict[str, Any] = {"config": label(first)}
        if several:
            row["model"] = _tag(first, "model")
        row["seeds"] = len(group)
        for key, short in QUALITY.items():
            row[short] = stats.fmt(*stats.mean_std(stats.column(group, key)))
        rows.append(row)
    return rows


def several_seeds(runs: pd.DataFrame) -> bool:
    return any(len(group) > 1 for group in stats.seed_groups(runs))


COST_BATCH = 10  # the seeds' default batch size; the smallest timed one when it is absent
# metric -> (axis name, higher is better)
COST_METRICS = {"ood/auroc_entropy": ("OOD AUROC (entropy)", True), "cal/nll": ("NLL", False)}


def cost_batch(runs: pd.DataFrame) -> int | None:
    sizes = _batch_sizes(runs, "lat")
    if not sizes:
        return None
    return COST_BATCH if COST_BATCH in sizes else sizes[0]


def cost_points(runs: pd.DataFrame, batch: int, model: str | None) -> list[dict[str, Any]]:
    """Mean quality and latency per method x backend (over seeds where there are several)."""
    done = finished(runs)
    if model is not None:
        done = done[done["tags.model"] == model]
    points: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _, run in done.iterrows():
        entry = points.setdefault((label(run, backend=False), _tag(run, "backend")), {})
        for key in ("lat/b{b}_ms", *COST_METRICS):
            entry.setdefault(key, []).append(_metric(run, key.format(b=batch)))
    out = []
    for (method, backend), values in points.items():
        latency = stats.mean_std(values["lat/b{b}_ms"])[0]
        if not math.isfinite(latency):
            continue
        point = {"method": method, "backend": backend, "latency_ms": latency}
        for key, (name, _) in COST_METRICS.items():
            point[name] = stats.mean_std(values[key])[0]
        out.append(point)
    return out


def speedup_panels(runs: pd.DataFrame, model: str | None) -> dict[str, dict[str, dict[int, float]]]:
    """backend -> method -> batch size -> mean speedup, for the small-multiples plot."""
    done = finished(runs)
    if model is not None:
        done = done[done["tags.model"] == model]
    sums: dict[str, dict[str, dict[int, list[float]]]] = {}
    for _, run in done.iterrows():
        for b in _batch_sizes(runs, "speedup"):
            value = _metric(run, f"speedup/b{b}")
            if math.isfinite(value) and value > 0:
                per = sums.setdefault(_tag(run, "backend"), {})
                per.setdefault(label(run, backend=False), {}).setdefault(b, []).append(value)
    return {
        backend: {m: {b: float(np.mean(v)) for b, v in pts.items()} for m, pts in per.items()}
        for backend, per in sums.items()
    }


def _model_figures(runs: pd.DataFrame) -> dict[str, Figure]:
    """Speedup small multiples and quality-against-cost, per model when there are several."""
    figures: dict[str, Figure] = {}
    colours = plots.palette({label(r, backend=False) for _, r in finished(runs).iterrows()})
    models = sorted(runs["tags.model"].dropna().unique()) if _several_models(runs) else [None]
    batch = cost_batch(runs)
    for model in models:
        suffix = "" if model is None else f"_{model}"
        panels = speedup_panels(runs, model)
        if any(len(pts) > 1 for per in panels.values() for pts in per.values()):
            figures[f"speedup_grid{suffix}.png"] = plots.speedup_grid(panels, colours)
        points = cost_points(runs, batch, model) if batch is not None else []
        if len(points) > 1:
            better = dict(COST_METRICS.values())
            figures[f"cost{suffix}.png"] = plots.quality_vs_cost(points, better, colours, batch)
    return figures


def concurrency_warning(runs: pd.DataFrame) -> list[str]:
    """A warning when jobs shared a machine (tags `launcher`, `concurrent_jobs`): their
    latencies are not clean timings, whatever the ratio beside them says."""
    if "tags.concurrent_jobs" not in runs:
        return []
    shared = pd.to_numeric(runs["tags.concurrent_jobs"], errors="coerce").fillna(1)
    if not (shared > 1).any():
        return []
    launchers = ", ".join(sorted({_tag(r, "launcher") for _, r in runs[shared > 1].iterrows()}))
    return [
        f"**Warning: {int((shared > 1).sum())} of {len(runs)} jobs ran with up to "
        f"{int(shared.max())} jobs at once on a machine ({launchers}); these latencies are "
        "not clean timings. Rerun with one job per machine (e.g. hydra.launcher.n_jobs=1) "
        "before quoting them.**",
        "",
    ]


def _header(preset: str, runs: pd.DataFrame) -> list[str]:
    first = runs.iloc[0]
    done = len(finished(runs))
    return [
        f"# Preset `{preset}`",
        "",
        f"Generated by `bnn-harness report --experiment {preset}` from sweep "
        f"`{_tag(first, 'sweep_id')}` (`bnn-harness run +experiment={preset} --multirun`): "
        f"{done} of {len(runs)} jobs finished. Machine: {_tag(first, 'hardware')}; "
        f"commit {_tag(first, 'git_commit')}; "
        f"dataset(s): {', '.join(sorted({_tag(r, 'dataset') for _, r in runs.iterrows()}))}.",
        "",
    ]


def build(preset: str, runs: pd.DataFrame) -> tuple[str, dict[str, Figure]]:
    """The page's markdown and its figures (file name -> figure), from the runs alone."""
    lines = _header(preset, runs)
    figures: dict[str, Figure] = {}
    if several_seeds(runs):
        lines += [
            "## Accuracy, calibration and OOD detection, over seeds",
            "",
            "Runs grouped by config with the seed left out (batch sizes and timing settings "
            "too: they change no prediction); mean ± sample standard deviation over seeds. "
            "Test split; OOD AUROC on the first OOD set, the ambiguous split counted as "
            "in-distribution.",
            "",
            markdown_table(seed_rows(runs)),
            "",
        ]
    else:
        lines += [
            "## Accuracy, calibration and OOD detection",
            "",
            "Test split; OOD AUROC on the first OOD set with the ambiguous split counted as "
            "in-distribution (95 % bootstrap interval of a single run's entropy AUROC, 1000 "
            "resamples); `param_KiB`: stored posterior parameters.",
            "",
            markdown_table(quality_rows(runs)),
            "",
        ]
    lines += claims.section(preset, runs)
    failed = runs[runs["status"] != "FINISHED"]
    if not failed.empty:
        lines += ["Failed jobs:", ""]
        lines += [
            f"- `{_tag(r, 'mlflow.runName')}`: {' '.join(_tag(r, 'error').split())[:300]}"
            for _, r in failed.iterrows()
        ]
        lines.append("")
    unc = uncertainty_rows(runs)
    if unc and _splits(runs):
        lines += [
            "## Uncertainty by split",
            "",
            "Mean predictive entropy (total) = expected entropy (aleatoric) + mutual "
            "information (epistemic), in nats.",
            "",
            markdown_table(unc),
            "",
        ]
    curves = speedup_curves(runs)
    if curves:
        lines += [
            "## Latency and speedup",
            "",
            "Median latency per call; speedup = reference latency / latency, timed "
            "interleaved in the same process.",
            "",
            *concurrency_warning(runs),
            markdown_table(latency_rows(runs)),
            "",
        ]
    emulated = emulated_rows(runs)
    if emulated:
        lines += [
            "## Latency under emulation (correctness runs, not speed)",
            "",
            "Median latency per call on an emulated board (qemu-user): it measures the "
            "emulator, so no speedup is computed and these runs are left out of every speed "
            "table and plot above.",
            "",
            markdown_table(emulated),
            "",
        ]
    figures |= _model_figures(runs)
    series = bits_series(runs)
    if series:
        lines += ["## By bit width", "", markdown_table(bits_rows(series)), ""]
        figures["bits.png"] = plots.by_bit_width(series)
    diagrams = reliability_diagrams(runs)
    if diagrams:
        figures["reliability.png"] = plots.reliability_grid(diagrams)
    hists = entropies(runs)
    if hists:
        figures["entropy.png"] = plots.entropy_histograms(hists)
    parts = uncertainty_parts(runs)
    if parts:
        figures["aleatoric_epistemic.png"] = plots.uncertainty_scatter(parts)
    if figures:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({preset}/{name})" for name in figures]
        lines.append("")
    return "\n".join(lines), figures


def log_summary_run(preset: str, runs: pd.DataFrame, paths: list[Path]) -> str:
    """A summary run beside the sweep (its child, when the sweep has a parent run)."""
    first = runs.iloc[0]
    tags = {ROLE_TAG: "report", "preset": preset, "report_of": _tag(first, "sweep_id")}
    parent = _tag(first, PARENT_TAG, "")
    if parent:
        tags[PARENT_TAG] = parent
    client = mlflow.MlflowClient()
    run = with_retry(
        lambda: client.create_run(first["experiment_id"], run_name=f"report-{preset}", tags=tags)
    )
    for path in paths:
        client.log_artifact(run.info.run_id, str(path))
    with_retry(lambda: client.set_terminated(run.info.run_id, "FINISHED"))
    return run.info.run_id


def write_report(
    tracking: TrackingConfig,
    out: Path,
    preset: str,
    sweep: str | None = None,
    include_unfinished: bool = False,
) -> list[Path]:
    runs = preset_runs(tracking, preset, sweep, include_unfinished)
    text, figures = build(preset, runs)
    folder = out / preset
    folder.mkdir(parents=True, exist_ok=True)
    page = out / f"{preset}.md"
    page.write_text(text)
    paths = [page]
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=110)
        paths.append(folder / name)
    log_summary_run(preset, runs, paths)
    return paths


def write_reports(
    tracking: TrackingConfig,
    out: Path,
    preset: str | None = None,
    sweep: str | None = None,
    include_unfinished: bool = False,
) -> list[Path]:
    """One page per preset (or the one asked for), each from its newest sweep."""
    if sweep is not None and preset is None:
        raise HarnessError("--sweep needs --experiment: a sweep id belongs to one preset")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    names = [preset] if preset else presets(tracking)
    if not names:
        raise HarnessError(
            f"no preset runs in {tracking.uri}; run `bnn-harness run +experiment=NAME` first"
        )
    return [
        p for name in names for p in write_report(tracking, out, name, sweep, include_unfinished)
    ]

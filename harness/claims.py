"""A preset's published claims beside what its runs measured, claim by claim.

The claims are data, not code: `conf/claims/<preset>.yaml` lists each claim with the runs
it compares (by tag values) and the tolerance that decides it, so this module names no
method or backend, and a preset without such a file gets no claim table. Kinds:

- `match`: the subject is no worse than `against` by more than `tolerance` on every
  check (`better: higher|lower` says which way is worse; omitted, any difference counts);
- `speedup`: the subject's `speedup/b{B}` (reference latency over its own, timed
  interleaved) is at least `at_least` at every batch size, per backend;
- `at_least`: the subject's metric is at least `value`.

A claim holds when every model (and backend, batch size) passes, does not hold when none
does, and partly holds otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.api import HarnessError
from harness.stats import column, fmt, mean_std

CLAIMS_DIR = Path(__file__).resolve().parent.parent / "conf" / "claims"
KINDS = ("match", "speedup", "at_least")


def load(preset: str, folder: Path = CLAIMS_DIR) -> dict[str, Any] | None:
    path = folder / f"{preset}.yaml"
    if not path.exists():
        return None
    spec = yaml.safe_load(path.read_text()) or {}
    for claim in spec.get("claims", []):
        if claim.get("kind") not in KINDS:
            raise HarnessError(
                f"{path}: claim {claim.get('claim')!r} has kind {claim.get('kind')!r}; "
                f"valid kinds: {', '.join(KINDS)}"
            )
    return spec


def _select(runs: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    done = runs[runs["status"] == "FINISHED"]
    for tag, value in where.items():
        column_name = f"tags.{tag}"
        if column_name not in done:
            return done.iloc[0:0]
        done = done[done[column_name].astype(str) == str(value)]
    return done


def _models(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["tags.model"].dropna().unique()) if "tags.model" in runs else ["-"]


def _of(runs: pd.DataFrame, method: str, model: str) -> pd.DataFrame:
    chosen = runs[runs["tags.method"] == method]
    return chosen[chosen["tags.model"] == model] if "tags.model" in chosen else chosen


def _match(claim: dict[str, Any], runs: pd.DataFrame) -> tuple[list[str], list[bool]]:
    checks = claim.get("checks") or [claim]
    texts, oks = [], []
    for model in _models(runs):
        parts = []
        for check in checks:
            metric = check["metric"]
            s = mean_std(column(_of(runs, claim["subject"], model), metric))
            a = mean_std(
                column(_of(runs, claim["against"], model), check.get("against_metric", metric))
            )
            if s[2] == 0 or a[2] == 0:
                continue
            diff = s[0] - a[0]
            better = check.get("better")
            loss = -diff if better == "higher" else diff if better == "lower" else abs(diff)
            oks.append(loss <= float(check["tolerance"]) + 1e-12)
            name = check.get("label", metric)
            parts.append(
                f"{name} {fmt(*s)} vs {fmt(*a)} (Δ {diff:+.3f}, tolerance {check['tolerance']})"
            )
        if parts:
            texts.append(f"{model}: " + "; ".join(parts))
    return texts, oks


def _speedup(claim: dict[str, Any], runs: pd.DataFrame) -> tuple[list[str], list[bool]]:
    floor = float(claim["at_least"])
    texts, oks = [], []
    sizes = sorted(
        int(c.split("/b")[1])
        for c in runs.columns
        if c.startswith("metrics.speedup/b") and runs[c].notna().any()
    )
    for model in _models(runs):
        mine = _of(runs, claim["subject"], model)
        for backend in sorted(mine["tags.backend"].dropna().unique()):
            at = mine[mine["tags.backend"] == backend]
            cells = []
            for b in sizes:
                mean, _, n = mean_std(column(at, f"speedup/b{b}"))
                if n:
                    oks.append(mean >= floor)
                    cells.append(f"b{b} {mean:.3g}x")
            if cells:
                texts.append(f"{model}/{backend}: " + ", ".join(cells))
    return texts, oks


def _at_least(claim: dict[str, Any], runs: pd.DataFrame) -> tuple[list[str], list[bool]]:
    texts, oks = [], []
    for model in _models(runs):
        s = mean_std(column(_of(runs, claim["subject"], model), claim["metric"]))
        if s[2]:
            oks.append(s[0] >= float(claim["value"]))
            texts.append(f"{model}: {claim['metric']} {fmt(*s)} (needs ≥ {claim['value']})")
    return texts, oks


def verdict(oks: list[bool]) -> str:
    if not oks:
        return "not measured"
    if all(oks):
        return "holds"
    return "does not hold" if not any(oks) else "partly"


def evaluate(spec: dict[str, Any], runs: pd.DataFrame) -> list[dict[str, str]]:
    """One row per claim: the claim, its source, what was measured, and the verdict."""
    rows = []
    judge = {"match": _match, "speedup": _speedup, "at_least": _at_least}
    for claim in spec.get("claims", []):
        where = claim.get("where", spec.get("where", {}))
        texts, oks = judge[claim["kind"]](claim, _select(runs, where))
        passed = f" ({sum(oks)} of {len(oks)} checks pass)" if oks and not all(oks) else ""
        rows.append(
            {
                "claim": claim["claim"],
                "seeds say": claim.get("source", "-"),
                "measured (mean ± std over seeds)": "<br>".join(texts) or "no runs",
                "verdict": verdict(oks) + passed,
            }
        )
    return rows


def seeds_per_config(runs: pd.DataFrame, where: dict[str, Any]) -> int:
    chosen = _select(runs, where)
    if chosen.empty or "params.seed" not in chosen:
        return 0
    return int(chosen["params.seed"].nunique())


def markdown_rows(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r[c].replace("|", "/") for c in columns) + " |" for r in rows]
    return lines


def section(preset: str, runs: pd.DataFrame, folder: Path = CLAIMS_DIR) -> list[str]:
    """The page's claim table, or nothing when the preset declares no claims."""
    spec = load(preset, folder)
    if not spec or not spec.get("claims"):
        return []
    n = seeds_per_config(runs, spec.get("where", {}))
    intro = spec.get("intro", "").strip()
    return [
        "## Claims against measurements",
        "",
        *([intro, ""] if intro else []),
        f"Quality claims read {n} seed(s) per configuration (mean ± sample std); speed "
        "claims read the timed runs (one seed). Tolerances are stated per check; a claim "
        "holds when every model, backend and batch size passes.",
        "",
        *markdown_rows(evaluate(spec, runs)),
        "",
    ]

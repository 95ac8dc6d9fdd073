"""Runs of one config over several seeds, folded into mean ± std.

One seed is not a result: on another CPU the same demo config moved an AUROC by 0.14.
Runs are grouped by their logged config with the seed left out, and with what cannot
change a quality metric left out too (batch sizes and timing settings: the paper preset
times its first seed at every batch size and the others at one), so a report shows the
spread over seeds wherever a sweep ran more than one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

# Logged params that do not change what a run predicts.
NOT_CONFIG = (
    "params.seed",
    "params.batch_size",
    "params.batch_sizes",
    "params.eval_batch_size",
    "params.timing.",
    "params.tracking.",
    "params.cache_dir",
)


def config_key(runs: pd.DataFrame) -> pd.Series:
    """One string per run that is equal for runs differing only in their seed."""
    columns = sorted(
        c for c in runs.columns if c.startswith("params.") and not c.startswith(NOT_CONFIG)
    )
    if not columns:
        return pd.Series(runs.index.astype(str), index=runs.index)
    return runs[columns].apply(lambda row: "|".join(str(v) for v in row), axis=1)


def seed_groups(runs: pd.DataFrame) -> list[pd.DataFrame]:
    """Finished runs grouped by config minus seed, in order of first appearance."""
    done = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if done.empty:
        return []
    keys = config_key(done)
    return [done[keys == key] for key in dict.fromkeys(keys)]


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count of the finite values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)


def fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
    """`0.953 ± 0.004` over several seeds, `0.953` for one, `-` for none."""
    if n == 0 or not math.isfinite(mean):
        return "-"
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def column(group: pd.DataFrame, key: str) -> list[float]:
    name = f"metrics.{key}"
    if name not in group:
        return []
    return [float(v) for v in group[name].to_numpy()]

"""Latency of a candidate against a reference, timed interleaved in one process.

Interleaving (A, R, A, R, ...) exposes both to the same thermal state, frequency
scaling and background load, so their ratio is meaningful even when each drifts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Call = Callable[[Tensor], object]
WARM_S = 1.0


@dataclass
class TimingConfig:
    warmup: int = 3
    rounds: int = 7
    min_block_s: float = 0.02


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    calls: int


def _calls_for(fn: Call, x: Tensor, min_block_s: float) -> int:
    """Calls per block so one block lasts at least min_block_s (doubling search)."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn(x)
        if time.perf_counter() - start >= min_block_s or number >= 1 << 16:
            return number
        number *= 2


def _block_ms(fn: Call, x: Tensor, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn(x)
    return (time.perf_counter() - start) * 1e3 / number


def _summary(samples: list[float], number: int) -> Latency:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Latency(statistics.median(samples), q[2] - q[0], number * len(samples))


def interleaved(fns: dict[str, Call], x: Tensor, cfg: TimingConfig) -> dict[str, Latency]:
    """Median per-call latency of each function, blocks alternating between them."""
    if cfg.rounds <= 0 or cfg.warmup < 0:
        raise ValueError("timing.rounds must be positive and timing.warmup non-negative")
    for fn in fns.values():
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            fn(x)
            # a call of a second or more has warmed caches and the allocator by itself; more
            # warmup would only multiply the cost of slow references at large batches
            if time.perf_counter() - start >= WARM_S:
                break
    numbers = {k: _calls_for(fn, x, cfg.min_block_s) for k, fn in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(cfg.rounds):
        for k, fn in fns.items():
            samples[k].append(_block_ms(fn, x, numbers[k]))
    return {k: _summary(v, numbers[k]) for k, v in samples.items()}


def compare(
    candidate: Call,
    reference: Call,
    make_input: Callable[[int], Tensor],
    batch_sizes: list[int],
    cfg: TimingConfig,
) -> dict[str, float]:
    """Flat metrics: lat/b{B}_ms, lat/b{B}_iqr_ms, ref/b{B}_ms and speedup/b{B}."""
    out: dict[str, float] = {}
    for b in batch_sizes:
        lat = interleaved({"cand": candidate, "ref": reference}, make_input(b), cfg)
        out[f"lat/b{b}_ms"] = lat["cand"].median_ms
        out[f"lat/b{b}_iqr_ms"] = lat["cand"].iqr_ms
        out[f"ref/b{b}_ms"] = lat["ref"].median_ms
        out[f"speedup/b{b}"] = lat["ref"].median_ms / lat["cand"].median_ms
    return out

"""Matplotlib figures logged as run artifacts (headless: Agg backend)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def reliability(diagram: dict[str, Any], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(4, 4))
    lower, upper = diagram["bin_lower"], diagram["bin_upper"]
    centres = [(lo + hi) / 2 for lo, hi in zip(lower, upper, strict=True)]
    ax.bar(centres, diagram["accuracy"], width=upper[0] - lower[0], edgecolor="k", label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def _grid(n: int, size: float = 3.0) -> tuple[Figure, list[Any]]:
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def reliability_grid(diagrams: dict[str, dict[str, Any]]) -> Figure:
    """One reliability diagram per run, on shared axes so miscalibration compares by eye."""
    fig, axes = _grid(len(diagrams))
    for ax, (label, diagram) in zip(axes, diagrams.items(), strict=True):
        lower, upper = diagram["bin_lower"], diagram["bin_upper"]
        centres = [(lo + hi) / 2 for lo, hi in zip(lower, upper, strict=True)]
        ax.bar(centres, diagram["accuracy"], width=upper[0] - lower[0], edgecolor="k")
        ax.plot([0, 1], [0, 1], "r--")
        ax.set(title=label, xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def entropy_histograms(entropies: dict[str, dict[str, Any]], bins: int = 30) -> Figure:
    """Predictive entropy per split and run: OOD should sit right of clean, ambiguous between."""
    fig, axes = _grid(len(entropies))
    for ax, (label, splits) in zip(axes, entropies.items(), strict=True):
        top = max(float(v.max()) for v in splits.values()) or 1.0
        for split, values in splits.items():
            ax.hist(values, bins=bins, range=(0, top), density=True, histtype="step", label=split)
        ax.set(title=label, xlabel="predictive entropy (nats)", ylabel="density")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def speedup_vs_batch(curves: dict[str, dict[int, float]]) -> Figure:
    """Log-log speedup over the reference by batch size; 1 (dashed) is parity."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in sorted(curves.items()):
        sizes = sorted(points)
        ax.plot(sizes, [points[b] for b in sizes], marker="o", label=label)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="speedup vs reference")
    sizes = sorted({b for points in curves.values() for b in points})
    ax.set_xticks(sizes, labels=[str(b) for b in sizes])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def by_bit_width(series: dict[str, dict[str, dict[int, float]]]) -> Figure:
    """One panel per metric; a line per method and quantizer across bit widths (32 = float)."""
    fig, axes = _grid(len(series), size=3.5)
    for ax, (metric, lines) in zip(axes, series.items(), strict=True):
        for label, points in sorted(lines.items()):
            widths = sorted(points)
            ax.plot(widths, [points[b] for b in widths], marker="o", label=label)
        ax.set(xscale="log", xlabel="bits", ylabel=metric, title=metric)
        ax.set_xticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig

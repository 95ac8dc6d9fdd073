"""Matplotlib figures logged as run artifacts (headless: Agg backend)."""

from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.ticker

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


MARKERS = "osD^vP*Xh<>"


def palette(names: list[str] | set[str]) -> dict[str, Any]:
    """One colour per name, fixed by the sorted list of names: every plot of a report that
    is given the same mapping shows a method in the same colour."""
    ordered = sorted(set(names))
    cmap = plt.get_cmap("tab10" if len(ordered) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(ordered)}


def speedup_grid(curves: dict[str, dict[str, dict[int, float]]], colours: dict[str, Any]) -> Figure:
    """Speedup against batch size as small multiples: one panel per backend (shared log
    axes), one line per method in its report-wide colour, the legend beside the panels."""
    backends = sorted(curves)
    fig, axes = plt.subplots(
        1, len(backends), figsize=(3.6 * len(backends) + 1.8, 3.6), sharey=True, squeeze=False
    )
    sizes = sorted({b for per in curves.values() for pts in per.values() for b in pts})
    for ax, backend in zip(axes[0], backends, strict=True):
        for method, points in sorted(curves[backend].items()):
            xs = sorted(points)
            ax.plot(xs, [points[b] for b in xs], marker="o", color=colours[method], label=method)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="batch size", title=backend)
        ax.set_xticks(sizes, labels=[str(b) for b in sizes])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("speedup vs reference (1 = parity)")
    handles = [
        plt.Line2D([], [], color=colours[m], marker="o", label=m)
        for m in sorted({m for per in curves.values() for m in per})
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8, title="method", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    plt.close(fig)
    return fig


def pareto_front(cost: list[float], value: list[float], higher: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and value, by cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -value[i] if higher else value[i]))
    front, best = [], None
    for i in order:
        v = value[i] if higher else -value[i]
        if best is None or v > best:
            front.append(i)
            best = v
    return front


def quality_vs_cost(
    points: list[dict[str, Any]],
    metrics: dict[str, bool],
    colours: dict[str, Any],
    batch: int,
) -> Figure:
    """One panel per quality metric against latency at one batch size: a point per method
    (colour) and backend (marker); the Pareto front (nothing both cheaper and better) is the
    step line, its points named."""
    backends = sorted({p["backend"] for p in points})
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(backends)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics) + 1.8, 4.4))
    axes = [axes] if len(metrics) == 1 else list(axes)
    for ax, (metric, higher) in zip(axes, metrics.items(), strict=True):
        shown = [p for p in points if p.get(metric) is not None and p[metric] == p[metric]]
        for p in shown:
            ax.scatter(
                p["latency_ms"],
                p[metric],
                color=colours[p["method"]],
                marker=marker[p["backend"]],
                s=50,
                edgecolor="k",
                linewidth=0.5,
                zorder=3,
            )
        front = pareto_front([p["latency_ms"] for p in shown], [p[metric] for p in shown], higher)
        if front:
            xs = [shown[i]["latency_ms"] for i in front]
            ys = [shown[i][metric] for i in front]
            ax.step(xs, ys, where="post", color="0.3", linewidth=1, zorder=2, label="Pareto front")
            for i in front:
                ax.annotate(
                    f"{shown[i]['method']}/{shown[i]['backend']}",
                    (shown[i]["latency_ms"], shown[i][metric]),
                    fontsize=7,
                    xytext=(4, -9 if higher else 4),
                    textcoords="offset points",
                )
        ax.set(xscale="log", xlabel=f"latency at batch {batch} (ms, log)", ylabel=metric)
        # Minor log ticks get labels when the range is under a decade; they overlap.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.grid(True, alpha=0.3)
    handles = (
        [
            plt.Line2D([], [], color=colours[m], marker="o", linestyle="", label=m)
            for m in sorted({p["method"] for p in points})
        ]
        + [
            plt.Line2D([], [], color="k", mfc="none", marker=marker[b], linestyle="", label=b)
            for b in backends
        ]
        + [plt.Line2D([], [], color="0.3", label="Pareto front")]
    )
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    plt.close(fig)
    return fig


SPLIT_COLOURS = {"clean": "tab:blue", "ambiguous": "tab:orange"}
OOD_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")


def uncertainty_scatter(
    parts: dict[str, dict[str, tuple[Any, Any]]], per_split: int = 400, seed: int = 0
) -> Figure:
    """Aleatoric against epistemic entropy per sample, one panel per run, one colour per
    split: clean digits should sit low on both, ambiguous ones right (aleatoric), OOD up
    (epistemic). At most `per_split` points per split (a seeded subsample) keep it legible."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order = {"clean": 0, "ambiguous": 1}
    splits = sorted({s for per in parts.values() for s in per}, key=lambda s: (order.get(s, 2), s))
    ood = [s for s in splits if s not in SPLIT_COLOURS]
    colour = SPLIT_COLOURS | {s: OOD_COLOURS[i % len(OOD_COLOURS)] for i, s in enumerate(ood)}
    fig, axes = _grid(len(parts), size=3.2)
    top_a = max(float(np.max(a)) for per in parts.values() for a, _ in per.values()) or 1.0
    top_e = max(float(np.max(e)) for per in parts.values() for _, e in per.values()) or 1.0
    for ax, (label, per) in zip(axes, parts.items(), strict=True):
        for split in reversed(splits):  # clean last, on top of the wider clouds
            if split not in per:
                continue
            ale, epi = (np.asarray(v) for v in per[split])
            keep = rng.permutation(ale.size)[:per_split]
            ax.scatter(ale[keep], epi[keep], s=5, alpha=0.4, color=colour[split], linewidths=0)
        ax.set(xlim=(0, top_a * 1.05), ylim=(0, top_e * 1.05), title=label)
        ax.set(xlabel="aleatoric (expected entropy)", ylabel="epistemic (MI)")
        ax.title.set_fontsize(9)
    handles = [
        plt.Line2D([], [], color=colour[s], marker="o", linestyle="", label=s) for s in splits
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(splits), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    plt.close(fig)
    return fig

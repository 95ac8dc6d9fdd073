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

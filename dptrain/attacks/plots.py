"""PNG plots for attack reports: ROC curves on log-log axes and exposure histograms.

matplotlib is imported lazily and used through its object API with the Agg canvas, so plotting never touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._validate import as_scores
from .canaries import CHANCE_EXPOSURE_BITS
from .metrics import roc_curve, roc_metrics

__all__ = ["plot_roc", "plot_exposure_histogram"]


def _new_figure(figsize=(5.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_roc(curves, path, *, title: str = "Membership inference ROC") -> Path:
    """Write a log-log ROC plot of one or more attacks to ``path`` (PNG) and return the path.

    ``curves``: ``{label: (member_scores, nonmember_scores)}``; the legend shows each AUC and TPR at 0.1% FPR.
    The FPR axis starts at 1 / (number of non-members) of the largest set (the smallest FPR one can measure).
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError(f"curves must be a non-empty dict {{label: (member_scores, nonmember_scores)}}, found {curves!r}")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    floor = 1.0
    for label, (member, nonmember) in curves.items():
        fpr, tpr, _ = roc_curve(member, nonmember)
        res = roc_metrics(member, nonmember)
        floor = min(floor, 1.0 / np.size(nonmember))
        ax.plot(fpr, tpr, label=f"{label} (AUC {res['auc']:.3f}, TPR@0.1% {res['tpr_at_fpr_0.001']:.3f})")
    ax.plot([floor, 1.0], [floor, 1.0], "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_exposure_histogram(exposures, path, *, max_bits: float | None = None, bins: int = 30, title: str = "Canary exposure") -> Path:
    """Write a histogram of canary exposures (bits) to ``path`` (PNG), marking chance (1.44 bits) and, when
    given, the maximum log2 |R|."""
    values = as_scores(exposures, "exposures")
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    upper = max_bits if max_bits is not None else max(float(values.max()), CHANCE_EXPOSURE_BITS)
    ax.hist(values, bins=bins, range=(0.0, upper if upper > 0 else 1.0), color="tab:blue", alpha=0.8)
    ax.axvline(CHANCE_EXPOSURE_BITS, color="k", linestyle="--", linewidth=0.8, label="chance (1.44 bits)")
    if max_bits is not None:
        ax.axvline(max_bits, color="tab:red", linestyle=":", linewidth=0.8, label=f"max log2|R| = {max_bits:.1f}")
    ax.set_xlabel("Exposure (bits)")
    ax.set_ylabel("Canaries")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path

"""Report figures (matplotlib, Agg backend), drawn from the record frame and the stored scores.

- `auroc_figure`: per-class AUROC, ours (filled) and the paper's or other published values (hollow), one
  colour per method.
- `roc_figure`: ROC curves per task (one panel per normal class), every detector overlaid, from
  the per-image scores in the records' .npz files, averaged vertically over the ok seeds.

Both return PNG bytes (the caller writes them atomically) and show only methods with results.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from benchmark.records import UnreadableRecord, read_scores

FPR_GRID = np.linspace(0.0, 1.0, 201)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # No timestamp in the metadata: the same records give the same bytes.
    fig.savefig(buffer, dpi=110, format="png", bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buffer.getvalue()


def auroc_figure(ours: pd.DataFrame, paper: pd.DataFrame, title: str, reference_label: str = "paper") -> bytes:
    """Dot plot of per-class AUROC.

    Parameters
    ----------
    ours : pandas.DataFrame
        AUROC per normal class (rows) and method label (columns); NaN = no result.
    paper : pandas.DataFrame
        The paper's values, same rows; methods it lacks are simply not drawn hollow.
    title : str
        Figure title.
    reference_label : str, default="paper"
        What the hollow markers are, for the legend ("paper", or "published" for other papers' values).

    Returns
    -------
    bytes
        The PNG.
    """
    plt = _pyplot()
    methods = [m for m in ours.columns if ours[m].notna().any()]
    classes = list(ours.index)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        x = np.arange(len(classes)) + (i - len(methods) / 2 + 0.5) * width
        colour = f"C{i % 10}"
        ax.scatter(x, ours[method].to_numpy(float), color=colour, label=method, s=22, zorder=3)
        if method in paper.columns:
            ax.scatter(
                x, paper[method].reindex(classes).to_numpy(float), facecolors="none", edgecolors=colour, s=22, zorder=2
            )
    ax.scatter([], [], facecolors="none", edgecolors="grey", s=22, label=f"{reference_label} (hollow)")
    ax.set_xticks(np.arange(len(classes)), classes)
    ax.set_xlabel("normal class")
    ax.set_ylabel("AUROC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        title="ours (filled)",
        title_fontsize=8,
    )
    return _png(fig)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points at every distinct threshold, from (0, 0) to (1, 1).

    Parameters
    ----------
    scores : numpy.ndarray
        Anomaly scores; higher score = more anomalous.
    labels : numpy.ndarray
        Ground truth, anomaly = positive.

    Returns
    -------
    fpr : numpy.ndarray
        False-alarm rates.
    tpr : numpy.ndarray
        Detection rates.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / max(1, (y == 0).sum())], np.r_[0.0, tps / max(1, y.sum())]


def mean_roc(curves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Vertical average of ROC curves.

    Parameters
    ----------
    curves : list of tuple of numpy.ndarray
        (false-alarm rate, detection rate) pairs, as `roc_points` returns them.

    Returns
    -------
    numpy.ndarray
        Mean detection rate at each false-alarm rate of FPR_GRID.
    """
    return np.mean([np.interp(FPR_GRID, fpr, tpr) for fpr, tpr in curves], axis=0)


def roc_figure(
    frame: pd.DataFrame, results_dir: Path, classes: list[str], methods: list[str], title: str
) -> Optional[bytes]:
    """ROC curves of one dataset, one panel per normal class with ok records.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows of one dataset (`load_records`' columns: class_name, label, status, auroc, record).
    results_dir : Path
        The results root the `record` paths are relative to.
    classes : list of str
        Class names in display order.
    methods : list of str
        Method labels in legend order.
    title : str
        Figure title.

    Returns
    -------
    bytes or None
        The PNG, or None when no ok record has readable scores. A record whose scores cannot be read
        is left out with a warning on stderr naming the file (the report loaders have normally
        excluded it already: `read_record` checks the scores file).
    """
    ok = frame[frame["status"] == "ok"]
    curves: dict[tuple[str, str], list] = {}
    for row in ok.itertuples():
        try:
            scores, labels = read_scores(Path(results_dir) / row.record)
        except UnreadableRecord as exc:
            print(f"warning: {exc}; its ROC curve is left out of the figure", file=sys.stderr)
            continue
        if np.all(np.isfinite(scores)) and len(np.unique(labels)) == 2:
            curves.setdefault((row.class_name, row.label), []).append(roc_points(scores, labels))
    panels = [c for c in classes if any((c, m) in curves for m in methods)]
    drawn = [m for m in methods if any((c, m) in curves for c in panels)]
    if not panels:
        return None
    plt = _pyplot()
    ncols = min(5, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.2 * ncols + 1.6, 2.3 * nrows + 0.5), squeeze=False, sharex=True, sharey=True
    )
    colours = {m: f"C{i % 10}" for i, m in enumerate(drawn)}
    for ax, class_name in zip(axes.flat, panels):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for method in drawn:
            if (class_name, method) in curves:
                ax.plot(FPR_GRID, mean_roc(curves[(class_name, method)]), color=colours[method], lw=1.2)
        ax.set_title(f"normal: {class_name}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.set_aspect("equal")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1, :]:
        ax.set_xlabel("false-alarm rate", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("detection rate", fontsize=8)
    handles = [plt.Line2D([], [], color=colours[m], lw=1.5) for m in drawn]
    fig.legend(
        handles, drawn, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, title="detector", title_fontsize=8
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)

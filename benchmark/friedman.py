"""One comparison over every task: the Friedman test, the Nemenyi critical difference and the
critical-difference (CD) diagram of Demsar (JMLR 7, 2006, sections 3.2.2 and 3.2.3, Fig. 1).

Input: a table of scores, one row per task (a (dataset, normal class) pair), one column per detector,
higher is better (AUROC). Per task the detectors are ranked, 1 = best, ties sharing the average rank;
R_j is detector j's average rank over the N tasks.

- Friedman: chi2_F = 12 N / (k (k+1)) [sum_j R_j^2 - k (k+1)^2 / 4] (Demsar's equation, with
  scipy.stats.friedmanchisquare's correction for ties), chi-square with k - 1 degrees of freedom;
  Iman-Davenport F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F), F with (k - 1, (k - 1)(N - 1)) degrees.
- Nemenyi: two detectors differ significantly when their average ranks differ by at least
  CD = q_alpha sqrt(k (k+1) / (6 N)), q_alpha = studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)
  (Demsar's Table 5: 2.569 for k = 4 at alpha 0.05).
- The groups ("cliques", the diagram's thick bars): maximal runs of detectors, in rank order, whose
  average ranks lie within less than CD of each other.

Missing values are an error (`friedman_test` names the task and detector); `complete_tasks` drops the
incomplete tasks for a caller that prefers that, and says how many it dropped. Demsar reads the post-hoc
test only when the Friedman test rejects; `FriedmanResult.reading` says so when it does not.

Imports neither torch nor `methods`; matplotlib only inside `cd_figure`. The reports' section (the
table, the figure, the reading) is `benchmark.reports.friedman_sections`.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
#: The issue's rule for when the CD figure appears: more than two detectors and at least five tasks.
MIN_DETECTORS = 3
MIN_TASKS = 5


def applies(n_detectors: int, n_tasks: int) -> bool:
    """Whether a report folder gets the CD figure: more than two detectors and at least five tasks."""
    return n_detectors >= MIN_DETECTORS and n_tasks >= MIN_TASKS


@dataclass(frozen=True)
class FriedmanResult:
    """The Friedman test and the Nemenyi post-hoc test over N tasks and k detectors.

    Attributes
    ----------
    average_ranks : pandas.Series
        Detector -> average rank (1 = best), ascending (best first).
    n_tasks : int
        N, the tasks ranked.
    chi2 : float
        Friedman's chi2_F (tie-corrected as scipy.stats.friedmanchisquare).
    p_value : float
        Its p-value (chi-square, k - 1 degrees of freedom).
    f_statistic : float
        Iman-Davenport's F_F (inf when every task ranks the detectors alike).
    f_p_value : float
        Its p-value (F with k - 1 and (k - 1)(N - 1) degrees of freedom).
    alpha : float
        The significance level of both tests.
    q_alpha : float
        The Nemenyi test's critical value (studentized range / sqrt 2).
    critical_difference : float
        CD = q_alpha sqrt(k (k+1) / (6 N)).
    cliques : tuple of tuple of str
        The groups of detectors not significantly different, each in rank order, best group first;
        groups of one detector are not listed.
    """

    average_ranks: pd.Series
    n_tasks: int
    chi2: float
    p_value: float
    f_statistic: float
    f_p_value: float
    alpha: float
    q_alpha: float
    critical_difference: float
    cliques: tuple[tuple[str, ...], ...]

    @property
    def detectors(self) -> list[str]:
        """The detectors, best average rank first."""
        return list(self.average_ranks.index)

    @property
    def rejects(self) -> bool:
        """Whether the Friedman test rejects "all detectors are equivalent" at `alpha`."""
        return self.p_value < self.alpha

    def significantly_different(self, first: str, second: str) -> bool:
        """Whether two detectors' average ranks differ by at least the critical difference."""
        return abs(self.average_ranks[first] - self.average_ranks[second]) >= self.critical_difference

    @property
    def reading(self) -> str:
        """One line in plain words: the Friedman verdict, the groups, and where the last detector stands."""
        k, n = len(self.average_ranks), self.n_tasks
        head = f"Friedman p = {_p(self.p_value)} over {n} tasks ({k} detectors)"
        if not self.rejects:
            return (f"{head}: no significant difference among the detectors at alpha {self.alpha:g}, so the "
                    f"Nemenyi groups (CD {self.critical_difference:.2f}) are not read as differences.")
        parts = [f"{head}: the detectors differ (alpha {self.alpha:g})"]
        ranks = self.average_ranks
        best, last = ranks.index[0], ranks.index[-1]
        if self.cliques:
            groups = "; ".join("{" + ", ".join(clique) + "}" for clique in self.cliques)
            parts.append(f"not significantly different (Nemenyi CD {self.critical_difference:.2f}): {groups}")
        else:
            parts.append(f"every pair differs significantly (Nemenyi CD {self.critical_difference:.2f})")
        above = [d for d in ranks.index[:-1] if self.significantly_different(d, last)]
        if above:
            parts.append(f"{last} ranks last ({ranks[last]:.2f}), significantly below {_join(above)}")
        else:
            below = [d for d in ranks.index[1:] if self.significantly_different(best, d)]
            parts.append(f"{best} ranks first ({ranks[best]:.2f})"
                         + (f", significantly above {_join(below)}" if below else ""))
        return "; ".join(parts) + "."


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _join(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def wide_scores(frame: pd.DataFrame, task: Sequence[str] = ("dataset", "normal_class"), detector: str = "label",
                score: str = "auroc") -> pd.DataFrame:
    """A long frame (one row per record) as the task x detector table `friedman_test` reads.

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per (task, detector, seed); e.g. `benchmark.reports.load_records`' ok rows.
    task : sequence of str
        The columns naming a task.
    detector, score : str
        The detector's label column and the score column.

    Returns
    -------
    pandas.DataFrame
        Index: the tasks (a MultiIndex when `task` has several columns); columns: the detectors;
        values: the mean score over the rows of a (task, detector) (the seed mean); NaN where none.
    """
    return frame.pivot_table(index=list(task), columns=detector, values=score, aggfunc="mean")


def complete_tasks(scores: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    """The tasks where every detector has a score, and the others.

    Parameters
    ----------
    scores : pandas.DataFrame
        Tasks x detectors.

    Returns
    -------
    complete : pandas.DataFrame
        The rows without a missing value.
    dropped : list
        The index labels of the rows dropped (say how many in the report).
    """
    full = scores.notna().all(axis=1)
    return scores[full], list(scores.index[~full])


def rank_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Per task, the detectors' ranks: 1 = highest score, ties sharing their average rank."""
    ranks = np.vstack([stats.rankdata(-row) for row in scores.to_numpy(float)])
    return pd.DataFrame(ranks, index=scores.index, columns=scores.columns)


def _check(scores: pd.DataFrame) -> None:
    if scores.shape[1] < 2:
        raise ValueError(f"the Friedman test needs at least 2 detectors, got {scores.shape[1]}")
    if scores.shape[0] < 2:
        raise ValueError(f"the Friedman test needs at least 2 tasks, got {scores.shape[0]}")
    if scores.columns.duplicated().any():
        raise ValueError(f"detector named twice: {sorted(set(scores.columns[scores.columns.duplicated()]))}")
    values = scores.to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"task {scores.index[row]!r} has no score for detector {scores.columns[col]!r} "
                         f"({int(bad.sum())} missing in all); every detector needs every task "
                         f"(benchmark.friedman.complete_tasks drops the incomplete tasks)")


def _friedman_chi2(ranks: np.ndarray) -> float:
    """Friedman's statistic with scipy.stats.friedmanchisquare's tie correction (any k >= 2)."""
    n, k = ranks.shape
    rank_sums = ranks.sum(axis=0)
    ties = 0.0
    for row in ranks:
        _, counts = np.unique(row, return_counts=True)
        ties += float((counts ** 3 - counts).sum())
    correction = 1.0 - ties / (n * k * (k * k - 1))
    if correction <= 0:  # every task ties every detector: no evidence of a difference
        return 0.0
    return (12.0 / (n * k * (k + 1)) * float((rank_sums ** 2).sum()) - 3.0 * n * (k + 1)) / correction


def nemenyi_q(k: int, alpha: float = ALPHA) -> float:
    """The Nemenyi test's critical value q_alpha for k detectors (Demsar 2006, Table 5a)."""
    if k < 2:
        raise ValueError(f"the Nemenyi test needs at least 2 detectors, got {k}")
    return float(stats.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))


def critical_difference(k: int, n_tasks: int, alpha: float = ALPHA) -> float:
    """CD = q_alpha sqrt(k (k+1) / (6 N)) (Demsar 2006, section 3.2.2)."""
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n_tasks))


def iman_davenport(chi2: float, k: int, n_tasks: int) -> tuple[float, float]:
    """Iman-Davenport's F_F from Friedman's chi2_F, with its p-value."""
    denominator = n_tasks * (k - 1) - chi2
    if denominator <= 0:
        return math.inf, 0.0
    f_stat = (n_tasks - 1) * chi2 / denominator
    return f_stat, float(stats.f.sf(f_stat, k - 1, (k - 1) * (n_tasks - 1)))


def friedman_from_ranks(average_ranks: pd.Series, n_tasks: int) -> float:
    """Friedman's chi2_F from the average ranks alone (Demsar's equation; no tie correction)."""
    k = len(average_ranks)
    r = np.asarray(average_ranks, float)
    return 12.0 * n_tasks / (k * (k + 1)) * (float((r ** 2).sum()) - k * (k + 1) ** 2 / 4.0)


def cliques(average_ranks: pd.Series, cd: float) -> tuple[tuple[str, ...], ...]:
    """Maximal runs of detectors (in rank order) whose average ranks span less than `cd`.

    Parameters
    ----------
    average_ranks : pandas.Series
        Detector -> average rank, ascending.
    cd : float
        The critical difference.

    Returns
    -------
    tuple of tuple of str
        Each group of two or more detectors no two of which differ significantly, not contained in
        another; best group first.
    """
    names, ranks = list(average_ranks.index), np.asarray(average_ranks, float)
    groups: list[tuple[int, int]] = []
    for start in range(len(ranks)):
        end = start
        while end + 1 < len(ranks) and ranks[end + 1] - ranks[start] < cd:
            end += 1
        if end > start and not any(s <= start and end <= e for s, e in groups):
            groups.append((start, end))
    return tuple(tuple(names[s:e + 1]) for s, e in groups)


def friedman_test(scores: pd.DataFrame, alpha: float = ALPHA) -> FriedmanResult:
    """The Friedman test and the Nemenyi post-hoc test over every task.

    Parameters
    ----------
    scores : pandas.DataFrame
        One row per task, one column per detector, higher = better (e.g. `wide_scores`' table).
    alpha : float
        Significance level (default 0.05).

    Returns
    -------
    FriedmanResult

    Raises
    ------
    ValueError
        Fewer than 2 detectors or 2 tasks, a detector named twice, or a missing / non-finite score
        (the message names the first such task and detector; `complete_tasks` drops such tasks).
    """
    _check(scores)
    ranks = rank_scores(scores)
    n, k = ranks.shape
    if k >= 3:
        with np.errstate(divide="ignore", invalid="ignore"):  # all tied: 0 / 0, handled below
            chi2, p_value = stats.friedmanchisquare(*scores.to_numpy(float).T)
        chi2, p_value = float(chi2), float(p_value)
    else:  # scipy wants three or more groups; the same statistic for two
        chi2 = _friedman_chi2(ranks.to_numpy())
        p_value = float(stats.chi2.sf(chi2, k - 1))
    if not math.isfinite(chi2):  # scipy divides by zero when every task ties every detector
        chi2, p_value = 0.0, 1.0
    f_stat, f_p = iman_davenport(chi2, k, n)
    average = ranks.mean(axis=0)
    # Stable order: best rank first, ties by the scores table's column order.
    average = average.iloc[np.argsort(average.to_numpy(), kind="stable")]
    cd = critical_difference(k, n, alpha)
    return FriedmanResult(average_ranks=average, n_tasks=n, chi2=chi2, p_value=p_value, f_statistic=f_stat,
                          f_p_value=f_p, alpha=alpha, q_alpha=nemenyi_q(k, alpha), critical_difference=cd,
                          cliques=cliques(average, cd))


def cd_figure(result: FriedmanResult, title: str = ""):
    """The critical-difference diagram (Demsar 2006, Fig. 1) as a matplotlib figure.

    The rank axis on top, best (1) on the right; the better half of the detectors labelled on the
    right, the other half on the left, each joined to its average rank by an elbow line; thick bars
    join the groups not significantly different; the CD bracket above the axis.

    Parameters
    ----------
    result : FriedmanResult
    title : str
        Optional title; the Friedman p-value and N are appended.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (Agg backend); the caller saves and closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = result.average_ranks
    k = len(ranks)
    n_right = (k + 1) // 2  # the better half (ceil) on the right
    row_step, bar_step = 0.42, 0.18
    bars_top = 0.32
    rows_top = bars_top + bar_step * len(result.cliques) + 0.3
    n_rows = max(n_right, k - n_right)
    bottom = rows_top + row_step * (n_rows - 1) + 0.3
    fig, ax = plt.subplots(figsize=(7.0, 1.3 + 0.36 * n_rows + 0.18 * len(result.cliques)))
    left_edge, right_edge = k + 0.35, 1 - 0.35  # reversed axis: rank 1 on the right
    ax.set_xlim(left_edge, right_edge)
    ax.set_ylim(bottom, -1.25)
    ax.axis("off")

    ax.plot([1, k], [0, 0], color="black", lw=1.0)
    for tick in np.arange(1, k + 0.01, 0.5):
        major = float(tick).is_integer()
        ax.plot([tick, tick], [0, -0.12 if major else -0.07], color="black", lw=1.0)
        if major:
            ax.text(tick, -0.2, f"{int(tick)}", ha="center", va="bottom", fontsize=9)

    cd = result.critical_difference
    cd_y = -0.85
    ax.plot([1, 1 + cd], [cd_y, cd_y], color="black", lw=1.0)
    for end in (1, 1 + cd):
        ax.plot([end, end], [cd_y - 0.07, cd_y + 0.07], color="black", lw=1.0)
    ax.text(1 + cd / 2, cd_y - 0.1, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)

    for level, clique in enumerate(result.cliques):
        y = bars_top + bar_step * level
        lo, hi = ranks[clique[0]], ranks[clique[-1]]
        ax.plot([lo - 0.04, hi + 0.04], [y, y], color="black", lw=3.5, solid_capstyle="round")

    names = list(ranks.index)
    right = names[:n_right]                 # best first: top row = best rank (no crossing lines)
    left = list(reversed(names[n_right:]))  # worst first: top row = worst rank
    for side, members, edge, align in (("right", right, right_edge, "left"), ("left", left, left_edge, "right")):
        for row, name in enumerate(members):
            rank, y = float(ranks[name]), rows_top + row_step * row
            ax.plot([rank, rank, edge], [0, y, y], color="black", lw=0.9)
            ax.text(edge + (-0.05 if side == "right" else 0.05), y, f"{name} ({rank:.2f})", ha=align,
                    va="center", fontsize=9, clip_on=False)

    verdict = f"Friedman p = {_p(result.p_value)}, N = {result.n_tasks} tasks, alpha = {result.alpha:g}"
    ax.set_title(f"{title}\n{verdict}" if title else verdict, fontsize=9)

    return fig


def cd_diagram_png(result: FriedmanResult, title: str = "") -> bytes:
    """`cd_figure` as PNG bytes, the same for the same result (no timestamp in the metadata).

    Parameters
    ----------
    result : FriedmanResult
    title : str
        Optional title (`cd_figure`).

    Returns
    -------
    bytes
        The PNG, at the report figures' resolution (110 dpi).
    """
    fig = cd_figure(result, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=110, metadata={"Software": None})
    _close(fig)
    return buffer.getvalue()


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_cd_diagram(result: FriedmanResult, path: Path, title: str = "") -> list[Path]:
    """The critical-difference diagram (`cd_figure`), written as PNG and PDF.

    Parameters
    ----------
    result : FriedmanResult
    path : Path
        Where to write; the suffix is replaced by ``.png`` and ``.pdf``.
    title : str
        Optional title; the Friedman p-value and N are appended.

    Returns
    -------
    list of Path
        The PNG and the PDF (each written atomically).
    """
    fig = cd_figure(result, title)
    written = []
    for suffix, options in ((".png", {"dpi": 110, "metadata": {"Software": None}}),
                            (".pdf", {"metadata": {"CreationDate": None, "Creator": None, "Producer": None}})):
        target = Path(path).with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        fig.savefig(tmp, format=suffix[1:], bbox_inches="tight", **options)
        tmp.replace(target)
        written.append(target)
    _close(fig)
    return written

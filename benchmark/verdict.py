"""The reproduction verdict, from the job records alone: spreads over seeds, a verdict per cell
against the paper, mean ranks and Wilcoxon signed-rank tests per dataset, the best epoch on the
test set (the paper's probable, optimistic selection rule) beside the final model, and the
memory's health at the last epoch.

Every function returns pandas DataFrames plus caption / footer strings, from the one frame of records
that the reports read too (`benchmark.records.load_records`); `verdict_sections` bundles them per dataset
into report sections, and `VERDICT` is their producer in `benchmark.reports.write_reports`. Which
detectors have a memory, and its size, the detectors say themselves (`Detector.memory_size_param`,
read through `benchmark.labels.memory_size_param`).

Rules (stated again in each table's footer):
- a cell is the mean ± sd (ddof = 1) over the seeds whose run is `ok`, of the FINAL model's
  AUROC; "n=k" is shown when fewer seeds than the most any cell of the dataset has are present;
- the published values are those of the records' protocol (`benchmark.labels.published_values`, read
  through `benchmark.references`): the Mem_GANomaly paper's under the paper protocol, other sources'
  (Ruff et al.'s Deep SVDD, GEOM, GOAD) under "standard", never the Mem_GANomaly paper's there;
- verdict: "reproduced" when the paper's (published) value lies in [mean - 2 sd, mean + 2 sd]; "not
  reproduced (ours lower)" when the paper's value is above that band, "not reproduced (ours
  higher)" when below; no verdict with fewer than two seeds. It applies to every published value
  present: where a source gives only the mean over the classes, to the mean row only (the footer says so);
- the dataset row "mean" is, per seed, the mean over the classes, then mean ± sd over the seeds
  that have every class (otherwise the mean of the class means, without sd and without verdict);
- ranks: per class, the detectors' seed-mean AUROCs ranked (1 = best, ties averaged,
  scipy.stats.rankdata) over the classes where every detector shown has a result;
- Wilcoxon: Mem_GANomaly's seed-mean AUROC against each other detector's, paired by class over
  the classes both have (scipy.stats.wilcoxon, two-sided; zero differences dropped). Mem_GANomaly is
  named here (`REFERENCE_METHOD`) because the paper's claims are about it.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

from benchmark.data import CLASS_NAMES
from benchmark.datasets import TITLES
from benchmark.labels import method_order, published_values, reference_word
from benchmark.metrics import METRICS
from benchmark.render import Producer, ReportContext, ReportTable, Section

DASH = "–"
REFERENCE_METHOD = "Mem_GANomaly"
REPRODUCED = "reproduced"
OURS_LOWER = "not reproduced (ours lower)"
OURS_HIGHER = "not reproduced (ours higher)"
NO_VERDICT = "no verdict (one seed)"
VERDICT_RULE = ("Verdict: **reproduced** when the paper's value lies within our mean ± 2 sd over seeds "
                "(sd with ddof = 1); **not reproduced (ours lower)** when the paper's value is above that band, "
                "**not reproduced (ours higher)** when it is below; no verdict with fewer than two seeds. "
                "A wide band (few seeds, unstable training) makes 'reproduced' easy: read it with the sd.")
BEST_EPOCH_TITLE = "best epoch on the test set (optimistic; what the paper probably reported)"
BEST_EPOCH_COLUMN = "best epoch on test set (optimistic)"
HEALTH_COLUMNS = {"memory_slots_in_use": "slots in use", "memory_slots_per_query": "slots per query",
                  "memory_max_weight": "mean largest weight", "query_norm": "mean ||z||",
                  "memory_row_norm": "mean memory-row norm"}


# ---- numbers ------------------------------------------------------------------------------------
def mean_sd(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, sd and count of the finite values.

    Parameters
    ----------
    values : numpy.ndarray
        The values.

    Returns
    -------
    mean : float
        The mean.
    sd : float
        The sd with ddof = 1 (nan for one value).
    n : int
        The number of finite values.
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else math.nan, n


def verdict(mean: float, sd: float, n: int, paper: Optional[float]) -> str:
    """The verdict of one cell (see the module docstring); "" when the paper has no value.

    Parameters
    ----------
    mean, sd, n : float, float, int
        Our mean and sd (ddof = 1) over n seeds.
    paper : float or None
        The paper's value.

    Returns
    -------
    str
        REPRODUCED, OURS_LOWER, OURS_HIGHER, NO_VERDICT or "" (no paper value or no result).
    """
    if paper is None or pd.isna(paper) or n == 0 or pd.isna(mean):
        return ""
    if n < 2 or pd.isna(sd):
        return NO_VERDICT
    if paper > mean + 2 * sd:
        return OURS_LOWER
    if paper < mean - 2 * sd:
        return OURS_HIGHER
    return REPRODUCED


def format_cell(mean: float, sd: float, n: int, expected_n: int, digits: int = 4) -> str:
    """A table cell "mean ± sd".

    Parameters
    ----------
    mean : float
        The mean.
    sd : float
        The standard deviation.
    n : int
        Number of values (k).
    expected_n : int
        Expected number of values.
    digits : int, default=4
        Decimals.

    Returns
    -------
    str
        "mean ± sd", "(n=k)" added when k < expected_n; one seed: the mean alone.
    """
    if n == 0 or pd.isna(mean):
        return DASH
    text = f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return text + (f" (n={n})" if n < expected_n else "")


def _labels(frame: pd.DataFrame) -> list[str]:
    """The detectors of `frame` in the one order of every table (`benchmark.labels.method_order`)."""
    return method_order(frame)


def _paper(dataset: str, protocol: str = "paper") -> pd.DataFrame:
    """The published values of `protocol` (`benchmark.labels.published_values`): the Mem_GANomaly paper's
    under "paper", other sources' under another protocol; no columns where no source reports the dataset."""
    return published_values(protocol, dataset)


def verdict_rule(protocol: str = "paper") -> str:
    """`VERDICT_RULE`, naming the published values of a protocol other than the paper's as such."""
    return VERDICT_RULE if protocol == "paper" else VERDICT_RULE.replace("the paper's value", "the published value")


def mean_only_note(frame: pd.DataFrame, dataset: str, protocol: str = "paper") -> str:
    """A sentence naming the detectors shown whose source gives only a mean over the classes, or "".

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    protocol : str, default="paper"
        The records' protocol.

    Returns
    -------
    str
        "X: its source gives only the mean over the classes, so its verdict is on the mean row only." or "".
    """
    paper = _paper(dataset, protocol)
    classes = CLASS_NAMES[dataset]
    shown = _labels(frame[frame["dataset"] == dataset])
    mean_only = [m for m in shown if m in paper.columns and paper.loc[classes, m].isna().all()
                 and not pd.isna(paper.loc["mean", m])]
    if not mean_only:
        return ""
    names = mean_only[0] if len(mean_only) == 1 else ", ".join(mean_only[:-1]) + " and " + mean_only[-1]
    return (f"{names}: {'its source gives' if len(mean_only) == 1 else 'their sources give'} only the mean over the "
            "classes, so the verdict is on the mean row only.")


def seed_stats(frame: pd.DataFrame, dataset: str, metric: str = "auroc", protocol: str = "paper") -> pd.DataFrame:
    """Per (class, detector): mean, sd, n over the ok seeds, the number of runs and the statuses
    of the others, and the paper's value and our verdict.

    Parameters
    ----------
    frame : pd.DataFrame
        `benchmark.reports.load_records`'s long frame (one row per record).
    dataset : str
    metric : str
        A metric column of the frame (default "auroc").
    protocol : str
        The records' protocol, which chooses the published values (default "paper": the paper's).

    Returns
    -------
    pd.DataFrame
        Columns class_name, normal_class, label, mean, sd, n, runs, not_ok, paper (the published value),
        verdict.
    """
    subset = frame[frame["dataset"] == dataset]
    paper = _paper(dataset, protocol) if metric == "auroc" else None
    rows = []
    for (normal_class, label), group in subset.groupby(["normal_class", "label"]):
        ok = group[group["status"] == "ok"]
        mean, sd, n = mean_sd(ok[metric].astype(float).to_numpy())
        class_name = CLASS_NAMES[dataset][int(normal_class)]
        ref = paper.loc[class_name, label] if paper is not None and label in paper.columns else None
        rows.append({"class_name": class_name, "normal_class": int(normal_class), "label": label, "mean": mean,
                     "sd": sd, "n": n, "runs": len(group),
                     "not_ok": ", ".join(sorted(group.loc[group["status"] != "ok", "status"])),
                     "paper": ref, "verdict": verdict(mean, sd, n, ref)})
    return pd.DataFrame(rows, columns=["class_name", "normal_class", "label", "mean", "sd", "n", "runs", "not_ok",
                                       "paper", "verdict"])


def dataset_mean_stats(frame: pd.DataFrame, dataset: str, label: str, metric: str = "auroc") -> dict:
    """The "mean" row of one detector.

    Per seed the mean over the classes, then mean ± sd over the seeds with every class ok; otherwise the
    mean of the class means with `classes` < 10.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    label : str
        The detector's label.
    metric : str, default="auroc"
        The metric column.

    Returns
    -------
    dict
        The statistics.
    """
    subset = frame[(frame["dataset"] == dataset) & (frame["label"] == label) & (frame["status"] == "ok")]
    n_classes = len(CLASS_NAMES[dataset])
    per_seed = subset.groupby("seed").agg(classes=("normal_class", "nunique"), value=(metric, "mean"))
    complete = per_seed[per_seed["classes"] == n_classes]["value"].to_numpy(dtype=float)
    if len(complete):
        mean, sd, n = mean_sd(complete)
        return {"mean": mean, "sd": sd, "n": n, "classes": n_classes}
    class_means = subset.groupby("normal_class")[metric].mean()
    return {"mean": float(class_means.mean()) if len(class_means) else math.nan, "sd": math.nan, "n": 0,
            "classes": int(len(class_means))}


# ---- tables -------------------------------------------------------------------------------------
def seeds_tables(frame: pd.DataFrame, dataset: str, protocol: str = "paper"
                 ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Per-class and dataset-mean tables over the seeds, detectors as columns in the paper's order.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    protocol : str, default="paper"
        The records' protocol, which chooses the published values (`_paper`).

    Returns
    -------
    cells : pandas.DataFrame
        Cells "mean ± sd (paper)".
    verdicts : pandas.DataFrame
        The verdicts.
    footer : str
        The footer.
    """
    subset = frame[frame["dataset"] == dataset]
    labels = _labels(subset)
    classes = CLASS_NAMES[dataset]
    cells = pd.DataFrame(DASH, index=[*classes, "mean"], columns=labels)
    verdicts = pd.DataFrame(DASH, index=[*classes, "mean"], columns=labels)
    paper = _paper(dataset, protocol)
    stats_frame = seed_stats(subset, dataset, protocol=protocol)
    expected = int(stats_frame["n"].max()) if len(stats_frame) else 0
    expected = max(expected, int(subset["seed"].nunique()) if len(subset) else 0)

    def paper_text(row: str, label: str) -> str:
        value = paper.loc[row, label] if label in paper.columns and row in paper.index else None
        return f" ({value:.4f})" if value is not None and not pd.isna(value) else ""

    for row in stats_frame.itertuples():
        text = format_cell(row.mean, row.sd, row.n, expected)
        if row.n == 0:
            text = row.not_ok or DASH
        elif row.not_ok:
            text += f" [{row.not_ok}]"
        cells.loc[row.class_name, row.label] = text + paper_text(row.class_name, row.label)
        verdicts.loc[row.class_name, row.label] = row.verdict or DASH
    for label in labels:
        m = dataset_mean_stats(subset, dataset, label)
        if m["classes"] == 0:
            continue
        text = format_cell(m["mean"], m["sd"], max(m["n"], 1), expected if m["n"] else 1)
        if m["classes"] < len(classes):
            text += f" [{m['classes']}/{len(classes)} classes]"
        cells.loc["mean", label] = text + paper_text("mean", label)
        ref = paper.loc["mean", label] if label in paper.columns else None
        verdicts.loc["mean", label] = (verdict(m["mean"], m["sd"], m["n"], ref) if m["n"] else "") or DASH
    cells.index.name = verdicts.index.name = "normal class"
    value = "paper's value" if protocol == "paper" else "published value"
    footer = (f"Cells: mean ± sd over seeds of the final model's AUROC ({value} in brackets); (n=k): only k of "
              f"{expected} seeds ok; a single seed shows its value alone. Row 'mean': per seed the mean over the "
              f"{len(classes)} classes, then mean ± sd over the seeds that have them all. {verdict_rule(protocol)}\n")
    if note := mean_only_note(frame, dataset, protocol):
        footer += f"{note}\n"
    return cells, verdicts, footer


def _class_means(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Seed-mean AUROC per class (rows: normal_class) x detector (columns)."""
    subset = frame[(frame["dataset"] == dataset) & (frame["status"] == "ok")]
    table = subset.groupby(["normal_class", "label"])["auroc"].mean().unstack("label")
    return table.reindex(columns=[m for m in _labels(frame[frame["dataset"] == dataset]) if m in table.columns])


def rank_table(frame: pd.DataFrame, dataset: str, protocol: str = "paper") -> tuple[Optional[pd.DataFrame], str]:
    """Mean rank (1 = best, ties averaged) of each detector over the classes where every detector has a result.

    Ours and the paper's ranks are taken on the same classes (the published ranks among the detectors with a
    published value for each of those classes).

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    protocol : str, default="paper"
        The records' protocol, which chooses the published values (`_paper`).

    Returns
    -------
    table : pandas.DataFrame or None
        The ranks.
    caption : str
        The caption.
    """
    means = _class_means(frame, dataset)
    complete = means.dropna()
    if means.shape[1] < 2 or complete.empty:
        return None, "Mean rank: needs at least two detectors with results on a common class."
    sign = -1.0 if METRICS["auroc"].higher_is_better else 1.0  # rank 1 = the best
    ranks = pd.DataFrame([stats.rankdata(sign * row.to_numpy(), method="average") for _, row in complete.iterrows()],
                         index=complete.index, columns=complete.columns)
    paper = _paper(dataset, protocol)
    rows = [CLASS_NAMES[dataset][c] for c in complete.index]
    shown = [m for m in complete.columns if m in paper.columns and paper.loc[rows, m].notna().all()]
    paper_rows = paper.loc[rows, shown]
    paper_ranks = pd.DataFrame([stats.rankdata(sign * row.to_numpy(dtype=float), method="average")
                                for _, row in paper_rows.iterrows()],
                               columns=shown) if shown else pd.DataFrame()
    order = ranks.mean().sort_values(kind="stable").index
    paper_mean = paper_ranks.mean() if shown else pd.Series(dtype=float)
    table = pd.DataFrame({"mean rank (ours)": [f"{ranks[m].mean():.2f}" for m in order],
                          f"mean rank ({reference_word(protocol)}, same detectors and classes)":
                              [f"{paper_mean[m]:.2f}" if m in paper_mean.index else DASH for m in order]}, index=order)
    table.index.name = "detector"
    n_classes = len(complete)
    caption = (f"Mean rank over {n_classes} class{'es' if n_classes != 1 else ''} (rank 1 = the highest seed-mean "
               f"AUROC of the class, ties averaged); only classes where all {complete.shape[1]} detectors "
               f"have a result.")
    return table, caption


def wilcoxon_test(differences: np.ndarray) -> dict:
    """Wilcoxon signed-rank test (scipy, two-sided) of paired differences, zeros dropped.

    Parameters
    ----------
    differences : np.ndarray
        reference - other, one per class.

    Returns
    -------
    dict
        n (pairs), n_nonzero, statistic (min(W+, W-)), p (nan when there is nothing to test),
        median (of the differences), higher / lower (counts of positive / negative differences),
        min_p (the smallest two-sided p any outcome could give with n_nonzero pairs: 2 / 2**n).
    """
    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    result = {"n": len(d), "n_nonzero": len(nonzero), "statistic": math.nan, "p": math.nan,
              "median": float(np.median(d)) if len(d) else math.nan,
              "higher": int((d > 0).sum()), "lower": int((d < 0).sum()),
              "min_p": min(1.0, 2.0 / 2 ** len(nonzero)) if len(nonzero) else math.nan}
    if len(nonzero):
        test = stats.wilcoxon(nonzero, alternative="two-sided")
        result["statistic"], result["p"] = float(test.statistic), float(test.pvalue)
    return result


def wilcoxon_sentence(reference: str, other: str, test: dict) -> str:
    """The test's outcome in plain words.

    Parameters
    ----------
    reference : str
        The reference detector's label.
    other : str
        The other detector's label.
    test : dict
        The test's result.

    Returns
    -------
    str
        The sentence.
    """
    if test["n"] == 0:
        return f"{reference} vs {other}: no class has results for both."
    median = test["median"]
    better = reference if median > 0 else other if median < 0 else "neither"
    text = (f"{reference} vs {other} over {test['n']} class{'es' if test['n'] != 1 else ''}: {reference} is higher on "
            f"{test['higher']} of them, lower on {test['lower']} (median difference {median:+.4f}, "
            f"better by the median: {better}).")
    if test["n_nonzero"] == 0:
        return text + " Every difference is zero: nothing to test."
    text += f" Wilcoxon signed-rank W = {test['statistic']:g}, two-sided p = {test['p']:.4g}: "
    if test["min_p"] >= 0.05:
        return text + (f"with {test['n_nonzero']} non-zero pairs no outcome can reach p < 0.05 (the smallest possible "
                       f"two-sided p is 2/2^{test['n_nonzero']} = {test['min_p']:.4g}), so the test cannot show a "
                       "difference; run more classes.")
    if test["p"] < 0.05:
        return text + f"the difference is unlikely to be chance at the 5% level ({better} better)."
    return text + "no difference shown at the 5% level."


def wilcoxon_table(frame: pd.DataFrame, dataset: str, reference: str = REFERENCE_METHOD
                   ) -> tuple[Optional[pd.DataFrame], list[str]]:
    """Wilcoxon signed-rank test of `reference` against every other detector over the classes both have.

    Each class counts with its seed-mean AUROC.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    reference : str, default=REFERENCE_METHOD
        The reference detector's label.

    Returns
    -------
    table : pandas.DataFrame or None
        The tests.
    sentences : list of str
        One sentence per comparison.
    """
    means = _class_means(frame, dataset)
    if reference not in means.columns:
        return None, []
    rows, sentences = [], []
    for other in means.columns:
        if other == reference:
            continue
        pairs = means[[reference, other]].dropna()
        test = wilcoxon_test((pairs[reference] - pairs[other]).to_numpy())
        sentences.append(wilcoxon_sentence(reference, other, test))
        rows.append({"vs": other, "classes": test["n"],
                     f"{reference} higher / lower": f"{test['higher']} / {test['lower']}",
                     "median difference": DASH if pd.isna(test["median"]) else f"{test['median']:+.4f}",
                     "W": DASH if pd.isna(test["statistic"]) else f"{test['statistic']:g}",
                     "p (two-sided)": DASH if pd.isna(test["p"]) else f"{test['p']:.4g}",
                     "better by median": (reference if test["median"] > 0
                                          else other if test["median"] < 0 else "neither")
                     if test["n"] else DASH})
    if not rows:
        return None, []
    return pd.DataFrame(rows).set_index("vs"), sentences


def best_epoch_table(frame: pd.DataFrame, dataset: str, protocol: str = "paper") -> Optional[pd.DataFrame]:
    """Best per-epoch AUROC table, for the runs made with --track-auroc.

    Per class: the final model's AUROC, the best per-epoch AUROC on the TEST set (optimistic: chosen on test
    labels; the paper's probable rule, shown only to compare with it) and the paper's value.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    protocol : str, default="paper"
        The records' protocol, which chooses the published values (`_paper`).

    Returns
    -------
    pandas.DataFrame or None
        The table; None without such runs.
    """
    subset = frame[(frame["dataset"] == dataset) & (frame["status"] == "ok")
                   & frame["best_epoch_auroc_on_test"].notna()]
    if subset.empty:
        return None
    classes = CLASS_NAMES[dataset]
    paper = _paper(dataset, protocol)
    expected = int(subset.groupby(["normal_class", "label"])["seed"].nunique().max())
    columns = {}
    for label in _labels(subset):
        runs = subset[subset["label"] == label]
        for kind, column in (("final", "auroc"), (BEST_EPOCH_COLUMN, "best_epoch_auroc_on_test")):
            cells = []
            for i, class_name in enumerate(classes):
                mean, sd, n = mean_sd(runs.loc[runs["normal_class"] == i, column].to_numpy(dtype=float))
                cells.append(format_cell(mean, sd, n, expected))
            per_class = runs.groupby("normal_class")[column].mean()
            mean_text = DASH if per_class.empty else f"{per_class.mean():.4f}"
            if 0 < len(per_class) < len(classes):
                mean_text += f" [{len(per_class)}/{len(classes)} classes]"
            columns[f"{label}: {kind}"] = [*cells, mean_text]
        if label in paper.columns:
            columns[f"{label}: {reference_word(protocol)}"] = [f"{v:.4f}" if not pd.isna(v) else DASH
                                          for v in paper.loc[[*classes, "mean"], label]]
    table = pd.DataFrame(columns, index=[*classes, "mean"])
    table.index.name = "normal class"
    return table


def memory_health_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The last epoch's memory health of every ok record of a detector with a memory that logged it.

    A detector has a memory when it names the constructor argument that sizes it
    (`Detector.memory_size_param`, the frame's ``memory_size_param`` column); its memory health is
    training_log.per_epoch (MemAE and Mem_GANomaly record it). Older records without it are simply absent.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`benchmark.records.load_records`' columns).

    Returns
    -------
    pandas.DataFrame
        One row per record: dataset, normal_class, label, seed, epochs, slots (the memory's size, None
        when the record does not say) and the last value of each `HEALTH_COLUMNS` key.
    """
    rows = []
    memory = frame[(frame["status"] == "ok") & frame["memory_size_param"].notna()] if len(frame) else frame
    for row in memory.itertuples():
        per_epoch = row.per_epoch if isinstance(row.per_epoch, dict) else {}
        if not per_epoch.get("memory_slots_in_use"):
            continue
        rows.append({"dataset": row.dataset, "normal_class": int(row.normal_class), "label": row.label,
                     "seed": row.seed, "epochs": len(per_epoch["memory_slots_in_use"]),
                     "slots": None if pd.isna(row.memory_size) else row.memory_size,
                     **{key: (per_epoch.get(key) or [math.nan])[-1] for key in HEALTH_COLUMNS}})
    return pd.DataFrame(rows, columns=["dataset", "normal_class", "label", "seed", "epochs", "slots", *HEALTH_COLUMNS])


def memory_health_table(health: pd.DataFrame, dataset: str) -> Optional[pd.DataFrame]:
    """Per detector (in `_labels`' order, that of every table) and class, the last epoch's memory health
    averaged over seeds.

    Parameters
    ----------
    health : pandas.DataFrame
        As `memory_health_rows` returns it.
    dataset : str
        Dataset name.

    Returns
    -------
    pandas.DataFrame or None
        The table; None without rows for `dataset`.
    """
    subset = health[health["dataset"] == dataset]
    if subset.empty:
        return None
    rank = {label: i for i, label in enumerate(_labels(subset))}
    rows = []
    groups = sorted(subset.groupby(["label", "normal_class"]), key=lambda item: (rank[item[0][0]], item[0][1]))
    for (label, normal_class), group in groups:
        slots = group["slots"].iloc[0]  # None (NaN beside sizes) for records that do not say
        in_use = f"{group['memory_slots_in_use'].mean():.1f}"
        row = {"detector": label, "normal class": CLASS_NAMES[dataset][int(normal_class)], "seeds": len(group),
               "epochs": int(group["epochs"].max()),
               "slots in use": in_use if slots is None or pd.isna(slots) else f"{in_use} / {int(slots)}"}
        for key in ("memory_slots_per_query", "memory_max_weight", "query_norm", "memory_row_norm"):
            row[HEALTH_COLUMNS[key]] = f"{group[key].mean():.3g}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("detector")


HEALTH_FOOTER = ("Memory health after the last epoch, measured on the first 512 training images (eval mode, "
                 "methods/memory.py: memory_health), mean over seeds: slots in use = slots whose addressing weight "
                 "is > 0 for at least one query (an image for Mem_GANomaly and MemAE's `image` layout, a bottleneck "
                 "position for MemAE's `position` layout); slots per query = mean number of slots with weight > 0; "
                 "mean largest weight near 1 = each query reads one slot. A collapse reads: ||z|| far above the "
                 "memory-row norm, the largest weight near 1 and few slots in use. The per-epoch values are in "
                 "each record's training_log.per_epoch.\n")


def _report_tables(stem: str, suffix: str, captioned: list[tuple[str, pd.DataFrame]]) -> list[ReportTable]:
    """(caption, table) pairs as report tables; a caption's text after a blank line (e.g. the tests in
    plain words) goes below its table."""
    return [ReportTable(caption=caption.split("\n\n", 1)[0], label=f"{stem}{suffix}-{i}", frame=table,
                        notes=caption.split("\n\n", 1)[1] if "\n\n" in caption else "")
            for i, (caption, table) in enumerate(captioned)]


def verdict_sections(context: ReportContext) -> list[Section]:
    """Every verdict report of one profile: per dataset with records, `seeds_<dataset>` (cells,
    verdicts, ranks, Wilcoxon tests), `best_epoch_<dataset>` (runs with --track-auroc) and
    `memory_health_<dataset>` (records of detectors with a memory that logged its health).

    Parameters
    ----------
    context : ReportContext
        The profile's records (read once, `benchmark.records.load_records`) and provenance footer.

    Returns
    -------
    list of Section
        In dataset order (`benchmark.data.CLASS_NAMES`), per dataset seeds, best epoch, memory health.
    """
    frame, suffix = context.frame, context.suffix
    sections: list[Section] = []
    health = memory_health_rows(frame)
    for dataset in CLASS_NAMES:
        if not (frame["dataset"] == dataset).any():
            continue
        title = TITLES.get(dataset, dataset)
        cells, verdicts, footer = seeds_tables(frame, dataset, context.protocol)
        word = reference_word(context.protocol)
        against = "the paper" if context.protocol == "paper" else "the published values"
        captioned = [(f"AUROC, mean ± sd over seeds ({word}):", cells), (f"Verdict against {against}:", verdicts)]
        ranks, caption = rank_table(frame, dataset, context.protocol)
        if ranks is not None:
            captioned.append((caption, ranks))
        else:
            footer += f"\n{caption}\n"
        tests, sentences = wilcoxon_table(frame, dataset)
        if tests is not None:
            captioned.append((f"Wilcoxon signed-rank tests, {REFERENCE_METHOD} against each detector (paired by "
                              "class, seed-mean AUROC, two-sided):\n\n" + "\n".join(f"- {s}" for s in sentences),
                              tests))
        stem = f"seeds_{dataset}"
        sections.append(Section(stem, f"AUROC over seeds and the verdict against {against}: {title} "
                                f"({context.where})", _report_tables(stem, suffix, captioned),
                                footer + "\n\n" + context.footer))
        best = best_epoch_table(frame, dataset, context.protocol)
        if best is not None:
            stem = f"best_epoch_{dataset}"
            sections.append(Section(
                stem, f"Final model vs the {BEST_EPOCH_TITLE}: {title}",
                _report_tables(stem, suffix, [(f"AUROC, mean ± sd over seeds: the final model (our result) and "
                                               f"the {BEST_EPOCH_TITLE}:", best)]),
                "The best-epoch column is chosen on the TEST labels after every epoch (--track-auroc): optimistic, "
                "never our result and never used for anything else; it is shown because the paper probably "
                "reported it (docs/method.md).\n" + "\n\n" + context.footer))
        health_table = memory_health_table(health, dataset)
        if health_table is not None:
            stem = f"memory_health_{dataset}"
            sections.append(Section(stem, f"Memory health at the last epoch: {title}",
                                    _report_tables(stem, suffix, [("Last epoch, mean over seeds:", health_table)]),
                                    HEALTH_FOOTER + "\n\n" + context.footer))
    return sections


#: The verdict's producer of report sections (benchmark/reports.py, `PRODUCERS`).
VERDICT = Producer("the verdict: seeds, best epoch, memory health", verdict_sections,
                   tuple(f"{kind}_{dataset}" for dataset in CLASS_NAMES
                         for kind in ("seeds", "best_epoch", "memory_health")))

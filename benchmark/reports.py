"""Tables 1-4, figures and one HTML page from the job records alone, beside the paper's numbers.

Per profile, under <reports-dir>/<profile>/ (files of protocol "standard" get a "_standard" suffix),
for each dataset WITH records:

- table{1,2,3}_<dataset>_auroc.{md,tex}: AUROC per normal class and the mean, one column per method
  with records (paper's order first); each cell ours with the published value of the records' protocol
  beside it (`benchmark.labels.published_values`, read through `benchmark.references`): under "paper"
  the Mem_GANomaly paper's Tables 1-3, under "standard" every other source's (Ruff et al.'s Deep SVDD per
  class; GEOM's and GOAD's CIFAR-10 means, in the mean row, as columns of their published values alone
  since the benchmark has no such detector), cited in the notes; bold = best complete value of the row;
  then ours - published for the methods with a published value.
- table{1,2,3}_<dataset>_auroc.png: per-class AUROC dot plot; roc_<dataset>.png: ROC curves per task.
- best_epoch_<dataset>.md (benchmark/verdict.py): only for runs with --track-auroc.

and, with MNIST records, table4_mnist_threshold_metrics.{md,tex}: one row per method, the paper's
Table 4 (threshold = Youden point on the test labels) beside the same metrics at a threshold set
without test labels (the 95th percentile of held-out normal training images' scores). Those label-free
columns come from the records themselves when they hold them (runs made with a held-out share), else,
for a profile folder without a "+val" tag, from the opt-in held-out run beside it
(<results>/<profile>+val<f>/, `--val-fraction f`, trained on 1 - f of the normal images); without
either, Table 4 has the Youden columns only and its notes say how to get the others. With more than two
detectors and at least five (dataset, class) tasks where all have a result, friedman.{md,tex} and
critical_difference.png: the Friedman test over those tasks, the Nemenyi critical difference and the CD
diagram (benchmark/friedman.py) with a line in plain words. Finally records.csv (one row per record) and
index.html (every table and figure on one self-contained page).

Every table lists the detectors in one order, `method_order`'s (benchmark/labels.py): the paper's Table 1
columns, then any other detector alphabetically.

How it is built: the records are read once (`load_records`, benchmark/records.py) into a
`benchmark.render.ReportContext`; each of `PRODUCERS` (Tables 1-3, the verdict of benchmark/verdict.py,
Table 4, the Friedman test) makes `benchmark.render.Section` objects from it, and `write_reports` writes
every section the same way (Markdown, LaTeX where it has it, its PNG figures, one part of index.html) and
removes the files of the producers' stems that it did not write. Another table or figure is one more `Producer`.

The report layer reads records and scores only: it imports no detector module and no torch (the
registry, `methods`, which is torch-free, tells which detectors have a memory). A method's display label
comes from its record (`method_label`); older records fall back to the paper's label of the same name,
else the method name (`display_label`, benchmark/labels.py). A missing cell is a dash, never a zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from benchmark import figures, friedman
from benchmark.data import CLASS_NAMES
from benchmark.datasets import PAPER_TABLES as TABLES  # dataset -> ("table<k>", reference CSV)
from benchmark.datasets import TITLES
from benchmark.html_report import html_page
from benchmark.labels import TABLE4_CSV as TABLE4_CSV

# The names imported `as` themselves are defined in benchmark/labels.py (below this module and the verdict)
# and re-exported: the reports' users import them from here.
from benchmark.labels import display_label as display_label
from benchmark.labels import method_order as method_order
from benchmark.labels import paper_labels as paper_labels
from benchmark.labels import published_citations, published_values, reference_word, runnable_labels
from benchmark.labels import reference_table as reference_table
from benchmark.metrics import METRICS, THRESHOLD_METRICS
from benchmark.records import COLUMNS, VAL_METRICS, _atomic_write

# Defined in benchmark/records.py (below the verdict, which reads the same frame) and re-exported.
from benchmark.records import load_records as load_records
from benchmark.render import DASH, Cell, Figure, Producer, ReportContext, ReportTable, Section, format_value
from benchmark.verdict import VERDICT


def precision_note(frame: pd.DataFrame) -> str:
    """A sentence naming the detectors trained in another precision than fp32, or "" when all are fp32.

    The default (`--precision auto`) trains some detectors in bf16 and the others in fp32, so a table
    says which; a detector whose records of one dataset are in two precisions (the runner refuses to
    make such a folder, but records can be copied in) is named as mixed.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).

    Returns
    -------
    str
        The note.
    """
    if frame.empty or "precision" not in frame or set(frame["precision"]) <= {"fp32"}:
        return ""
    by_method = frame.groupby("label", sort=True)["precision"].agg(lambda values: sorted(set(values)))
    parts = [f"{precision}: {', '.join(label for label, found in by_method.items() if found == [precision])}"
             for precision in sorted(set(frame["precision"]))
             if any(found == [precision] for found in by_method.values)]
    note = "Training precision (each record's run_info): " + "; ".join(parts) + "."
    mixed = sorted({f"{r.label} on {r.dataset}" for r in
                    frame.groupby(["label", "dataset"])["precision"].nunique().reset_index().itertuples()
                    if r.precision > 1})
    if mixed:
        note += (f" MIXED precisions within one detector's results: {', '.join(mixed)}; its means average over "
                 "both. Move one precision's records to another results folder and rebuild the reports.")
    return note


def thread_counts_note(frame: pd.DataFrame, listed: int = 8) -> str:
    """A sentence naming the records made at a thread count other than the most common one, or "".

    Scores are bit-identical only at one torch / BLAS thread count, so a table mixing counts (a rerun
    with another --jobs or --threads) says so rather than mixing them silently.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    listed : int, default=8
        How many records to name before "and N more".

    Returns
    -------
    str
        The note.
    """
    known = frame[frame["threads"].notna()] if "threads" in frame else frame.iloc[0:0]
    counts = known["threads"].astype(int).value_counts()
    if len(counts) < 2:
        return ""
    usual = int(counts.index[0])
    others = known[known["threads"].astype(int) != usual]
    names = [f"{r.dataset}/{r.method}/class{r.normal_class}/seed{r.seed} ({int(r.threads)})"
             for r in others.sort_values(["dataset", "method", "normal_class", "seed"]).itertuples()]
    more = f" and {len(names) - listed} more" if len(names) > listed else ""
    return (f"Mixed thread counts: {int(counts.iloc[0])} records were trained with {usual} threads per job, "
            f"{len(others)} with another count (threads in brackets): {', '.join(names[:listed])}{more}. "
            "Scores are bit-identical only at one thread count: to make the table uniform, delete those records "
            f"and run the same command again with --threads {usual}.")


def in_method_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Record rows sorted by protocol, dataset and `method_order`, otherwise in their order (a stable sort).

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).

    Returns
    -------
    pandas.DataFrame
        The same rows, reordered.
    """
    rank = {label: i for i, label in enumerate(method_order(frame))}
    keys = frame[["protocol", "dataset"]].assign(_rank=frame["label"].map(rank))
    return frame.loc[keys.sort_values(["protocol", "dataset", "_rank"], kind="stable").index]


@dataclass(frozen=True)
class HeldOutRun:
    """The opt-in held-out run beside a profile folder, the source of Table 4's label-free columns.

    Attributes
    ----------
    profile : str
        Its folder name under the results root, e.g. "quick+val0.1".
    fraction : float
        The share f of the normal training images it held out (`--val-fraction f`); it trained on 1 - f.
    frame : pandas.DataFrame
        Its MNIST record rows of the protocol (`load_records`' columns).
    """

    profile: str
    fraction: float
    frame: pd.DataFrame


def held_out_run(results_dir: Path, profile: str, protocol: str = "paper") -> Optional[HeldOutRun]:
    """The held-out run beside a default profile folder, when it has MNIST records of `protocol`.

    Parameters
    ----------
    results_dir : Path
        The results root.
    profile : str
        A profile folder name without a "+val" tag (e.g. "quick"); its sibling is "<profile>+val<f>".
    protocol : str, default="paper"
        The protocol its records must have.

    Returns
    -------
    HeldOutRun or None
        The sibling with the smallest f (the training set closest to the default's) among those with
        MNIST records; None for a profile that is itself a held-out run, or when there is none.
    """
    root = Path(results_dir)
    if re.search(r"\+val\d", profile) or not root.is_dir():
        return None
    found, prefix = [], f"{profile}+val"
    for folder in root.iterdir():
        if not (folder.is_dir() and folder.name.startswith(prefix)):
            continue
        try:
            fraction = float(folder.name[len(prefix):])
        except ValueError:  # e.g. "quick+val0.1+bf16": another variant's folder
            continue
        if not 0.0 < fraction < 1.0:
            continue
        frame, _ = load_records(root, folder.name, protocol)
        frame = frame[frame["dataset"] == "mnist"]
        if len(frame):
            found.append(HeldOutRun(folder.name, fraction, frame))
    return min(found, key=lambda run: (run.fraction, run.profile)) if found else None


def _cell_frame(
    frame: pd.DataFrame, metric: str, classes: list[str], methods: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values, notes) per class x method: the mean of `metric` over ok seeds; notes say
    'diverged' / 'failed' when no seed is ok, or 'k/n seeds ok' when only some are."""
    values = pd.DataFrame(np.nan, index=classes, columns=methods)
    notes = pd.DataFrame("", index=classes, columns=methods)
    for (class_name, label), group in frame.groupby(["class_name", "label"]):
        if class_name not in values.index or label not in values.columns:
            continue
        ok = group[(group["status"] == "ok") & group[metric].notna()]
        if len(ok):
            values.loc[class_name, label] = ok[metric].astype(float).mean()
            if len(ok) < len(group):
                notes.loc[class_name, label] = f"{len(ok)}/{len(group)} seeds ok"
        else:
            notes.loc[class_name, label] = "/".join(sorted(set(group["status"]) - {"ok"}) or ["no value"])
    return values, notes


def _means(values: pd.DataFrame, notes: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(mean over the classes present, its note 'k/n classes' when partial, complete?). A mean is
    complete when every class has a value from all its seeds."""
    n = len(values.index)
    counts = values.notna().sum()
    complete = (counts == n) & (notes == "").all()
    note = pd.Series(
        {m: "" if counts[m] in (0, n) else f"{counts[m]}/{n} classes" for m in values.columns}, dtype=object
    )
    note[(counts == n) & ~complete] = "some seeds failed"
    return values.mean(), note, complete


def _best(values: pd.Series, complete: pd.Series, lower_is_better: bool = False) -> pd.Series:
    """True where a complete value is the best of the complete ones (ties all bold)."""
    candidates = values[complete & values.notna()]
    if candidates.empty:
        return pd.Series(False, index=values.index)
    best = candidates.min() if lower_is_better else candidates.max()
    return complete & values.notna() & np.isclose(values.astype(float), best, rtol=0, atol=5e-5)


def auroc_tables(
    frame: pd.DataFrame, dataset: str, profile: str = "", protocol: str = "paper"
) -> tuple[ReportTable, Optional[ReportTable]]:
    """AUROC tables for Tables 1-3: one column per method with records on `dataset`.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    dataset : str
        Dataset name.
    profile : str, default=""
        Profile name, for the caption.
    protocol : str, default="paper"
        Protocol name, for the caption.

    Returns
    -------
    auroc : ReportTable
        The AUROC table, 'ours (paper)'.
    difference : ReportTable or None
        The difference table ours - paper, or None.
    """
    number, _ = TABLES[dataset]
    classes = CLASS_NAMES[dataset]
    subset = frame[frame["dataset"] == dataset]
    ran = method_order(subset)
    paper = published_values(protocol, dataset)
    # Under a protocol other than the paper's, a published method without records in this run (GEOM and GOAD
    # until they are run) gets a column of its published values alone. Under the paper protocol the columns
    # stay the detectors that ran (the paper's own tables are the reference of every one of them).
    published_only = sorted(m for m in paper.columns if m not in ran and (protocol != "paper" or m not in
                                                                          runnable_labels()))
    methods = ran + published_only
    values, notes = _cell_frame(subset, "auroc", classes, methods)
    means, mean_notes, complete_mean = _means(values, notes)

    rows = {}
    for class_name in classes:
        complete = values.loc[class_name].notna() & (notes.loc[class_name] == "")
        bold = _best(values.loc[class_name], complete)
        rows[class_name] = [
            _auroc_cell(values.loc[class_name, m], notes.loc[class_name, m], bold[m], paper.loc[class_name].get(m))
            for m in methods
        ]
    bold = _best(means, complete_mean)
    rows["mean"] = [_auroc_cell(means[m], mean_notes[m], bold[m], paper.loc["mean"].get(m)) for m in methods]
    cells = pd.DataFrame.from_dict(rows, orient="index", columns=methods)
    cells.index.name = "normal class"
    where = f"{profile} profile, {protocol} protocol" if profile else f"{protocol} protocol"
    title = TITLES[dataset]
    thread_note = f" {note}" if (note := thread_counts_note(subset)) else ""
    if protocol == "paper":
        caption = f"AUROC on {title} per normal class, ours (paper) ({where}; the paper's Table {number[-1]})"
        notes_text = (
            f"Ours: the final model's AUROC, mean over seeds; (paper): the paper's value, {DASH} where it has none. "
            f"Bold: best of ours in the row among complete values; a mean is complete when it covers every class "
            f"and seed. [k/n]: only part of the classes or seeds; failed / diverged: no ok seed." + thread_note
        )
    else:
        caption = f"AUROC on {title} per normal class, ours (published) ({where})"
        notes_text = (
            f"Ours: the final model's AUROC, mean over seeds; (published): the value another paper reports under "
            f"the {protocol} protocol, {DASH} where it has none. Bold: best of ours in the row among complete values; "
            f"a mean is complete when it covers every class and seed. [k/n]: only part of the classes or seeds; "
            f"failed / diverged: no ok seed." + thread_note + " "
            + published_note(protocol, dataset, published_only, methods)
        )
    paired = ReportTable(
        caption=caption,
        label=f"{number}_{dataset}_auroc" + ("" if protocol == "paper" else f"_{protocol}"),
        frame=cells,
        notes=notes_text,
    )

    with_paper = [m for m in ran if m in paper.columns]
    diff_table = None
    if with_paper:
        class_diff = values.loc[classes, with_paper] - paper.loc[classes, with_paper].astype(float)
        mean_diff = class_diff.mean()
        # A source that gives only the mean over the classes (GEOM's, GOAD's): our complete mean minus it.
        mean_only = [m for m in with_paper if class_diff[m].isna().all() and complete_mean[m]
                     and pd.notna(paper.loc["mean"].get(m))]
        for m in mean_only:
            mean_diff[m] = means[m] - float(paper.loc["mean", m])
        if class_diff.notna().any().any() or mean_only:
            diff = pd.concat([class_diff, mean_diff.to_frame("mean").T])
            diff = diff.map(lambda v: DASH if pd.isna(v) else f"{v:+.4f}")
            diff.index.name = "normal class"
            the = "the paper's" if protocol == "paper" else "the published values"
            diff_table = ReportTable(
                caption=f"AUROC on {title}: ours minus {the} ({where})",
                label=f"{number}_{dataset}_auroc_difference" + ("" if protocol == "paper" else f"_{protocol}"),
                frame=diff,
                notes="The mean row averages the per-class differences, so a partial column is compared with "
                f"{'the paper' if protocol == 'paper' else 'the published values'} on the same classes only"
                + (f"; for {', '.join(mean_only)}, whose source gives only the mean over the classes, it is our "
                   "complete mean minus that mean." if mean_only else "."),
            )
    return paired, diff_table


def published_note(protocol: str, dataset: str, published_only: list[str], shown: list[str]) -> str:
    """The notes' sentences on the published values of a protocol other than the paper's: their sources,
    the columns of published values alone, and the sources that give only a mean.

    Parameters
    ----------
    protocol : str
        The records' protocol.
    dataset : str
        Dataset name.
    published_only : list of str
        The columns of published values without a detector here.
    shown : list of str
        The table's columns: only their sources are cited.

    Returns
    -------
    str
        The sentences.
    """
    sources = {m: cite for m, cite in published_citations(protocol, dataset).items() if m in shown}
    if not sources:
        return (f"No source in benchmark/reference/sources/ reports {TITLES[dataset]} under the {protocol} protocol "
                f"for the detectors shown (the Mem_GANomaly paper's values belong to the paper protocol only).")
    paper = published_values(protocol, dataset)
    mean_only = [m for m in paper.columns if paper.loc[CLASS_NAMES[dataset], m].isna().all()]
    text = "Published values: " + "; ".join(f"{m}: {cite}" for m, cite in sources.items()) + "."
    if published_only:
        their = "its" if len(published_only) == 1 else "their"
        text += f" {_join(published_only)}: no records in this run, {their} published values alone."
    if mean_only:
        text += f" {_join(mean_only)}: the source gives only the mean over the classes ({DASH} per class)."
    return text


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _auroc_cell(value: float, note: str, bold: bool, paper_value: Optional[float]) -> Cell:
    ref = format_value(paper_value) if paper_value is not None and not pd.isna(paper_value) else DASH
    if pd.isna(value):
        return Cell(note or DASH, ref)
    return Cell(format_value(float(value)), ref, note, bool(bold))


def table4(
    frame: pd.DataFrame, profile: str = "", protocol: str = "paper", held_out: Optional[HeldOutRun] = None
) -> Optional[ReportTable]:
    """Table 4: mean gmean / false-alarm / miss rate over the MNIST classes, one row per method.

    At the paper's Youden threshold (test labels; the paper's value beside ours) and at the held-out
    validation threshold (no test labels): from the records when they have it, else from `held_out`.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows (`load_records`' columns).
    profile : str, default=""
        Profile name, for the caption.
    protocol : str, default="paper"
        Protocol name, for the caption.
    held_out : HeldOutRun, optional
        The opt-in held-out run beside this profile (`held_out_run`); its records give the label-free
        columns when `frame`'s records hold none.

    Returns
    -------
    ReportTable or None
        The table; None without MNIST records in `frame`.
    """
    subset = frame[frame["dataset"] == "mnist"]
    if subset.empty:
        return None
    reference = pd.DataFrame({metric: published_values(protocol, "mnist", metric).loc["mean"]
                              for metric in THRESHOLD_METRICS}).T
    # Under a protocol no source reports threshold metrics for, ours stand alone (no "(paper)" line).
    has_reference = reference.notna().any().any()
    classes = CLASS_NAMES["mnist"]
    own_val = subset[list(VAL_METRICS)].notna().any().any()
    val_rows = subset if own_val else held_out.frame if held_out is not None else None
    has_val = val_rows is not None
    methods = method_order(list(subset["label"]) + (list(val_rows["label"]) if has_val else []))
    groups = [("Youden point on the test labels (paper)", 3)]
    metrics = [(m, m, False) for m in THRESHOLD_METRICS]
    if has_val:
        percentile = val_rows["val_percentile"].dropna()
        pct = f"{percentile.iloc[0]:g}th" if len(percentile) and percentile.nunique() == 1 else "a"
        source = "" if own_val else f"; held-out run, f = {held_out.fraction:g}"
        groups.append((f"{pct} percentile of held-out normals (no test labels{source})", 3))
        metrics += [(f"val_{m}", m, True) for m in THRESHOLD_METRICS]
    columns = {}
    for column, metric, is_val in metrics:
        values, notes = _cell_frame(val_rows if is_val else subset, column, classes, methods)
        means, mean_notes, complete = _means(values, notes)
        bold = _best(means, complete, lower_is_better=not METRICS[metric].higher_is_better)
        paper = reference.loc[metric] if metric in reference.index else pd.Series(dtype=float)
        cells = []
        for m in methods:
            ref = None if is_val or not has_reference else (
                format_value(float(paper[m])) if m in paper.index and not pd.isna(paper[m]) else DASH)
            if pd.isna(means[m]):
                cells.append(Cell(DASH, ref))
            else:
                cells.append(Cell(format_value(float(means[m])), ref, mean_notes[m], bool(bold[m])))
        columns[column] = cells
    table = pd.DataFrame(columns, index=pd.Index(methods, name="method"))
    table.columns = [METRICS[metric].label for _, metric, _ in metrics]  # repeated per group: cells go by position
    where = f"{profile} profile, {protocol} protocol" if profile else f"{protocol} protocol"
    youden = (
        "the paper's Table 4 rule, the ROC point maximising Youden's J chosen on the test labels (optimistic: "
        "no deployed detector can do this), ours (paper). "
    )
    if protocol != "paper":
        youden = youden.replace("ours (paper). ", "ours (published). " if has_reference else "ours. ")
        if not has_reference:
            youden += (f"No source reports these metrics under the {protocol} protocol (the paper's Table 4 belongs "
                       "to the paper protocol only). ")
    if has_val and not own_val:
        f, kept, held = f"{held_out.fraction:g}", f"{100 * (1 - held_out.fraction):g}%", f"{100 * held_out.fraction:g}%"
        sides = (
            f"Left: {youden}Right: from the opt-in held-out run (--val-fraction {f}, records under "
            f"{held_out.profile}/), other models than the left's: they trained on {kept} (1 - f) of the normal "
            "training images, the left's on all of them. Its threshold is set without test labels: a percentile of "
            f"the scores of the held-out {held} (f) of the normal training images, never used in fitting (the same "
            "images for every method and seed). "
        )
    elif has_val:
        sides = (
            f"Left: {youden}Right: a threshold set without test labels, a percentile of the scores of held-out "
            "normal training images never used in fitting (the same images for every method and seed). "
        )
    else:
        sides = youden[0].upper() + youden[1:]
    notes = (
        "Mean over the MNIST classes (normal = the positive class): false-alarm rate = normals flagged "
        "anomalous, miss rate = anomalies accepted. "
        + sides
        + f"Bold: best complete mean of the column; [k/n]: only part of the classes; {DASH}: no value."
    )
    if not has_val:
        notes += (
            " No label-free columns: these records hold no held-out validation scores (made with the default "
            "--val-fraction 0, which trains on every normal training image as the paper does, or made before the "
            "validation split existed). To add them, run the same command again with --val-fraction 0.1: an "
            "opt-in held-out run that trains on 90% of the normal training images and keeps its records in their "
            f"own folder ({profile or '<profile>'}+val0.1/); this table then shows its label-free columns."
        )
    if has_val and not own_val:
        caption = (
            f"Mean threshold metrics on MNIST ({where}; the paper's Table 4, and a threshold without test labels "
            f"from the held-out run trained on {kept} of the normal images)"
        )
    elif has_val:
        caption = f"Mean threshold metrics on MNIST ({where}; the paper's Table 4 and a threshold without test labels)"
    else:
        caption = f"Mean threshold metrics on MNIST ({where}; the paper's Table 4)"
    return ReportTable(
        caption=caption,
        label="table4_mnist_threshold_metrics" + ("" if protocol == "paper" else f"_{protocol}"),
        frame=table,
        notes=notes,
        column_groups=groups,
    )


def auroc_sections(context: ReportContext) -> list[Section]:
    """Tables 1-3: per dataset of the paper with records, its AUROC table (and the difference to the
    paper's), the per-class AUROC dot plot and the ROC curves.

    Parameters
    ----------
    context : ReportContext
        The profile's records and provenance footer.

    Returns
    -------
    list of Section
        One per dataset with records, in the paper's table order; stem ``table<k>_<dataset>_auroc``.
    """
    frame = context.frame
    sections = []
    for dataset, (number, csv_name) in TABLES.items():
        subset = frame[frame["dataset"] == dataset]
        if subset.empty:
            continue
        stem, title = csv_name.replace(".csv", ""), TITLES[dataset]
        paired, diff = auroc_tables(frame, dataset, context.profile, context.protocol)
        values, _ = _cell_frame(subset, "auroc", CLASS_NAMES[dataset], method_order(subset))
        paper = published_values(context.protocol, dataset).drop(index="mean")
        theirs = "the paper's" if context.protocol == "paper" else "published values"
        pictures = [Figure(stem, f"AUROC per normal class on {title}: ours (filled), {theirs} (hollow).",
                           figures.auroc_figure(values, paper, f"{title}: AUROC per normal class",
                                               reference_word(context.protocol)))]
        roc = figures.roc_figure(subset, context.results_dir, CLASS_NAMES[dataset], method_order(subset),
                                 f"{title}: ROC curves per task ({context.where})")
        if roc is not None:
            pictures.append(Figure(f"roc_{dataset}", f"ROC curves on {title}, one panel per normal class, every "
                                   "detector overlaid (anomaly = positive; averaged vertically over the ok seeds).",
                                   roc))
        sections.append(Section(stem, f"Table {number[-1]}: AUROC on {title} ({context.where})",
                                [paired] + ([diff] if diff is not None else []), context.footer, pictures,
                                latex=True))
    return sections


def table4_sections(context: ReportContext) -> list[Section]:
    """Table 4, with MNIST records: the threshold metrics, with the label-free columns from the records
    or from the held-out run beside the profile (`held_out_run`).

    Parameters
    ----------
    context : ReportContext
        The profile's records and provenance footer.

    Returns
    -------
    list of Section
        One section, stem ``table4_mnist_threshold_metrics``; none without MNIST records.
    """
    frame = context.frame
    mnist = frame[frame["dataset"] == "mnist"]
    # Records that hold their own label-free metrics (made with a held-out share) keep showing them.
    own_val = mnist[list(VAL_METRICS)].notna().any().any()
    held_out = (None if mnist.empty or own_val
                else held_out_run(context.results_dir, context.profile, context.protocol))
    table = table4(frame, context.profile, context.protocol, held_out)
    if table is None:
        return []
    footer = context.footer
    if held_out is not None:
        footer += (
            f"\nThe label-free columns: from {len(held_out.frame)} MNIST records under "
            f"`{Path(context.results_dir) / held_out.profile}` (the held-out run, --val-fraction "
            f"{held_out.fraction:g}).\n"
        )
    return [Section("table4_mnist_threshold_metrics", f"Table 4: mean threshold metrics on MNIST ({context.where})",
                    [table], footer, latex=True)]


FRIEDMAN_STEM = "friedman"
CD_STEM = "critical_difference"


def friedman_sections(context: ReportContext) -> list[Section]:
    """One comparison over every task of the run: the Friedman test, the Nemenyi critical difference and
    the critical-difference diagram (Demsar 2006; `benchmark.friedman`), with a line in plain words.

    A task is a (dataset, normal class) pair; each detector counts with its seed-mean AUROC over the ok
    seeds (`benchmark.friedman.wide_scores`). Only the tasks where every detector of the run has a result
    are ranked (the footer names the others). Made when `benchmark.friedman.applies`: more than two
    detectors and at least five such tasks.

    Parameters
    ----------
    context : ReportContext
        The profile's records and provenance footer.

    Returns
    -------
    list of Section
        One section, stem ``friedman``, with the figure ``critical_difference``; none when the test
        does not apply.
    """
    frame = context.frame
    ok = frame[(frame["status"] == "ok") & frame["auroc"].notna()] if len(frame) else frame
    if ok.empty:
        return []
    scores = friedman.wide_scores(ok.assign(auroc=ok["auroc"].astype(float)))
    scores = scores.reindex(columns=method_order(ok))
    complete, dropped = friedman.complete_tasks(scores)
    if not friedman.applies(scores.shape[1], len(complete)):
        return []
    result = friedman.friedman_test(complete)
    letters = {detector: [] for detector in result.detectors}
    for i, clique in enumerate(result.cliques):
        for detector in clique:
            letters[detector].append(chr(ord("a") + i) if i < 26 else str(i + 1))
    ranks = pd.DataFrame({"average rank": [f"{result.average_ranks[d]:.2f}" for d in result.detectors],
                          "group": [", ".join(letters[d]) or DASH for d in result.detectors]},
                         index=pd.Index(result.detectors, name="detector"))
    k, n = len(result.detectors), result.n_tasks
    statistics = pd.DataFrame({"value": [
        str(n), str(k),
        f"{result.chi2:.3f}", _p_text(result.p_value),
        f"{result.f_statistic:.3f}" if np.isfinite(result.f_statistic) else "inf", _p_text(result.f_p_value),
        f"{result.q_alpha:.3f}", f"{result.critical_difference:.3f}",
    ]}, index=pd.Index([
        "tasks N", "detectors k",
        f"Friedman chi2_F ({k - 1} df)", "p (chi-square)",
        f"Iman-Davenport F_F ({k - 1}, {(k - 1) * (n - 1)} df)", "p (F)",
        f"Nemenyi q at alpha {result.alpha:g}", "critical difference CD",
    ], name="statistic"))
    suffix = context.suffix
    tables = [
        ReportTable(
            caption=f"Average AUROC rank over {n} tasks (rank 1 = best; {context.where})",
            label=f"{FRIEDMAN_STEM}{suffix}-ranks", frame=ranks,
            notes=(f"Per task (dataset, normal class), the detectors' seed-mean AUROCs ranked, ties averaged. "
                   f"Detectors sharing a letter are not significantly different (Nemenyi, CD = "
                   f"{result.critical_difference:.2f} at alpha {result.alpha:g}); {DASH}: in no group, significantly "
                   "different from every other detector. Read the groups only when the Friedman test rejects."),
        ),
        ReportTable(
            caption=f"Friedman test over every task ({context.where})",
            label=f"{FRIEDMAN_STEM}{suffix}-tests", frame=statistics,
            notes=("Friedman's chi2_F with the tie correction of scipy.stats.friedmanchisquare; Iman-Davenport "
                   "F_F = (N - 1) chi2_F / (N (k - 1) - chi2_F); CD = q sqrt(k (k + 1) / (6 N)) (Demsar 2006)."),
        ),
    ]
    datasets = ", ".join(TITLES.get(d, d) for d in dict.fromkeys(t[0] for t in complete.index))
    caption = (f"Critical-difference diagram of the average AUROC ranks over {n} tasks ({datasets}): detectors "
               f"joined by a bar are not significantly different (Nemenyi, alpha {result.alpha:g}).")
    figure = Figure(CD_STEM, caption, friedman.cd_diagram_png(result, f"Average AUROC rank ({context.where})"),
                    reading=result.reading)
    footer = (f"Tasks ranked: every (dataset, normal class) with a result from each of the {k} detectors "
              f"({n} of {len(scores)}).")
    if dropped:
        names = [f"{dataset}/{CLASS_NAMES[dataset][int(c)]}" for dataset, c in dropped]
        footer += f" Left out, some detector has no ok result there: {', '.join(names)}."
    return [Section(FRIEDMAN_STEM, f"Friedman test and critical-difference diagram over every task ({context.where})",
                    tables, footer + "\n\n" + context.footer, [figure], latex=True, latex_figures=True)]


def _p_text(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


#: Tables 1-3 (AUROC per normal class, with their figures).
AUROC_TABLES = Producer("Tables 1-3: AUROC per normal class", auroc_sections,
                        tuple(stem for dataset, (_, csv_name) in TABLES.items()
                              for stem in (csv_name.replace(".csv", ""), f"roc_{dataset}")))
#: Table 4 (threshold metrics on MNIST).
TABLE4 = Producer("Table 4: threshold metrics", table4_sections, ("table4_mnist_threshold_metrics",))
#: The Friedman test and critical-difference diagram over every task of the run.
FRIEDMAN = Producer("the Friedman test and critical-difference diagram", friedman_sections, (FRIEDMAN_STEM, CD_STEM))
#: Every report section, in the page's order: Tables 1-3, the verdict (seeds, best epoch, memory health),
#: Table 4, the Friedman test. A new kind of table or figure is one more `Producer` here.
PRODUCERS: tuple[Producer, ...] = (AUROC_TABLES, VERDICT, TABLE4, FRIEDMAN)
#: File stems that earlier versions wrote and no producer writes now: removed as stale like the producers'.
RETIRED_STEMS: tuple[str, ...] = tuple(f"diagnostics_{dataset}" for dataset in TABLES)
#: The extensions of a section's files (`benchmark.render.Section`).
SECTION_EXTENSIONS = (".md", ".tex", ".png")


def write_reports(results_dir: Path, reports_dir: Path, profile: str, protocol: str = "paper",
                  producers: tuple[Producer, ...] = PRODUCERS) -> list[Path]:
    """Build every table, figure and the HTML page of one profile from its records.

    The records are read once (`load_records`); each of `producers` makes its sections from them, and
    each section is written as Markdown (plus LaTeX and PNG figures where it has them) and shown on
    index.html, in the producers' order; records.csv lists every record.

    Parameters
    ----------
    results_dir, reports_dir : Path
        The results root (holding <profile>/) and the reports root (receiving <profile>/).
    profile : str
        Profile directory name (e.g. "quick" or "quick+lr2e-4").
    protocol : str
        Only records of this protocol are reported.
    producers : tuple of Producer, default=PRODUCERS
        The kinds of report sections to make.

    Returns
    -------
    list of Path
        The files written. Every file is written to a unique temporary name in the target folder
        and renamed over the old one, so two processes writing the same reports at once each
        succeed (the last rename wins) and a reader never sees a half-written file. The files of
        the producers' stems (and `RETIRED_STEMS`) that this run did not write, e.g. the tables of
        a dataset that no longer has records, are removed.
    """
    frame, problems = load_records(results_dir, profile, protocol)
    out_dir = Path(reports_dir) / profile
    footer = (
        f"From {len(frame)} records under `{Path(results_dir) / profile}` (profile `{profile}`, protocol "
        f"`{protocol}`); each number is the final model's after a fixed budget.\n"
    )
    if threads_note := thread_counts_note(frame):
        footer += f"\n{threads_note}\n"
    if precision_note_text := precision_note(frame):
        footer += f"\n{precision_note_text}\n"
    if problems:
        footer += "\nUnreadable records, treated as missing:\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    context = ReportContext(Path(results_dir), profile, protocol, frame, footer)
    suffix = context.suffix
    written: list[Path] = []

    def save(name: str, data: bytes) -> Path:
        path = out_dir / name
        _atomic_write(path, lambda handle: handle.write(data))
        written.append(path)
        return path

    page = []  # (heading, tables, [(file name, caption, PNG)]) per section, for the HTML page
    for section in (section for producer in producers for section in producer.sections(context)):
        save(f"{section.stem}{suffix}.md", section.to_markdown(suffix).encode())
        if section.latex:
            save(f"{section.stem}{suffix}.tex", section.to_latex(suffix).encode())
        pictures = [(save(f"{figure.stem}{suffix}.png", figure.png).name, figure.caption, figure.png, figure.reading)
                    for figure in section.figures]
        page.append((section.title, section.tables, pictures))
    stems = [stem for producer in producers for stem in producer.stems] + list(RETIRED_STEMS)
    for stale in (out_dir / f"{stem}{suffix}{ext}" for stem in stems for ext in SECTION_EXTENSIONS):
        if stale not in written:
            stale.unlink(missing_ok=True)
    save(f"records{suffix}.csv", in_method_order(frame)[COLUMNS].to_csv(index=False).encode())
    save(f"index{suffix}.html",
         html_page(f"Benchmark report: {context.where}", page, footer, f"records{suffix}.csv").encode())
    return written

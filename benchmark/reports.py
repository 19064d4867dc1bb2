"""Tables 1-4 from the job records alone, beside the paper's numbers.

Per profile, under <reports-dir>/<profile>/: table1_mnist_auroc, table2_fashion_mnist_auroc,
table3_cifar10_auroc (AUROC per class and the mean; methods in the paper's column order; best
of ours per row in bold; each cell "ours (paper)"; then a difference table ours - paper) and
table4_mnist_threshold_metrics (mean gmean, false-alarm and miss rate over the MNIST classes),
each as .md and .tex, plus records.csv (one row per record). Files of protocol "standard" get a
"_standard" suffix. A missing cell is a dash, never a zero; failed / diverged cells say so.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from benchmark.data import CLASS_NAMES
from benchmark.records import _atomic_write, iter_records

DASH = "–"
TABLES = {"mnist": ("table1", "table1_mnist_auroc.csv"),
          "fashion_mnist": ("table2", "table2_fashion_mnist_auroc.csv"),
          "cifar10": ("table3", "table3_cifar10_auroc.csv")}
TABLE4_CSV = "table4_mnist_threshold_metrics.csv"
THRESHOLD_METRICS = ("gmean", "false_alarm_rate", "miss_rate")
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def reference_table(csv_name: str) -> pd.DataFrame:
    """The paper's numbers, shipped as package data (benchmark/reference/)."""
    with resources.files("benchmark").joinpath("reference", csv_name).open("r") as handle:
        return pd.read_csv(handle, index_col=0)


def load_records(results_dir: Path, profile: str, protocol: Optional[str] = None) -> tuple[pd.DataFrame, list[str]]:
    """All readable records of one profile (directory name) as a long frame, and the problems
    (unreadable records, by name), which are treated as missing."""
    from methods import REGISTRY

    rows, problems = [], []
    base = Path(results_dir) / profile
    for path, record, error in iter_records(base):
        if record is None:
            problems.append(error)
            continue
        if protocol is not None and record["protocol"] != protocol:
            continue
        metrics = record.get("metrics") or {}
        sizes = record.get("sizes") or {}
        spec = REGISTRY.get(record["method"])
        rows.append({
            "dataset": record["dataset"], "normal_class": int(record["normal_class"]),
            "class_name": CLASS_NAMES.get(record["dataset"], [str(i) for i in range(10)])[int(record["normal_class"])],
            "method": record["method"], "label": spec.label if spec else record["method"],
            "seed": record["seed"], "profile": record["profile"], "protocol": record["protocol"],
            "status": record["status"], **{m: metrics.get(m) for m in ("auroc", *THRESHOLD_METRICS, "threshold")},
            "train_seconds": record.get("train_seconds"), "score_seconds": record.get("score_seconds"),
            "n_train": sizes.get("n_train"), "n_test": sizes.get("n_test"),
            "device": (record.get("run_info") or {}).get("device"),
            "git_commit": (record.get("git") or {}).get("commit"), "error": (record.get("error") or {}).get("message"),
            "best_epoch_auroc_on_test": ((record.get("diagnostics") or {}).get("best_epoch_on_test_OPTIMISTIC") or {}).get("auroc"),
            "record": str(path.relative_to(Path(results_dir))),
        })
    columns = ["dataset", "normal_class", "class_name", "method", "label", "seed", "profile", "protocol", "status",
               "auroc", *THRESHOLD_METRICS, "threshold", "train_seconds", "score_seconds", "n_train", "n_test",
               "device", "git_commit", "error", "best_epoch_auroc_on_test", "record"]
    return pd.DataFrame(rows, columns=columns), problems


def method_order(frame: pd.DataFrame) -> list[str]:
    """The paper's seven labels in its column order, then any other method with records."""
    from methods import REGISTRY

    paper = [spec.label for spec in REGISTRY.values()]
    extra = sorted(set(frame["label"]) - set(paper)) if len(frame) else []
    return paper + extra


def _cell_frame(frame: pd.DataFrame, metric: str, classes: list[str], methods: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values, notes) per class x method: the mean of `metric` over ok seeds; notes say
    'diverged' / 'failed' when no seed is ok, or 'k/n ok' when only some are."""
    values = pd.DataFrame(np.nan, index=classes, columns=methods)
    notes = pd.DataFrame("", index=classes, columns=methods)
    for (class_name, label), group in frame.groupby(["class_name", "label"]):
        if class_name not in values.index or label not in values.columns:
            continue
        ok = group[group["status"] == "ok"]
        if len(ok):
            values.loc[class_name, label] = ok[metric].astype(float).mean()
            if len(ok) < len(group):
                notes.loc[class_name, label] = f"{len(ok)}/{len(group)} seeds ok"
        else:
            notes.loc[class_name, label] = "/".join(sorted(set(group["status"])))
    return values, notes


def _mean_row(values: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Mean over the classes present; complete only when all classes are."""
    counts = values.notna().sum()
    return values.mean(), counts


def _fmt(value: float, digits: int = 4) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _bold(text: str, latex: bool) -> str:
    return f"\\textbf{{{text}}}" if latex else f"**{text}**"


def auroc_table(frame: pd.DataFrame, dataset: str, latex: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(paired table 'ours (paper)', difference table ours - paper) for Tables 1-3."""
    _, csv_name = TABLES[dataset]
    reference = reference_table(csv_name)
    classes = CLASS_NAMES[dataset]
    methods = method_order(frame)
    subset = frame[frame["dataset"] == dataset]
    values, notes = _cell_frame(subset, "auroc", classes, methods)
    means, counts = _mean_row(values)
    values.loc["mean"] = means
    notes.loc["mean"] = ["" if counts[m] in (0, len(classes)) else f"{counts[m]}/{len(classes)} classes" for m in methods]
    paper = reference.rename(index={str(i): c for i, c in zip(range(10), classes)}).reindex(index=values.index, columns=methods)

    paired = pd.DataFrame("", index=values.index, columns=methods)
    for row in values.index:
        best = values.loc[row].max()
        for method in methods:
            ours = values.loc[row, method]
            text = notes.loc[row, method] if pd.isna(ours) and notes.loc[row, method] else _fmt(ours)
            if not pd.isna(ours) and ours == best:
                text = _bold(text, latex)
            if not pd.isna(ours) and notes.loc[row, method]:
                text += f" [{notes.loc[row, method]}]"
            paired.loc[row, method] = f"{text} ({_fmt(paper.loc[row, method])})"
    # The mean row's difference averages the per-class differences, so a partial column is
    # compared with the paper on the same classes only.
    class_diff = values.loc[classes] - paper.loc[classes]
    diff = pd.concat([class_diff, class_diff.mean().to_frame("mean").T])
    difference = diff.map(lambda v: DASH if pd.isna(v) else f"{v:+.4f}")
    paired.index.name = difference.index.name = "normal class"
    return paired, difference


def table4(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean gmean / false-alarm / miss rate over the MNIST classes, ours (paper)."""
    reference = reference_table(TABLE4_CSV)
    # Table 4's own column order (it has no iForest column), then the other methods.
    methods = list(reference.columns) + [m for m in method_order(frame) if m not in reference.columns]
    subset = frame[frame["dataset"] == "mnist"]
    out = pd.DataFrame("", index=list(THRESHOLD_METRICS), columns=methods)
    for metric in THRESHOLD_METRICS:
        values, _ = _cell_frame(subset, metric, CLASS_NAMES["mnist"], methods)
        means, counts = _mean_row(values)
        for method in methods:
            ours = _fmt(means[method])
            if counts[method] not in (0, 10):
                ours += f" [{counts[method]}/10 classes]"
            paper = reference.loc[metric, method] if method in reference.columns else None
            out.loc[metric, method] = f"{ours} ({_fmt(paper)})"
    out.index.name = "metric"
    return out


def diagnostics_table(frame: pd.DataFrame, dataset: str) -> Optional[pd.DataFrame]:
    """Final-model AUROC next to the best per-epoch AUROC on the test set, for runs made with
    --track-auroc. The second number is OPTIMISTIC (picked on test labels): it is shown only to
    compare with papers that report the best epoch, never as our result."""
    subset = frame[(frame["dataset"] == dataset) & frame["best_epoch_auroc_on_test"].notna()]
    if subset.empty:
        return None
    classes = CLASS_NAMES[dataset]
    methods = [m for m in method_order(frame) if m in set(subset["label"])]
    final, _ = _cell_frame(subset, "auroc", classes, methods)
    best, _ = _cell_frame(subset, "best_epoch_auroc_on_test", classes, methods)
    final.loc["mean"], best.loc["mean"] = final.mean(), best.mean()
    table = pd.DataFrame({(m, kind): (final if kind == "final" else best)[m].map(_fmt)
                          for m in methods for kind in ("final", "best epoch on test (optimistic)")})
    table.columns = [f"{m}: {kind}" for m, kind in table.columns]
    table.index.name = "normal class"
    return table


def auroc_figure(frame: pd.DataFrame, dataset: str, path: Path) -> None:
    """Per-class AUROC, ours (filled) and the paper's (hollow), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = CLASS_NAMES[dataset]
    methods = method_order(frame)
    ours, _ = _cell_frame(frame[frame["dataset"] == dataset], "auroc", classes, methods)
    paper = reference_table(TABLES[dataset][1]).drop(index="mean")
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        x = np.arange(len(classes)) + (i - len(methods) / 2 + 0.5) * width
        colour = f"C{i}"
        ax.scatter(x, ours[method].to_numpy(), color=colour, label=f"{method} (ours)", s=18)
        if method in paper.columns:
            ax.scatter(x, paper[method].to_numpy(), facecolors="none", edgecolors=colour, s=18)
    ax.set_xticks(np.arange(len(classes)), classes)
    ax.set_ylabel("AUROC")
    ax.set_title(f"{TITLES[dataset]}: ours (filled) vs paper (hollow)")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def _to_markdown(title: str, tables: list[tuple[str, pd.DataFrame]], footer: str) -> str:
    parts = [f"# {title}\n"]
    for caption, table in tables:
        parts.append(f"{caption}\n\n{table.to_markdown(disable_numparse=True)}\n")
    parts.append(footer)
    return "\n".join(parts)


def _to_latex(title: str, tables: list[tuple[str, pd.DataFrame]]) -> str:
    parts = [f"% {title}"]
    for caption, table in tables:
        body = table.to_latex(escape=False, caption=caption.replace("_", r"\_").replace("%", r"\%"), column_format="l" + "r" * table.shape[1])
        parts.append(body.replace("±", r"$\pm$"))
    return "\n".join(parts)


def write_reports(results_dir: Path, reports_dir: Path, profile: str, protocol: str = "paper") -> list[Path]:
    """Build every table of one profile from its records. Returns the files written."""
    frame, problems = load_records(results_dir, profile, protocol)
    out_dir = Path(reports_dir) / profile
    suffix = "" if protocol == "paper" else f"_{protocol}"
    written: list[Path] = []
    n_records = len(frame)
    footer = (f"Cells: ours ({'paper'}). Ours = mean over seeds of the final model's metric, profile `{profile}`, "
              f"protocol `{protocol}`, from {n_records} records under `{Path(results_dir) / profile}`. "
              f"{DASH} = no record; bold = best of ours in the row; [k/n] = only part of the runs or classes present.\n")
    if problems:
        footer += "\nUnreadable records, treated as missing:\n" + "\n".join(f"- {p}" for p in problems) + "\n"

    def save(name: str, text: str) -> None:
        path = out_dir / name
        _atomic_write(path, lambda handle: handle.write(text.encode()))
        written.append(path)

    for dataset, (number, csv_name) in TABLES.items():
        stem = csv_name.replace(".csv", "") + suffix
        title = f"Table {number[-1]}: AUROC on {TITLES[dataset]} ({profile} profile, {protocol} protocol)"
        md_paired, md_diff = auroc_table(frame, dataset, latex=False)
        tex_paired, _ = auroc_table(frame, dataset, latex=True)
        save(f"{stem}.md", _to_markdown(title, [("AUROC, ours (paper):", md_paired), ("Difference, ours - paper:", md_diff)], footer))
        save(f"{stem}.tex", _to_latex(title, [(f"{title}: ours (paper)", tex_paired), (f"{title}: ours - paper", md_diff)]))
        if (frame["dataset"] == dataset).any():
            figure = out_dir / f"{stem}.png"
            auroc_figure(frame, dataset, figure)
            written.append(figure)
        diagnostics = diagnostics_table(frame, dataset)
        if diagnostics is not None:
            save(f"diagnostics_{dataset}{suffix}.md", _to_markdown(
                f"Per-epoch diagnostic on {TITLES[dataset]}: final model vs best epoch ON THE TEST SET",
                [("AUROC (the second number of each method is optimistic, chosen on test labels):", diagnostics)], footer))
    from benchmark.verdict import verdict_sections  # seeds, verdicts, ranks, tests, best epoch, memory health
    for section in verdict_sections(frame, results_dir, profile, protocol):
        save(f"{section.stem}{suffix}.md", _to_markdown(section.title, section.tables, section.footer + "\n" + footer))
    title = f"Table 4: mean threshold metrics on MNIST ({profile} profile, {protocol} protocol)"
    t4 = table4(frame)
    note = ("Threshold: the Youden-optimal ROC point on the test labels (the paper's rule; optimistic). "
            "Normal = positive class: false-alarm rate = normals flagged anomalous, miss rate = anomalies accepted.\n\n")
    save(f"table4_mnist_threshold_metrics{suffix}.md", _to_markdown(title, [("Mean over the MNIST classes, ours (paper):", t4)], note + footer))
    save(f"table4_mnist_threshold_metrics{suffix}.tex", _to_latex(title, [(title, t4)]))
    save(f"records{suffix}.csv", frame.to_csv(index=False))
    return written

"""Sensitivity sweeps: `run_all.py --sweep METHOD.PARAM=v1,v2,...`.

Each value runs as ordinary jobs (resumable, recorded like any run) in its own profile
directory, named (this naming is fixed: records made by hand with `--set ... --tag sweep-...`
are read the same way)

    <profile>+sweep-<method>.<param>=<value as written>[+<set tag>]

e.g. `quick+sweep-mem_ganomaly.lr=2e-3`, or `quick+sweep-mem_ganomaly.memory_size=500+epochs=3`
when `--set mem_ganomaly.epochs=3` is also given (the set tag is `--tag` when given, else the
`--set` items without their method prefix). After the jobs, a sensitivity table and figure per
dataset (AUROC per value: per class and the mean over classes, mean ± sd over seeds) go to

    <reports>/<profile>[+<set tag>]/sensitivity_<method>.<param>_<dataset>[_<protocol>].{md,png}

Like every table here, they are built from the records alone (`--report-only --sweep ...`).
Nothing in a sweep picks a value: the table shows every value's test AUROC side by side.

The command line parses and checks `--sweep` (benchmark/cli.py) and hands this module a `SweepSpec`
of parsed values, with the method's label and the profile's own value of the parameter: this module
neither reads command-line text nor asks the method registry.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from benchmark.data import CLASS_NAMES
from benchmark.datasets import TITLES
from benchmark.records import _atomic_write
from benchmark.reports import load_records
from benchmark.verdict import DASH, format_cell, mean_sd

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: a method, one of its hyperparameters and the values.

    Parameters
    ----------
    method : str
        The registry name of the swept method.
    param : str
        The swept constructor argument.
    values : tuple of str
        The values as written (they name the results directories).
    parsed : tuple
        The same values as the detector gets them (``"2e-3"`` -> 0.002); default: `values` unchanged.
    label : str
        The method's display label (default: `method`).
    profile_values : dict
        Dataset -> the profile's own value of `param` (the tables' footers name it), where it has one.
    """
    method: str
    param: str
    values: tuple[str, ...]
    parsed: tuple[Any, ...] = ()
    label: str = ""
    profile_values: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """The swept parameter as "method.param"."""
        return f"{self.method}.{self.param}"

    def parsed_values(self) -> list[Any]:
        """The values as the detector gets them (`parsed`, else the values as written)."""
        return list(self.parsed) if self.parsed else list(self.values)

    def profile_dir(self, profile: str, value: str, set_tag: str = "") -> str:
        """The results directory name of one value (see the module docstring).

        Parameters
        ----------
        profile : str
            The base profile.
        value : str
            The value as written.
        set_tag : str, default=""
            The suffix for --set items (`set_tag`).

        Returns
        -------
        str
            The directory name.
        """
        name = f"{profile}+sweep-{self.method}.{self.param}={value}" + (f"+{set_tag}" if set_tag else "")
        return _UNSAFE.sub("_", name)


def set_tag(overrides_as_written: dict[str, Any], tag: Optional[str]) -> str:
    """The suffix of the sweep directories for --set items.

    Parameters
    ----------
    overrides_as_written : dict
        The --set items as written, by name.
    tag : str or None
        A tag given on the command line.

    Returns
    -------
    str
        `tag` when given, else 'param=value' per item, without its method prefix, '+'-joined in name order.
    """
    if tag:
        return _UNSAFE.sub("_", tag)
    items = sorted((name.rpartition(".")[2], value) for name, value in overrides_as_written.items())
    return _UNSAFE.sub("_", "+".join(f"{k}={v}" for k, v in items))


def load_sweep(results_dir: Path, profile: str, spec: SweepSpec, tag: str = "",
               protocol: str = "paper") -> pd.DataFrame:
    """Every record of the sweep's method, one row each, with the value (as written) it ran with.

    Returns
    -------
    pd.DataFrame
        `benchmark.reports.load_records`'s columns plus `value`; empty when nothing is recorded.
    """
    frames = []
    for value in spec.values:
        frame, _ = load_records(Path(results_dir), spec.profile_dir(profile, value, tag), protocol)
        frame = frame[frame["method"] == spec.method].copy()
        frame["value"] = value
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def sensitivity_table(frame: pd.DataFrame, spec: SweepSpec, dataset: str) -> tuple[Optional[pd.DataFrame], str]:
    """AUROC per value (rows, in the sweep's order) and class (columns) plus the mean over the classes.

    Each cell is mean ± sd over the ok seeds. The mean column: per seed the mean over the classes the sweep
    ran, then mean ± sd over the seeds that have them all; a value missing some classes shows the mean of its
    class means with [k/n classes].

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows of the sweep.
    spec : SweepSpec
        The sweep.
    dataset : str
        Dataset name.

    Returns
    -------
    table : pandas.DataFrame or None
        The table.
    footer : str
        The footer.
    """
    subset = frame[(frame["dataset"] == dataset)] if len(frame) else frame
    if subset.empty:
        return None, ""
    classes = sorted(subset["normal_class"].unique())
    names = [CLASS_NAMES[dataset][c] for c in classes]
    expected = int(subset.groupby(["value", "normal_class"])["seed"].nunique().max())
    rows = {}
    for value in spec.values:
        runs = subset[subset["value"] == value]
        ok = runs[runs["status"] == "ok"]
        cells = []
        for c in classes:
            mean, sd, n = mean_sd(ok.loc[ok["normal_class"] == c, "auroc"].to_numpy(dtype=float))
            failed = runs.loc[(runs["normal_class"] == c) & (runs["status"] != "ok"), "status"]
            text = format_cell(mean, sd, n, expected)
            if len(failed):
                text = (f"{text} [{', '.join(sorted(failed))}]" if n else ", ".join(sorted(failed)))
            cells.append(text)
        per_seed = ok.groupby("seed").agg(classes=("normal_class", "nunique"), value=("auroc", "mean"))
        complete = per_seed[per_seed["classes"] == len(classes)]["value"].to_numpy(dtype=float)
        if len(complete):
            mean, sd, n = mean_sd(complete)
            mean_text = format_cell(mean, sd, n, expected)
        else:
            class_means = ok.groupby("normal_class")["auroc"].mean()
            mean_text = (DASH if class_means.empty
                         else f"{class_means.mean():.4f} [{len(class_means)}/{len(classes)} classes]")
        rows[value] = [*cells, mean_text]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*names, "mean over classes"])
    table.index.name = spec.param
    profile = subset["profile"].iloc[0].split("+sweep-")[0]
    default = spec.profile_values.get(dataset)
    footer = (f"AUROC of the final model (fixed budget) per value of `{spec.name}`, mean ± sd over the ok seeds "
              f"(n=k: only k of {expected} seeds); the mean column averages over the classes the sweep ran "
              f"({', '.join(names)}). The `{profile}` profile's value: `{default}`. Test-set AUROC of every value "
              "side by side: reading a 'best' value off this table would tune on test labels.\n")
    return table, footer


def sensitivity_figure(frame: pd.DataFrame, spec: SweepSpec, dataset: str, path: Path, title: str) -> bool:
    """AUROC vs value: one thin line per class, the mean over classes thick.

    The mean has ± sd over seeds as error bars when there are several. Values are evenly spaced, labelled as
    written.

    Parameters
    ----------
    frame : pandas.DataFrame
        Record rows of the sweep.
    spec : SweepSpec
        The sweep.
    dataset : str
        Dataset name.
    path : Path
        The image file to write.
    title : str
        Figure title.

    Returns
    -------
    bool
        False (nothing written) when the dataset has no ok record.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[(frame["dataset"] == dataset) & (frame["status"] == "ok")] if len(frame) else frame
    if ok.empty:
        return False
    x = np.arange(len(spec.values))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, c in enumerate(sorted(ok["normal_class"].unique())):
        runs = ok[ok["normal_class"] == c]
        y = [runs.loc[runs["value"] == v, "auroc"].mean() if (runs["value"] == v).any() else math.nan
             for v in spec.values]
        ax.plot(x, y, marker="o", lw=1, alpha=0.7, color=f"C{i % 10}", label=f"class {CLASS_NAMES[dataset][int(c)]}")
    classes = ok["normal_class"].nunique()
    means, sds = [], []
    for v in spec.values:
        runs = ok[ok["value"] == v]
        per_seed = runs.groupby("seed").agg(k=("normal_class", "nunique"), m=("auroc", "mean"))
        complete = per_seed[per_seed["k"] == classes]["m"].to_numpy(dtype=float)
        mean, sd, _ = mean_sd(complete) if len(complete) else (math.nan, math.nan, 0)
        means.append(mean)
        sds.append(0.0 if math.isnan(sd) else sd)
    ax.errorbar(x, means, yerr=sds, color="black", lw=2.5, marker="s", capsize=4, label="mean over classes")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (0.5)")
    ax.set_xticks(x, list(spec.values))
    ax.set_xlabel(spec.param)
    ax.set_ylabel("AUROC (final model)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return True


def write_sensitivity(results_dir: Path, reports_dir: Path, profile: str, spec: SweepSpec, tag: str = "",
                      protocol: str = "paper") -> list[Path]:
    """Build the sensitivity table (.md) and figure (.png) of each dataset the sweep has records
    for, from the records alone. Returns the files written.

    Parameters
    ----------
    results_dir, reports_dir : Path
    profile : str
        The base profile (paper, quick, smoke).
    spec : SweepSpec
    tag : str
        The set tag of the sweep directories ("" for none).
    protocol : str
    """
    frame = load_sweep(results_dir, profile, spec, tag, protocol)
    out_dir = Path(reports_dir) / (f"{profile}+{tag}" if tag else profile)
    suffix = "" if protocol == "paper" else f"_{protocol}"
    written: list[Path] = []
    if frame.empty:
        return written
    label = spec.label or spec.method
    for dataset in CLASS_NAMES:
        table, footer = sensitivity_table(frame, spec, dataset)
        if table is None:
            continue
        stem = f"sensitivity_{spec.name}_{dataset}{suffix}"
        budget = f"{profile} profile" + (f", {tag}" if tag else "") + f", {protocol} protocol"
        title = f"{TITLES.get(dataset, dataset)}: {label} AUROC vs {spec.param} ({budget})"
        dirs = ", ".join(f"`{spec.profile_dir(profile, v, tag)}`" for v in spec.values)
        text = (f"# Sensitivity: {title}\n\n{table.to_markdown(disable_numparse=True)}\n\n{footer}\n"
                f"Records: under `{results_dir}/` in {dirs}. Figure: `{stem}.png`.\n")
        path = out_dir / f"{stem}.md"
        _atomic_write(path, lambda handle, text=text: handle.write(text.encode()))
        written.append(path)
        figure = out_dir / f"{stem}.png"
        if sensitivity_figure(frame, spec, dataset, figure, title):
            written.append(figure)
    return written
